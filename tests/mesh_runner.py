"""The multi-device scenarios of tests/test_sharding.py, each run in a process of its own.

The test process has imported jax with one CPU device; virtual devices exist only in a process that sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` before jax starts, which is what the tests do when they
start this script:

    python tests/mesh_runner.py equivalence OUT llama DIR          # meshes of 4 (and 8) devices vs one device
    python tests/mesh_runner.py equivalence OUT qwen2_5_vl DIR     # the same for a vision-language model
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
    nf4 = jax.tree_util.tree_leaves_with_path(model.base_params, is_leaf=lambda x: isinstance(x, NF4Weight))
    for path, leaf in nf4:
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


def write_bnb_checkpoint(src: Path, dst: Path) -> Path:
    """`src` with every projection stored as transformers writes a bnb-4bit NF4 checkpoint."""
    import shutil

    import jax.numpy as jnp

    from fastlora_jax.convert.hf_checkpoint import find_checkpoint_files, iter_tensors, save_tensors
    from fastlora_jax.quant import NF4Weight
    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, array in iter_tensors(find_checkpoint_files(src)):
        if name.endswith("_proj.weight"):
            for suffix, value in NF4Weight.quantize(jnp.asarray(array)).to_bnb().items():
                state[name + ("." + suffix if suffix else "")] = value
        else:
            state[name] = array
    save_tensors(state, dst)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


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


def equivalence(out: Path, kind: str, model_dir: str) -> None:
    """Loss, LoRA gradients and logits of `kind` ("llama" or "qwen2_5_vl") on every mesh of MESHES that fits the
    devices, against the one-device run; the base's bytes and shards. With "llama" also the fused NF4 kernel's
    per-device wrapper under a mesh."""
    import jax
    import jax.numpy as jnp

    from fastlora_jax import FastLanguageModel, FastVisionModel, sharding
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    arrays, facts = {}, {"timings": {}, "meshes": []}

    def run(load, peft, batch, logits_of, logits_on=("data2_fsdp2",)):
        t0 = time.perf_counter()
        base1 = load(None)
        model1 = peft(base1)
        loss1, grads1 = step_gradients(model1, batch)
        arrays["single/logits"] = logits_of(model1)
        arrays["single/loss"] = np.float64(loss1)
        arrays.update({f"single/grad/{k}": v for k, v in grads1.items()})
        facts["timings"]["single"] = round(time.perf_counter() - t0, 1)
        for name, (data, fsdp) in MESHES.items():
            if data * fsdp > jax.device_count():
                continue
            t0 = time.perf_counter()
            base = load(mesh_named(name))
            facts[name] = base_facts(base, base1)
            model = peft(base)
            loss, grads = step_gradients(model, batch)
            if name in logits_on:  # the forward pass (model(...)) on one mesh: each costs a compilation
                arrays[f"{name}/logits"] = logits_of(model)
            arrays[f"{name}/loss"] = np.float64(loss)
            arrays.update({f"{name}/grad/{k}": v for k, v in grads.items()})
            facts["meshes"].append(name)
            facts["timings"][name] = round(time.perf_counter() - t0, 1)

    lora = dict(r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=True, init_lora_weights=False)
    if kind == "llama":
        batch = llama_batch()
        run(lambda mesh: FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, load_in_4bit=True,
                                                           dtype="float32", mesh=mesh)[0],
            lambda base: FastLanguageModel.get_peft_model(base, target_modules=TARGETS, **lora), batch,
            lambda m: np.asarray(m(batch["input_ids"][0], attention_mask=batch["attention_mask"][0]).logits))
    else:
        _, processor = FastVisionModel.from_pretrained(model_dir, load_in_4bit=True, dtype="float32",
                                                       max_seq_length=256)
        collated = [UnslothVisionDataCollator(None, processor)(image_records(8))]
        mb = collated[0]
        run(lambda mesh: FastVisionModel.from_pretrained(model_dir, load_in_4bit=True, dtype="float32",
                                                         max_seq_length=256, mesh=mesh)[0],
            lambda base: FastVisionModel.get_peft_model(base, **lora), collated,
            lambda m: np.asarray(m(mb["input_ids"], attention_mask=mb["attention_mask"],
                                   pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"]).logits))
    if kind != "llama":
        np.savez(out.with_suffix(".npz"), **arrays)
        out.with_suffix(".json").write_text(json.dumps(facts))
        return

    # A bnb-4bit checkpoint (written from our NF4, which is bnb's format bit for bit) on data=2 x fsdp=2: the
    # packed bytes read by slices, the rest placed, everything equal to the one-device load.
    t0 = time.perf_counter()
    bnb_dir = write_bnb_checkpoint(Path(model_dir), out.parent / "llama-bnb")
    mesh = mesh_named("data2_fsdp2")
    one = FastLanguageModel.from_pretrained(str(bnb_dir), max_seq_length=64)[0]
    sharded = FastLanguageModel.from_pretrained(str(bnb_dir), max_seq_length=64, mesh=mesh)[0]
    facts["bnb"] = {**base_facts(sharded, one), "source": sharded.weights_source}
    # greedy generation (KV cache) on the mesh
    prompt = [[1, 17, 93, 204, 51, 7]]
    facts["generate"] = {"single": np.asarray(one.generate(prompt, max_new_tokens=4, do_sample=False)).tolist(),
                         "mesh": np.asarray(sharded.generate(prompt, max_new_tokens=4, do_sample=False)).tolist()}
    facts["timings"]["bnb_and_generate"] = round(time.perf_counter() - t0, 1)

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


def eval_and_merge(trainer, directory: Path) -> float:
    """The eval loss over 8 records (batches split over the mesh) and the merged 16-bit export in `directory`."""
    from fastlora_jax.data import bundled_dataset_path, load_records
    eval_loss = trainer.evaluate(eval_dataset=load_records(bundled_dataset_path())[24:32])["eval_loss"]
    trainer.model.save_pretrained_merged(directory, trainer.processing_class)
    return eval_loss


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
                              "eval_loss": eval_and_merge(trainer, work / "merged-mesh"),
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
                       "eval_loss": eval_and_merge(trainer, work / "merged-single"),
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
