"""The multi-device scenarios of tests/test_sharding.py, each run in a process of its own.

The test process has imported jax with one CPU device; virtual devices exist only in a process that sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` before jax starts, which is what the tests do when they
start this script:

    python tests/mesh_runner.py equivalence OUT LLAMA_DIR VL_DIR   # 8 devices: meshes of 4 and 8 vs one device
    python tests/mesh_runner.py trainer OUT LLAMA_DIR WORK_DIR      # 4 devices: SFTTrainer on data=2 x fsdp=2
    python tests/mesh_runner.py distributed OUT LLAMA_DIR WORK_DIR  # one of 2 processes (jax.distributed env)

Each scenario writes what it measured (arrays in OUT.npz, the rest in OUT.json); the tests compare. Nothing is
asserted here, so a failure is reported by pytest with the values.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

MESHES = {"data4": (4, 1), "fsdp4": (1, 4), "data2_fsdp2": (2, 2), "data2_fsdp4": (2, 4)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def mesh_named(name: str):
    import jax

    from fastlora_jax import sharding
    data, fsdp = MESHES[name]
    return sharding.make_mesh(data=data, fsdp=fsdp, devices=jax.devices()[:data * fsdp])


def capture_gradients():
    """An optax transformation whose state after a step is that step's gradients (test_vision_training's)."""
    import jax
    import jax.numpy as jnp
    import optax
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_gradients(model, batch):
    """(loss, LoRA gradients as PEFT's state dict) of one train step, through the train step itself."""
    import jax
    import jax.numpy as jnp

    from fastlora_jax import sharding, training
    step = training.make_train_step(model, capture_gradients())
    params = jax.tree.map(jnp.array, model.lora_params)
    opt_state = capture_gradients().init(params)
    if model.mesh is not None:
        params, opt_state = sharding.place((params, opt_state), sharding.replicated(model.mesh))
    _, grads, metrics = step(params, opt_state, batch, None)
    return float(metrics["loss"]), {k: np.asarray(v) for k, v in model.peft_state_dict(grads).items()}


def base_facts(model, reference) -> dict:
    """Whether every base leaf equals the single-device load bit for bit, and what each device holds of the NF4
    packed bytes (per weight: the fraction of the bytes on each device) and of the whole base."""
    import jax

    from fastlora_jax.quant import NF4Weight
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(model.base_params), jax.tree.leaves(reference.base_params)))
    fractions = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.base_params, is_leaf=lambda x: isinstance(x, NF4Weight)):
        if isinstance(leaf, NF4Weight):
            name = jax.tree_util.keystr(path)
            fractions[name] = [shard.data.size / leaf.packed.size for shard in leaf.packed.addressable_shards]
    per_device: dict[int, int] = {}
    total = 0
    for leaf in jax.tree.leaves(model.base_params):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return {"bytes_equal": bool(same), "packed_fractions": fractions,
            "max_device_fraction": max(per_device.values()) / total}


def llama_batch():
    rng = np.random.default_rng(1606)
    ids = rng.integers(4, 512, (1, 8, 32)).astype(np.int32)
    labels = ids.copy()
    labels[:, :, :5] = -100  # a prompt that is not trained on
    mask = np.ones_like(ids)
    mask[0, 3, 20:] = 0  # a padded row
    labels[0, 3, 20:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def image_records(n, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        pixels = np.clip(np.array(COLORS[name]) + rng.integers(-20, 20, (56, 56, 3)), 0, 255).astype(np.uint8)
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": "What colour is this?" + " more" * (i % 3)}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]})
    return out


def equivalence(out: Path, llama_dir: str, vl_dir: str) -> None:
    """Loss, LoRA gradients and logits on every mesh of MESHES against the one-device run; the base's bytes and
    shards; the fused NF4 kernel (interpret mode) per device under a mesh."""
    import jax
    import jax.numpy as jnp

    from fastlora_jax import FastLanguageModel, FastVisionModel, sharding
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    arrays, facts = {}, {"timings": {}}

    def run(kind, load, peft, batch, logits_of):
        t0 = time.perf_counter()
        base1 = load(None)
        model1 = peft(base1)
        loss1, grads1 = step_gradients(model1, batch)
        arrays[f"{kind}/single/logits"] = logits_of(model1)
        arrays[f"{kind}/single/loss"] = np.float64(loss1)
        arrays.update({f"{kind}/single/grad/{k}": v for k, v in grads1.items()})
        facts["timings"][f"{kind}/single"] = round(time.perf_counter() - t0, 1)
        for name in MESHES:
            t0 = time.perf_counter()
            base = load(mesh_named(name))
            facts[f"{kind}/{name}"] = base_facts(base, base1)
            model = peft(base)
            loss, grads = step_gradients(model, batch)
            arrays[f"{kind}/{name}/logits"] = logits_of(model)
            arrays[f"{kind}/{name}/loss"] = np.float64(loss)
            arrays.update({f"{kind}/{name}/grad/{k}": v for k, v in grads.items()})
            facts["timings"][f"{kind}/{name}"] = round(time.perf_counter() - t0, 1)

    lora = dict(r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=True, init_lora_weights=False)
    batch = llama_batch()
    run("llama", lambda mesh: FastLanguageModel.from_pretrained(llama_dir, max_seq_length=64, load_in_4bit=True,
                                                                 dtype="float32", mesh=mesh)[0],
        lambda base: FastLanguageModel.get_peft_model(base, target_modules=TARGETS, **lora), batch,
        lambda m: np.asarray(m(batch["input_ids"][0], attention_mask=batch["attention_mask"][0]).logits))

    if vl_dir:
        _, processor = FastVisionModel.from_pretrained(vl_dir, load_in_4bit=True, dtype="float32", max_seq_length=256)
        records = image_records(8)

        def vl_peft(base):
            return FastVisionModel.get_peft_model(base, **lora)

        def vl_batch():
            return [UnslothVisionDataCollator(None, processor)(records)]

        collated = vl_batch()
        run("qwen2_5_vl", lambda mesh: FastVisionModel.from_pretrained(vl_dir, load_in_4bit=True, dtype="float32",
                                                                        max_seq_length=256, mesh=mesh)[0],
            vl_peft, collated,
            lambda m: np.asarray(m(collated[0]["input_ids"], attention_mask=collated[0]["attention_mask"],
                                   pixel_values=collated[0]["pixel_values"],
                                   image_grid_thw=collated[0]["image_grid_thw"]).logits))

    # The fused NF4 kernel's wrapper as base_matmul uses it under a mesh (per_device_rows: shard_map over the rows,
    # the NF4 weight gathered from its fsdp shards). The kernel itself cannot run here: Pallas' GPU interpreter keeps
    # global state that concurrent per-device calls trip over ("Barrier remains allocated"), so the wrapped
    # function is the kernel's reference (tests/test_nf4_matmul.py checks the kernel against it).
    from fastlora_jax.kernels import nf4_matmul
    from fastlora_jax.quant import NF4Weight
    rng = np.random.default_rng(7)
    mesh = mesh_named("data2_fsdp2")
    w = NF4Weight.quantize(jnp.asarray(rng.standard_normal((128, 128)) * 0.05, jnp.bfloat16))
    x = jnp.asarray(rng.standard_normal((1024, 128)), jnp.bfloat16)
    specs = sharding.partition_specs(w, w.weight_shape, "linear", mesh.shape["fsdp"], stacked=False)
    w_sharded = sharding.place(w, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))
    facts["kernel_weight_sharding"] = str(w_sharded.packed.sharding.spec)
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, x.shape, 0))
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
        local = sharding.local_rows(x.shape[0])
        kernel = jax.jit(lambda x, w: sharding.per_device_rows(nf4_matmul.nf4_matmul_reference, x, w))(x_sharded,
                                                                                                     w_sharded)
    facts["kernel"] = {"local_rows": local, "supported_local": bool(nf4_matmul.supported(local, 128, 128)),
                       "out_sharding": str(kernel.sharding.spec), "seconds": round(time.perf_counter() - t0, 1)}
    arrays["kernel/mesh"] = np.asarray(kernel, np.float32)
    arrays["kernel/reference"] = np.asarray(nf4_matmul.nf4_matmul_reference(x, w), np.float32)
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(facts))


# ------------------------------------------------------------------------------------------ trainer


def train_run(llama_dir: str, output_dir: Path, mesh, per_device: int, callbacks=(), resume=False, max_steps=4):
    """The trainer run the trainer and distributed scenarios share: NF4 tiny Llama, LoRA with dropout (the keys
    of a step must not depend on the mesh), 2 micro-batches accumulated, a checkpoint every 2 steps."""
    from fastlora_jax import FastLanguageModel
    from fastlora_jax.data import bundled_dataset_path, load_records
    from fastlora_jax.trainer import SFTConfig, SFTTrainer
    base, tokenizer = FastLanguageModel.from_pretrained(llama_dir, max_seq_length=64, load_in_4bit=True,
                                                        dtype="float32", mesh=mesh)
    model = FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                                             use_gradient_checkpointing=True, random_state=0)
    config = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=per_device,
                       gradient_accumulation_steps=2, max_steps=max_steps, save_steps=2, logging_steps=1,
                       learning_rate=1e-3, seed=0, disable_tqdm=True, mesh="none" if mesh is None else None)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config, callbacks=list(callbacks),
                         train_dataset=load_records(bundled_dataset_path())[:24])
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [h["loss"] for h in trainer.history if "loss" in h and "train_runtime" not in h]
    return trainer, result, losses


class StopAt:
    """Raises at the end of a step: training stops there, as a killed run would (the checkpoints stay)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt(f"stopped at step {step}")


def trainer_scenario(out: Path, llama_dir: str, work: str) -> None:
    import jax

    from fastlora_jax import sharding
    work = Path(work)
    mesh = sharding.make_mesh(data=2, fsdp=2)
    facts = {"devices": jax.device_count()}
    t0 = time.perf_counter()
    trainer, result, losses = train_run(llama_dir, work / "uninterrupted", mesh, per_device=2)
    facts["uninterrupted"] = {"losses": losses, "micro_batch": trainer.micro_batch,
                              "rows_per_step": trainer.rows_per_step, "mesh": sharding.describe(trainer.mesh),
                              "seconds": round(time.perf_counter() - t0, 1)}
    state = trainer.checkpoint_dir / "4" / "state"
    facts["checkpoint_files"] = sorted(p.name for p in state.iterdir()) if state.is_dir() else []
    t0 = time.perf_counter()
    try:
        train_run(llama_dir, work / "interrupted", mesh, per_device=2, callbacks=[StopAt(3)])
        facts["stopped"] = False
    except KeyboardInterrupt:
        facts["stopped"] = True
    from fastlora_jax.trainer import _latest_step
    facts["latest_after_stop"] = _latest_step(work / "interrupted" / "checkpoints")
    trainer, _, losses = train_run(llama_dir, work / "interrupted", mesh, per_device=2, resume=True)
    facts["resumed"] = {"from": None if trainer.resumed_from is None else trainer.resumed_from[1], "losses": losses,
                        "seconds": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    trainer, _, losses = train_run(llama_dir, work / "single", None, per_device=8)
    facts["single"] = {"losses": losses, "micro_batch": trainer.micro_batch, "mesh": sharding.describe(trainer.mesh),
                       "seconds": round(time.perf_counter() - t0, 1)}
    out.with_suffix(".json").write_text(json.dumps(facts))


def distributed_scenario(out: Path, llama_dir: str, work: str) -> None:
    """One process of a two-process jax.distributed run (the environment names the coordinator and this process)."""
    import jax

    from fastlora_jax import sharding
    t0 = time.perf_counter()
    initialized = sharding.initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    mesh = sharding.resolve_mesh("data=2,fsdp=2")
    trainer, _, losses = train_run(llama_dir, Path(work) / "distributed", mesh, per_device=2)
    facts = {"initialized": initialized, "process_index": jax.process_index(), "process_count": jax.process_count(),
             "devices": jax.device_count(), "local_devices": jax.local_device_count(), "losses": losses,
             "mesh": sharding.describe(trainer.mesh), "seconds": round(time.perf_counter() - t0, 1)}
    out.with_suffix(f".{jax.process_index()}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    scenario, out, *rest = sys.argv[1:]
    {"equivalence": equivalence, "trainer": trainer_scenario, "distributed": distributed_scenario}[scenario](
        Path(out), *rest)
