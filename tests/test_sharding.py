"""Issue 16: data parallel and FSDP over a `jax.sharding.Mesh` ("data", "fsdp"), multi-host through jax.distributed.

The oracle is the one-device run of the same code (itself checked against transformers, PEFT and bitsandbytes by
the rest of the suite): on meshes data=4, fsdp=4, data=2 x fsdp=2 (4 virtual devices) and data=2 x fsdp=4 (8), a
tiny Llama and a tiny Qwen2.5-VL, both NF4, give the one-device loss, LoRA gradients and logits within 1e-5 (fp32:
only the order of XLA's cross-device sums differs); the NF4 base is really sharded (each device's addressable
shards hold 1/fsdp of every weight's packed bytes) and its bytes equal the one-device load's; a trainer run stopped
after a checkpoint and resumed on the mesh ends bit-identical to an uninterrupted one; the exported adapter equals
the one-device one; a two-process jax.distributed run (2 devices each, coordinator on localhost) trains to the
loss of one process with 4 devices.

Virtual devices exist only in a process that sets XLA_FLAGS before jax starts, so those cases run in subprocesses
(tests/mesh_runner.py), all started together by the `jobs` fixture (the machine's cores work on them at once);
the tests compare what they wrote. The resume case stops training from a callback right after step 2's checkpoint
(what a kill at that moment leaves behind) instead of SIGKILLing a CLI run as tests/test_resume.py does: three
CLI processes with 4 virtual devices each would add minutes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import rel_l2

RUNNER = Path(__file__).resolve().parent / "mesh_runner.py"
ROOT = RUNNER.parent.parent
MESH_SHAPES = {"data4": (4, 1), "fsdp4": (1, 4), "data2_fsdp2": (2, 2), "data2_fsdp4": (2, 4)}
LLAMA_MESHES = list(MESH_SHAPES)
VL_MESHES = ["data4", "fsdp4", "data2_fsdp2"]


def _env(devices: int, cache: Path, extra: dict | None = None) -> dict:
    # Backend optimization off: a third less compile time, the same programs for every run compared.
    flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0").strip()
    # One compilation cache for the jobs: the trainer job's resumed runs (and the second process of the
    # distributed run) load the programs their predecessors compiled instead of compiling them again.
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(extra or {})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Job:
    """One runner scenario in its own process, started by `Jobs`; `wait()` returns once it has ended."""

    def __init__(self, scenario: str, devices: int, out: Path, *args, extra_env=None, log: Path | None = None,
                 command: list | None = None):
        self.out = out
        self.log = log or out.with_suffix(".log")
        self.command = command or [sys.executable, str(RUNNER), scenario, str(out), *map(str, args)]
        self.env = _env(devices, out.parent / "jax-cache", extra_env)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def check(self):
        rc = self.proc.returncode
        assert rc == 0, f"{self.out.name} failed (exit {rc}):\n" + self.log.read_text()[-6000:]


class Jobs:
    """Every scenario: the equivalence runs (Llama on 8 devices, Qwen2.5-VL on 4), the trainer runs (4 devices), the
    two processes of the jax.distributed run and the benchmark. At most `SLOTS` processes run at once (the CI
    machine has 2 cores); the distributed pair starts together."""

    SLOTS = 3

    def __init__(self, root: Path, llama_dir: Path, vl_dir: Path | None):
        self.root, self.llama_dir = root, llama_dir
        work = root / "work"
        groups = [{"llama": Job("equivalence", 8, root / "llama", "llama", llama_dir)}]
        if vl_dir is not None:
            groups.append({"qwen2_5_vl": Job("equivalence", 4, root / "qwen2_5_vl", "qwen2_5_vl", vl_dir)})
        groups.append({"trainer": Job("trainer", 4, root / "trainer", llama_dir, work)})
        port = _free_port()
        environment = [{"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                        "JAX_PROCESS_ID": str(i)} for i in range(2)]
        groups.append({f"distributed{i}": Job("distributed", 2, root / "distributed", llama_dir, work,
                                              log=root / f"distributed{i}.log", extra_env=environment[i])
                       for i in range(2)})
        bench = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--shape", "tiny", "--seq", "64",
                 "--batch", "2", "--steps", "2", "--gc", "true", "--mesh", "data=2,fsdp=2"]
        groups.append({"benchmark": Job("", 4, root / "benchmark", command=bench)})
        self.jobs = {name: job for group in groups for name, job in group.items()}
        self.pending = groups
        self.done: set[str] = set()
        self.fill()

    def running(self) -> list[str]:
        return [n for n, j in self.jobs.items() if j.proc is not None and n not in self.done]

    def fill(self):
        while self.pending and len(self.running()) + len(self.pending[0]) <= self.SLOTS:
            for job in self.pending.pop(0).values():
                job.start()

    def finish(self, name: str, timeout: float = 1800):
        deadline = time.monotonic() + timeout
        while name not in self.done:
            assert time.monotonic() < deadline, f"{name} did not end in {timeout} s"
            for n in self.running():
                if self.jobs[n].proc.poll() is not None:
                    self.done.add(n)
            self.fill()
            time.sleep(0.2)
        self.jobs[name].check()

    def result(self, name: str):
        self.finish(name)
        out = self.jobs[name].out
        facts = json.loads(out.with_suffix(".json").read_text())
        npz = out.with_suffix(".npz")
        return facts, (dict(np.load(npz)) if npz.exists() else None)

    def close(self):
        for job in self.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from fastlora_jax.tiny import write_tiny_llama
    # intermediate 1024: the MLP weights' shards are whole 256-block groups at fsdp 2 and 4 (nested absmax split)
    return write_tiny_llama(tmp_path_factory.mktemp("mesh-llama"), seed=16, intermediate_size=1024)


@pytest.fixture(scope="module")
def jobs(llama_dir, tmp_path_factory):
    vl_dir = None
    try:
        import PIL  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        from fastlora_jax.tiny import write_tiny_qwen2_vl
        vl_dir = write_tiny_qwen2_vl(tmp_path_factory.mktemp("mesh-vl") / "base", variant="qwen2_5_vl", seed=16)
    except ImportError:
        pass
    jobs = Jobs(tmp_path_factory.mktemp("mesh-jobs"), llama_dir, vl_dir)
    yield jobs
    jobs.close()


def _model_result(jobs, kind):
    if kind not in jobs.jobs:
        pytest.skip("the tiny Qwen2.5-VL needs torch, torchvision and pillow")
    return jobs.result(kind)


CASES = [("llama", m) for m in LLAMA_MESHES] + [("qwen2_5_vl", m) for m in VL_MESHES]


# ------------------------------------------------------------------------------------------ in-process


def test_mesh_specs_and_their_errors():
    from fastlora_jax import sharding
    assert sharding.parse_mesh("data=2,fsdp=2") == {"data": 2, "fsdp": 2}
    assert sharding.parse_mesh(" FSDP=4 ") == {"data": None, "fsdp": 4}  # data: the devices fsdp leaves
    assert sharding.parse_mesh("auto") == {"data": None, "fsdp": 1}
    assert sharding.parse_mesh("data=auto,fsdp=2") == {"data": None, "fsdp": 2}
    assert sharding.resolve_mesh(None) is None and sharding.resolve_mesh("none") is None
    for bad, says in [("gpus=2", r"mesh='gpus=2' is not accepted: use 'data=N,fsdp=M'"),
                      ("data=2,data=2", r"each axis at most once"), ("data=0", r"data='0' must be a positive int"),
                      ("fsdp=x", r"fsdp='x' must be a positive int"), ("", r"mesh='' is not accepted")]:
        with pytest.raises(ValueError, match=says):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match=r"mesh data=3 x fsdp=1 = 3 devices, but there are 1 \(cpu\)"):
        sharding.make_mesh(data=3)
    with pytest.raises(ValueError, match=r"fsdp=2 does not divide the 1 devices"):
        sharding.make_mesh(fsdp=2)
    mesh = sharding.resolve_mesh("auto")
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape == {"data": 1, "fsdp": 1}
    import jax
    other = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match=r"mesh has axes \('batch',\); fastlora_jax needs \('data', 'fsdp'\)"):
        sharding.resolve_mesh(other)
    with pytest.raises(ValueError, match=r"mesh=3 is not accepted"):
        sharding.resolve_mesh(3)


def test_sft_config_and_cli_refuse_a_bad_mesh(capsys):
    from fastlora_jax.cli import main
    from fastlora_jax.trainer import SFTConfig
    with pytest.raises(ValueError, match=r"mesh='data=two': data='two' must be a positive int"):
        SFTConfig(mesh="data=two")
    with pytest.raises(ValueError, match=r"mesh=\[2, 2\] is not accepted: use None"):
        SFTConfig(mesh=[2, 2])
    SFTConfig(mesh="none"), SFTConfig(mesh="data=2,fsdp=2")  # accepted (the devices are checked at training)
    assert main(["train", "--mesh", "tp=2"]) == 2
    assert "error: --mesh 'tp=2': mesh='tp=2' is not accepted" in capsys.readouterr().err


def test_distributed_needs_all_three_variables(monkeypatch):
    from fastlora_jax import sharding
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"JAX_COORDINATOR_ADDRESS='localhost:1' is set but \['JAX_NUM_PROCESSES', "
                                         r"'JAX_PROCESS_ID'\] are not"):
        sharding.initialize_distributed()
    assert sharding.initialize_distributed(False) is False
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    assert sharding.initialize_distributed() is False  # a single-process run: nothing to do
    with pytest.raises(ValueError, match=r"distributed='yes' is not accepted"):
        sharding.initialize_distributed("yes")


def test_sharding_rules_split_on_whole_blocks():
    """The table, with the expected layouts worked out by hand from bitsandbytes' format (row-major weight,
    blocks of 64 elements, nested groups of 256 blocks)."""
    from jax.sharding import PartitionSpec as P

    from fastlora_jax.sharding import FSDP, dense_spec, nf4_specs
    split, whole = P(FSDP, None), P()
    # q_proj [64, 64] at fsdp 4: 16 rows x 64 = 1024 elements a shard = 16 blocks, not a 256-block group
    specs = nf4_specs((64, 64), 4)
    assert (specs["packed"], specs["absmax"], specs["nested_absmax"]) == (split, P(FSDP), whole)
    assert specs["quant_map"] == specs["nested_quant_map"] == specs["offset"] == whole
    # gate_proj [1024, 64] at fsdp 4: 16384 elements a shard = exactly one nested group
    assert nf4_specs((1024, 64), 4)["nested_absmax"] == P(FSDP)
    assert nf4_specs((1024, 64), 8)["nested_absmax"] == whole  # 8192 elements: half a group
    # rows not divisible, or a shard that is not whole 64-element blocks: the weight stays whole
    assert nf4_specs((30, 64), 4)["packed"] == whole
    assert nf4_specs((4, 24), 4)["packed"] == whole  # one row of 24 elements a shard
    assert nf4_specs((64, 64), 4, double_quant=False)["nested_absmax"] is None
    assert nf4_specs((64, 64), 1)["packed"] == whole
    # 16-bit tensors: linears by rows; embeddings/lm_head by vocab, else hidden; small ones replicated
    assert dense_spec((64, 32), "linear", 4) == split and dense_spec((30, 32), "linear", 4) == whole
    assert dense_spec((512, 64), "embedding", 4) == split
    assert dense_spec((510, 64), "lm_head", 4) == P(None, FSDP) and dense_spec((510, 66), "embedding", 4) == whole
    for kind in ("norm", "linear_bias", "norm_bias", "conv"):
        assert dense_spec((64,) * (5 if kind == "conv" else 1), kind, 4) == whole


def test_one_device_mesh_shards_nothing_and_changes_nothing(llama_dir):
    """A mesh of the one device: model.shard places everything on it; loss and gradients equal the plain run."""
    import jax

    from fastlora_jax import FastLanguageModel, sharding
    base, _ = FastLanguageModel.from_pretrained(str(llama_dir), max_seq_length=64, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(base, r=4, target_modules=["q_proj"], init_lora_weights=False)
    ids = np.random.default_rng(3).integers(4, 512, (2, 16)).astype(np.int32)
    plain = jax.value_and_grad(lambda lp: model.compute_loss(lp, ids, ids))(model.lora_params)
    on_mesh = FastLanguageModel.get_peft_model(base, r=4, target_modules=["q_proj"], init_lora_weights=False)
    on_mesh.shard(sharding.make_mesh())
    assert on_mesh.mesh.size == 1 and base.mesh is None
    meshed = jax.value_and_grad(lambda lp: on_mesh.compute_loss(lp, ids, ids))(on_mesh.lora_params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(meshed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ on meshes


@pytest.mark.parametrize("kind, mesh", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_loss_and_lora_gradients_match_one_device(jobs, kind, mesh):
    facts, arrays = _model_result(jobs, kind)
    assert mesh in facts["meshes"], facts
    np.testing.assert_allclose(arrays[f"{mesh}/loss"], arrays["single/loss"], rtol=1e-5)
    keys = sorted(k.split("/grad/", 1)[1] for k in arrays if k.startswith("single/grad/"))
    assert keys == sorted(k.split("/grad/", 1)[1] for k in arrays if k.startswith(f"{mesh}/grad/"))
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    if kind == "qwen2_5_vl":
        assert any(".visual." in k for k in keys) and any(".language_model." in k for k in keys)
    for key in keys:
        ours, one = arrays[f"{mesh}/grad/{key}"], arrays[f"single/grad/{key}"]
        scale = np.abs(one).max()
        assert scale > 0, key  # a zero gradient would compare equal to anything
        assert np.abs(ours - one).max() <= 1e-5 * scale, key
    if f"{mesh}/logits" in arrays:  # the forward pass on data=2 x fsdp=2
        logits, one = arrays[f"{mesh}/logits"], arrays["single/logits"]
        assert np.abs(logits - one).max() <= 1e-5 * np.abs(one).max()
    else:
        assert mesh != "data2_fsdp2"


@pytest.mark.parametrize("kind, mesh", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_nf4_base_is_really_sharded(jobs, kind, mesh):
    facts, _ = _model_result(jobs, kind)
    got = facts[mesh]
    assert got["bytes_equal"], "the mesh load's NF4 bytes differ from the one-device load's"
    data, fsdp = MESH_SHAPES[mesh]
    assert len(got["packed_fractions"]) >= (7 if kind == "llama" else 12)  # every linear of every stack
    for name, fractions in got["packed_fractions"].items():
        assert len(fractions) == data * fsdp, name  # one addressable shard per device
        assert fractions == pytest.approx([1 / fsdp] * (data * fsdp)), name
    # no device holds the whole base (norms, biases and the patch embedding are replicated: small)
    assert got["max_device_fraction"] < 1.0 if fsdp > 1 else got["max_device_fraction"] == 1.0


def test_nf4_kernel_runs_per_device_under_a_mesh(jobs):
    """base_matmul's wrapper for the fused NF4 kernel: each device gets its rows (256 of 1024 on 4 devices, a
    size the kernel supports) and the whole weight gathered from its fsdp shards; the result stays split."""
    facts, arrays = jobs.result("llama")
    assert facts["kernel_weight_sharding"] == "P('fsdp', None)"
    assert facts["kernel"]["local_rows"] == 256 and facts["kernel"]["supported_local"]
    assert facts["kernel"]["out_sharding"] == "P(('data', 'fsdp'), None)"
    np.testing.assert_array_equal(arrays["kernel/mesh"], arrays["kernel/reference"])


def test_bnb_4bit_checkpoint_loads_into_shards_and_generation_runs_on_the_mesh(jobs):
    facts, _ = jobs.result("llama")
    bnb = facts["bnb"]
    assert bnb["source"] == "bnb-4bit" and bnb["bytes_equal"]
    for name, fractions in bnb["packed_fractions"].items():
        assert fractions == pytest.approx([0.5] * 4), name
    assert facts["generate"]["mesh"] == facts["generate"]["single"]
    assert len(facts["generate"]["mesh"][0]) == 6 + 4


def _adapter(directory: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(directory / "adapter_model.safetensors")


def test_trainer_stopped_and_resumed_on_the_mesh_is_bit_identical(jobs):
    facts, _ = jobs.result("trainer")
    work = jobs.root / "work"
    run = facts["uninterrupted"]
    assert run["mesh"] == "data=2,fsdp=2" and run["micro_batch"] == 8 and run["rows_per_step"] == 16
    assert "_sharding" in facts["checkpoint_files"]  # orbax wrote the arrays with their shardings
    assert facts["stopped"] and facts["latest_after_stop"] == 2 and facts["resumed"]["from"] == 2
    assert facts["resumed"]["losses"] == run["losses"]
    assert (work / "interrupted" / "adapter_model.safetensors").read_bytes() == \
        (work / "uninterrupted" / "adapter_model.safetensors").read_bytes()


def test_trainer_on_the_mesh_matches_one_device_and_exports_the_same_adapter(jobs):
    """per_device_train_batch_size 2 on 4 devices is the one-device run with 8: the same rows, the same steps."""
    facts, _ = jobs.result("trainer")
    work = jobs.root / "work"
    assert facts["single"]["mesh"] == "none" and facts["single"]["micro_batch"] == 8
    np.testing.assert_allclose(facts["uninterrupted"]["losses"], facts["single"]["losses"], rtol=1e-5)
    mesh_adapter, one = _adapter(work / "uninterrupted"), _adapter(work / "single")
    assert sorted(mesh_adapter) == sorted(one)
    for key in one:
        assert np.abs(one[key]).max() > 0, key
        assert rel_l2(mesh_adapter[key], one[key]) < 1e-4, key  # fp32 after 4 AdamW steps
    assert json.loads((work / "uninterrupted" / "adapter_config.json").read_text()) == \
        json.loads((work / "single" / "adapter_config.json").read_text())
    np.testing.assert_allclose(facts["uninterrupted"]["eval_loss"], facts["single"]["eval_loss"], rtol=1e-5)
    from safetensors.numpy import load_file
    merged_mesh = load_file(work / "merged-mesh" / "model.safetensors")
    merged_one = load_file(work / "merged-single" / "model.safetensors")
    assert sorted(merged_mesh) == sorted(merged_one)
    for key in merged_one:
        assert rel_l2(merged_mesh[key], merged_one[key]) < 1e-5, key


def test_two_process_distributed_run_matches_one_process(jobs):
    """Two local processes with 2 virtual devices each, coordinated through jax.distributed on localhost, train
    on one data=2 x fsdp=2 mesh: the loss of every step is the 4-device single-process run's, and process 0
    writes the same adapter (and both write their shards of the checkpoints)."""
    for i in range(2):
        jobs.finish(f"distributed{i}")
    reference, _ = jobs.result("trainer")
    work = jobs.root / "work"
    results = [json.loads((jobs.root / f"distributed.{i}.json").read_text()) for i in range(2)]
    for i, got in enumerate(results):
        assert got["initialized"] and got["process_index"] == i and got["process_count"] == 2
        assert got["devices"] == 4 and got["local_devices"] == 2 and got["mesh"] == "data=2,fsdp=2"
        np.testing.assert_allclose(got["losses"], reference["uninterrupted"]["losses"], rtol=1e-5)
    assert results[0]["losses"] == results[1]["losses"]  # one program: the same replicated loss everywhere
    ours, one_process = _adapter(work / "distributed"), _adapter(work / "uninterrupted")
    for key in one_process:
        assert rel_l2(ours[key], one_process[key]) < 1e-5, key
    assert sorted(int(p.name) for p in (work / "distributed" / "checkpoints").iterdir()) == [2, 4]


def test_benchmark_prints_tokens_per_second_and_peak_memory_per_device(jobs):
    """benchmarks/train_step.py --mesh data=2,fsdp=2 on its tiny shape (CPU devices report no memory stats: 0)."""
    jobs.finish("benchmark")
    log = jobs.jobs["benchmark"].log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    row = lines[-1]
    assert row["mesh"] == "data=2,fsdp=2" and row["devices"] == 4, row
    assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 4, rel=1e-3)
    assert row["tokens_per_s"] > 0 and len(row["peak_gib_per_device"]) == 4 and np.isfinite(row["loss"])
