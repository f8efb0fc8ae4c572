"""Checkpoints and resume (issue 12): a checkpoint is complete when the step that saved it returns, it records
the LoRA config, the base model and the optimizer's settings, a resume under another LoRA config is refused,
and a CLI run SIGKILLed at random moments and resumed ends with an uninterrupted run's adapter, bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fastlora_jax import FastLanguageModel
from fastlora_jax.data import bundled_dataset_path, load_records
from fastlora_jax.trainer import SFTConfig, SFTTrainer, TrainerCallback, _latest_step

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from fastlora_jax.tiny import write_tiny_llama
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def base(model_dir):
    return FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, load_in_4bit=False)


@pytest.fixture(scope="module")
def records():
    return load_records(bundled_dataset_path())[:8]


def trainer_for(base, records, out, lora=None, callbacks=(), **args):
    model, tokenizer = base
    model = FastLanguageModel.get_peft_model(model, **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                       "use_gradient_checkpointing": False, "random_state": 0,
                                                       **(lora or {})})
    config = SFTConfig(**{"output_dir": str(out), "per_device_train_batch_size": 2, "max_steps": 2,
                          "learning_rate": 1e-3, "save_steps": 1, "disable_tqdm": True, "seed": 0, **args})
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records, args=config,
                      callbacks=list(callbacks))


# ------------------------------------------------------------------------------------------ 1: LoRA config


@pytest.mark.parametrize("lora, named", [
    (dict(r=8), "r=4 vs 8"),
    (dict(lora_alpha=16), "lora_alpha=8 vs 16"),
    (dict(lora_dropout=0.1), "lora_dropout=0.0 vs 0.1"),
    (dict(target_modules=["q_proj"]), "target_modules=['q_proj', 'v_proj'] vs ['q_proj']"),
], ids=["r", "alpha", "dropout", "targets"])
def test_resume_under_another_lora_config_is_refused(base, records, tmp_path, lora, named):
    out = tmp_path / "out"
    trainer_for(base, records, out).train()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    resumed = trainer_for(base, records, out, lora=lora, max_steps=4)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/2 was trained with a different LoRA config: "
                                         + named.replace("[", r"\[").replace("]", r"\]")):
        resumed.train(resume_from_checkpoint=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing overwritten


def test_changed_hyper_parameters_warn(base, records, tmp_path):
    out = tmp_path / "out"
    trainer_for(base, records, out).train()
    resumed = trainer_for(base, records, out, max_steps=3, learning_rate=2e-3, weight_decay=0.1)
    with pytest.warns(UserWarning, match=r"different settings: .*optimizer.learning_rate=0.001 vs 0.002.*"
                                         r"optimizer.weight_decay=0.0 vs 0.1"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


def test_checkpoint_records_config_model_and_optimizer(base, records, tmp_path):
    import orbax.checkpoint as ocp
    trainer = trainer_for(base, records, tmp_path / "out")
    trainer.train()
    manager = ocp.CheckpointManager(trainer.checkpoint_dir, options=ocp.CheckpointManagerOptions(create=False))
    meta = manager.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    assert meta["version"] == 2
    assert meta["lora_config"]["r"] == 4 and meta["lora_config"]["lora_alpha"] == 8
    assert meta["lora_config"]["target_modules"] == TARGETS
    assert meta["model"]["architectures"] == ["LlamaForCausalLM"] and meta["model"]["dtype"] == "float32"
    assert meta["optimizer"]["learning_rate"] == 1e-3 and meta["optimizer"]["optim"] == "adamw_torch"


def test_resume_on_another_base_model_is_refused(base, records, tmp_path):
    from fastlora_jax.tiny import write_tiny_llama
    out = tmp_path / "out"
    trainer_for(base, records, out).train()
    other_dir = write_tiny_llama(tmp_path / "other", seed=0, rms_norm_eps=1e-6)
    other = FastLanguageModel.from_pretrained(str(other_dir), max_seq_length=64, load_in_4bit=False)
    with pytest.raises(ValueError, match=r"was trained on another base model .*config_sha256="):
        trainer_for(other, records, out, max_steps=3).train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------------------ 2: durability


class SeesCompleteCheckpoints(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_save(self, trainer, step, checkpoint_dir):
        assert checkpoint_dir.is_dir(), checkpoint_dir  # the path given exists
        self.seen.append((step, _latest_step(trainer.checkpoint_dir),
                          sorted(p.name for p in trainer.checkpoint_dir.iterdir())))


def test_checkpoint_is_complete_when_its_step_returns(base, records, tmp_path):
    spy = SeesCompleteCheckpoints()
    trainer_for(base, records, tmp_path / "out", callbacks=[spy], max_steps=4, save_steps=2).train()
    assert spy.seen == [(2, 2, ["2"]), (4, 4, ["2", "4"])]  # complete at once, no temporary directory


def test_non_finite_loss_stops_before_saving(base, records, tmp_path):
    """Training on for steps after the loss went NaN would save NaN checkpoints and a NaN adapter: it stops
    with the step, the values and the learning rate in the message, before any save of those params."""
    import jax
    import jax.numpy as jnp
    trainer = trainer_for(base, records, tmp_path / "out", max_steps=4, learning_rate=1e-3)
    leaves, treedef = jax.tree.flatten(trainer.model.lora_params)
    leaves[0] = leaves[0].at[0, 0].set(jnp.inf)
    trainer.model.lora_params = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(FloatingPointError, match=r"training stopped at step 1: the loss is nan and the gradient norm "
                                                 r"nan; lower learning_rate \(now 0.001\) or check the data"):
        trainer.train()
    assert _latest_step(trainer.checkpoint_dir) is None  # the non-finite step saved nothing
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------ the kill test


CLI_TRAIN = ["train", "--max-steps", "30", "--save-steps", "5", "--batch-size", "2", "--grad-accum", "1",
             "--r", "4", "--lora-dropout", "0.1", "--target-modules", "q_proj,v_proj", "--no-load-in-4bit",
             "--gradient-checkpointing", "false", "--max-seq-length", "64", "--seed", "5", "--quiet"]


def start_cli(model_dir, out: Path, log: Path, resume: bool) -> subprocess.Popen:
    # One compilation cache for all the runs of the test: each later process loads the train step instead
    # of compiling it (the same executable, so the results stay bit-identical).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(log.parent / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    args = [sys.executable, "-m", "fastlora_jax.cli", *CLI_TRAIN, "--model", str(model_dir), "--output-dir", str(out)]
    return subprocess.Popen(args + (["--resume"] if resume else []), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def complete_checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def kill_after_save(proc: subprocess.Popen, out: Path, after: int, delay: float, log: Path) -> int:
    """SIGKILL `proc` `delay` seconds after a checkpoint past step `after` is complete; returns the newest
    complete checkpoint at the moment of the kill."""
    deadline = time.monotonic() + 240
    while not [s for s in complete_checkpoints(out) if s > after]:
        assert proc.poll() is None, f"the run ended before saving past step {after}: {log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    newest = max(complete_checkpoints(out))
    assert proc.wait() == -signal.SIGKILL, f"the run ended before the kill: {log.read_text()}"
    return newest


def resumed_step(log: Path) -> int:
    lines = [line for line in log.read_text().splitlines() if line.startswith("resumed from ")]
    assert len(lines) == 1, log.read_text()
    return int(lines[0].rsplit("(step ", 1)[1].rstrip(")"))


def test_sigkilled_cli_run_resumes_bit_identical(model_dir, tmp_path):
    """Killed after step 10's save (save_steps=5): the resume starts at 10. Then killed twice more at seeded
    random moments after a save, and resumed to the end: the adapter equals an uninterrupted run's, bit for bit."""
    rng = np.random.default_rng(1212)
    ref = start_cli(model_dir, tmp_path / "ref", tmp_path / "ref.log", resume=False)  # runs alongside
    out = tmp_path / "killed"

    run = start_cli(model_dir, out, tmp_path / "run0.log", resume=False)
    newest = kill_after_save(run, out, after=9, delay=0.0, log=tmp_path / "run0.log")
    assert newest == 10, complete_checkpoints(out)
    for k in (1, 2):
        log = tmp_path / f"run{k}.log"
        run = start_cli(model_dir, out, log, resume=True)
        previous, newest = newest, kill_after_save(run, out, after=newest, delay=float(rng.uniform(0.0, 0.15)),
                                                   log=log)
        assert resumed_step(log) == previous
    log = tmp_path / "final.log"
    final = start_cli(model_dir, out, log, resume=True)
    assert final.wait(timeout=300) == 0, log.read_text()
    assert resumed_step(log) == newest
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()

    expected, got = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(expected) == sorted(got)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "ref" / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "ref" / "adapter_config.json").read_text())
    assert complete_checkpoints(out) == [5, 10, 15, 20, 25, 30]
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.isdigit()]  # no leftover temporary dir
