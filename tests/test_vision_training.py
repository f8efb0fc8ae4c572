"""Training and generation with images (issue 6, item 4) on a tiny random Qwen2.5-VL, against transformers + PEFT.

- the train step with images (a list of collated micro-batches: accumulation over micro-batches whose patch counts
  differ) gives the LoRA gradients of torch autograd through PEFT, vision and language adapters alike (1e-4);
- the three checkpointing modes ("unsloth", True, False) give the same gradients;
- SFTTrainer with UnslothVisionDataCollator (Unsloth's arguments) lowers the loss, evaluates as compute_loss,
  and resumes from an orbax checkpoint bit-identically (LoRA dropout included);
- greedy `generate` with an image is token-identical to transformers' generate through PEFT;
- the README's "Vision models" example runs as written; benchmarks/vl_train_step.py runs its tiny smoke shape.
"""

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")  # transformers' Qwen-VL processors need it
Image = pytest.importorskip("PIL.Image")

from peft import PeftModel  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from conftest import rel_l2  # noqa: E402
from fastlora_jax import FastVisionModel, training  # noqa: E402
from fastlora_jax.tiny import write_tiny_qwen2_vl  # noqa: E402
from fastlora_jax.trainer import SFTConfig, SFTTrainer, TrainerCallback  # noqa: E402
from fastlora_jax.vision_data import UnslothVisionDataCollator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, fp32 model, processor)."""
    model_dir = write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "base", variant="qwen2_5_vl", seed=7)
    model, processor = FastVisionModel.from_pretrained(str(model_dir), load_in_4bit=False, dtype="float32",
                                                       max_seq_length=256)
    return model_dir, model, processor


def records(n, sizes=((56, 56),), seed=0):
    """Chat records: a solid-colour image (a little noise) and a question; the reply names the colour."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        h, w = sizes[i % len(sizes)]
        pixels = np.clip(np.array(COLORS[name]) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]})
    return out


def peft_model(model, mode=True, dropout=0.0, **kwargs):
    """LoRA on every linear of both stacks (Unsloth's flags all on), B random so that A gets gradients."""
    return FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout, random_state=0,
                                          use_gradient_checkpointing=mode, init_lora_weights=False, **kwargs)


def capture_gradients():
    """An optax transformation whose state after a step is that step's (token-averaged) gradients."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_gradients(model, micro_batches):
    step = training.make_train_step(model, capture_gradients())
    params = jax.tree.map(jnp.array, model.lora_params)
    _, grads, metrics = step(params, capture_gradients().init(params), micro_batches, None)
    return grads, metrics


def state_numpy(state):
    return {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, np.float32) for k, v in state.items()}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------ train step


def test_train_step_gradients_with_images_match_peft(tiny, tmp_path):
    """Two micro-batches with different image sizes (different patch counts and lengths) accumulated in one step,
    and the same rows as one micro-batch: both equal torch autograd through PEFT of the token-averaged loss."""
    model_dir, base, processor = tiny
    model = peft_model(base)
    assert any("visual" in n for n in model.targeted_module_names)
    assert any("language_model" in n for n in model.targeted_module_names)
    collator = UnslothVisionDataCollator(model, processor)
    data = records(3, sizes=((56, 56), (56, 112), (84, 56)), seed=1)
    parts = [collator(data[:1]), collator(data[1:])]
    assert parts[0]["pixel_values"].shape[0] != parts[1]["pixel_values"].shape[0]
    accumulated, metrics = step_gradients(model, parts)
    together, metrics_one = step_gradients(model, [collator(data)])
    assert int(metrics["tokens"]) == int(metrics_one["tokens"])
    assert float(metrics["loss"]) == pytest.approx(float(metrics_one["loss"]), rel=1e-5)

    model.save_pretrained(tmp_path / "adapter")
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                                     attn_implementation="eager")
    loaded = PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter"), is_trainable=True)
    total, count = 0.0, 0
    for part in parts:
        batch = {k: torch.from_numpy(np.asarray(v, np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer)
                                                else np.float32)) for k, v in part.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        out = loaded(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
        total = total + out.loss * n
        count += n
    loss = total / count
    loss.backward()
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    torch_grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded, state_dict=torch_grads, save_embedding_layers=False))
    for grads in (accumulated, together):
        ours = state_numpy(model.peft_state_dict(grads))
        assert set(ours) == set(theirs)
        for key in theirs:
            assert np.abs(theirs[key]).max() > 0, key
            assert rel_l2(ours[key], theirs[key]) < 1e-4, key


def test_checkpointing_modes_give_the_same_gradients(tiny):
    _, base, processor = tiny
    batch = [UnslothVisionDataCollator(base, processor)(records(2, sizes=((56, 56), (56, 84))))]
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unsloth" on the CPU: no pinned host memory, recomputes as True
        for mode in ("unsloth", True, False):
            results[mode] = leaves(step_gradients(peft_model(base, mode=mode), batch)[0])
    for mode in ("unsloth", False):  # the same math; XLA may fuse (and so round) differently: fp32 rounding (1e-7)
        for a, b in zip(results[mode], results[True]):  # over the layers' chains (1.09e-6 seen on an AMD EPYC)
            assert np.abs(b).max() > 0 and rel_l2(a, b) < 1e-5


def test_image_batches_are_named_when_stacked_or_given_to_a_text_model(tiny):
    _, base, processor = tiny
    model = peft_model(base)
    batch = UnslothVisionDataCollator(model, processor)(records(1))
    step = training.make_train_step(model, optax.sgd(1e-3))
    stacked = {k: np.asarray(v)[None] for k, v in batch.items()}
    with pytest.raises(ValueError, match="list of micro-batches"):
        step(model.lora_params, optax.sgd(1e-3).init(model.lora_params), stacked, None)
    with pytest.raises(ValueError, match="image tokens"):
        bad = dict(batch, input_ids=np.where(batch["input_ids"] == base.cfg.image_token_id, 5, batch["input_ids"]))
        model.prepare_training_batch(bad)


# ------------------------------------------------------------------------------------------ SFTTrainer


def vision_args(out, **overrides):
    """Unsloth's vision-notebook SFTConfig (with CPU-sized steps)."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=8,
                    learning_rate=3e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                    optim="adamw_8bit", weight_decay=0.01, seed=3407, report_to="none", save_strategy="no",
                    remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                    disable_tqdm=True)
    return SFTConfig(**{**settings, **overrides})


def test_sft_trainer_with_the_vision_collator_lowers_the_loss(tiny, tmp_path):
    _, base, processor = tiny
    model = peft_model(base, mode="unsloth")
    collator = UnslothVisionDataCollator(model, processor, pad_to_multiple_of=16)
    data = records(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=data,
                             eval_dataset=data[:2], args=vision_args(tmp_path / "out"))
        before = trainer.evaluate()
        batch = collator(data[:2])
        direct = model.compute_loss(model.lora_params, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    batch["pixel_values"], batch["image_grid_thw"], batch["mm_token_type_ids"])
        assert before["eval_loss"] == pytest.approx(float(direct), rel=1e-5)
        result = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h and "eval_loss" not in h]
    assert len(losses) == 8 and result.global_step == 8
    # the tiny model's frozen head (std 0.02, hidden 64) caps its logits near +-1.5, so the loss cannot fall far
    # below ln(vocab) = 6.2; the adapters still move it down steadily
    assert losses[-1] < losses[0] - 0.3 and all(b < a + 0.05 for a, b in zip(losses, losses[1:])), losses
    assert result.metrics["eval_loss"] < before["eval_loss"] - 0.3
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "processor_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == model.adapter_config()["target_modules"]


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_resume_from_checkpoint_is_bit_identical(tiny, tmp_path):
    """Accumulation over two micro-batches of different image sizes, LoRA dropout on: killed after step 3
    (last checkpoint: step 2), resumed, the LoRA params equal an uninterrupted run's bit for bit."""
    _, base, processor = tiny
    model = peft_model(base, mode=False, dropout=0.1)
    initial = jax.tree.map(jnp.array, model.lora_params)
    collator = UnslothVisionDataCollator(model, processor, pad_to_multiple_of=16)
    data = records(6, sizes=((56, 56), (56, 84)))

    def run(out, resume=None, callbacks=()):
        model.lora_params = jax.tree.map(jnp.array, initial)
        args = vision_args(out, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=4,
                           learning_rate=5e-3, warmup_steps=1, lr_scheduler_type="linear", save_strategy="steps",
                           save_steps=2)
        trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=data,
                             args=args, callbacks=list(callbacks))
        return trainer, trainer.train(resume_from_checkpoint=resume)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, full = run(tmp_path / "full")
        expected = leaves(model.lora_params)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "killed", callbacks=[KillAt(3)])
        assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = run(tmp_path / "killed", resume=True)
    assert not [w for w in caught if "different settings" in str(w.message)]
    for a, b in zip(expected, leaves(model.lora_params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.training_loss == full.training_loss
    assert any(not np.array_equal(a, b) for a, b in zip(expected, leaves(initial)))


def test_trainer_arguments_for_images_are_checked(tiny, tmp_path):
    _, base, processor = tiny
    model = peft_model(base)
    collator = UnslothVisionDataCollator(model, processor)
    with pytest.raises(ValueError, match="data_collator=UnslothVisionDataCollator"):
        SFTTrainer(model=model, tokenizer=processor, train_dataset=records(2), args=SFTConfig(disable_tqdm=True))
    with pytest.raises(ValueError, match="packing"):
        SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=records(2),
                   args=vision_args(tmp_path, packing=True))
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=records(2),
                         args=vision_args(tmp_path))
    with pytest.raises(ValueError, match="collator chooses"):
        trainer.set_response_only()
    with pytest.raises(ValueError, match="image part without an image"):
        bad = records(2)
        bad[1]["messages"][0]["content"][0] = {"type": "image"}
        SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=bad,
                   args=vision_args(tmp_path, per_device_train_batch_size=2))


# ------------------------------------------------------------------------------------------ generation


def test_greedy_generation_with_images_is_transformers_through_peft(tiny, tmp_path):
    """Two left-padded prompts with images of different sizes: greedy ids equal transformers' generate of the
    same model with the same adapter (PeftModel), also when a row stops at eos early."""
    model_dir, base, processor = tiny
    model = peft_model(base)
    model.save_pretrained(tmp_path / "adapter")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))]
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
               [{"role": "user", "content": [{"type": "text", "text": "What is in the picture? Say it"},
                                             {"type": "image"}]}]]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in prompts]
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=texts, images=[[images[0]], [images[1]]], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "right"
    assert (batch["attention_mask"] == 0).any()

    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    hf = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()

    def theirs(**kwargs):
        with torch.no_grad():
            return hf.generate(**batch, do_sample=False, **kwargs).numpy()

    ours = model.generate(batch, max_new_tokens=10, do_sample=False)
    expected = theirs(max_new_tokens=10)
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(ours, base.generate(batch, max_new_tokens=10))  # the adapter changes the output
    # a row that emits eos is padded afterwards, as transformers does
    eos = int(expected[1, batch["input_ids"].shape[1] + 2])
    stopped = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch["image_grid_thw"], batch["mm_token_type_ids"], max_new_tokens=10,
                             eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(stopped, theirs(max_new_tokens=10, eos_token_id=eos, pad_token_id=0))


def test_readme_vision_example_runs(tiny, tmp_path, monkeypatch):
    """The README's "Vision models" block as written, on the tiny checkpoint (16-bit, 2 steps)."""
    import re
    model_dir, _, _ = tiny
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Vision models.*?```python\n(.*?)```", text, re.S).group(1)
    for old, new in (('"Qwen/Qwen2.5-VL-7B-Instruct", load_in_4bit=True', f"{str(model_dir)!r}, load_in_4bit=False"),
                     ("max_steps=30", "max_steps=2")):
        assert old in block
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope = {"conversations": records(8), "pil_image": records(1)[0]["messages"][0]["content"][0]["image"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ benchmark


def test_vl_train_step_benchmark_smoke(capsys):
    """benchmarks/vl_train_step.py on its tiny shape, both modes, in this process (16-bit base: quantizing the
    random base on the CPU would take most of the time; NF4 for this family is tested in test_qwen2_vl.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("vl_train_step", ROOT / "benchmarks" / "vl_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.main(["--shape", "tiny", "--steps", "1", "--seq", "128", "--image", "56", "--no-4bit", "--in-process"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["vision+language", "language-only"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and np.isfinite(row["loss"]) and row["image_tokens"] == 4
        assert row["seq"] == 128 and row["image_patches"] == 16
    assert rows[0]["trainable_params"] > rows[1]["trainable_params"] > 0
