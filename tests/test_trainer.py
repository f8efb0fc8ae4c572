"""SFTTrainer: overfitting, exact resume, gradient accumulation, checkpoints, CLI train/export.

LoRA on q_proj, v_proj and lm_head, no gradient checkpointing: the same training code with a smaller graph
to compile on the CPU (the tiny model's frozen lm_head, std 0.02, cannot reach low losses on its own).
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastlora_jax import FastLanguageModel, training
from fastlora_jax.data import IGNORE_INDEX, bundled_dataset_path, load_records, prepare_dataset
from fastlora_jax.trainer import SFTConfig, SFTTrainer, TrainerCallback, TrainingArguments, train_on_responses_only

TARGETS = ["lm_head", "q_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from fastlora_jax.tiny import write_tiny_llama
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def base(model_dir):
    return FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, load_in_4bit=False)


@pytest.fixture(scope="module")
def records():
    return load_records(bundled_dataset_path())


def peft(base_model, dropout=0.0, r=8):
    return FastLanguageModel.get_peft_model(base_model, r=r, lora_alpha=16, target_modules=TARGETS,
                                            lora_dropout=dropout, use_gradient_checkpointing=False, random_state=0)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_overfit_one_batch(base, records, tmp_path):
    model_b, tokenizer = base
    model = peft(model_b)
    initial = leaves(model.lora_params)
    batch = records[:2]
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=40,
                     learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, eval_strategy="steps",
                     eval_steps=20, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=batch, eval_dataset=batch, args=args)
    start = trainer.evaluate()["eval_loss"]
    data = trainer.eval_data
    direct = float(model.compute_loss(model.lora_params, data.input_ids, data.labels, data.attention_mask))
    assert start == pytest.approx(direct, rel=1e-5)  # eval loss = compute_loss over the whole eval set

    result = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.history if "eval_loss" in h]
    assert len(losses) == 40 and losses[0] == pytest.approx(start, rel=1e-5)  # dropout 0: step 1 sees the start
    assert losses[-1] < 0.5 * losses[0], losses
    assert evals[-1] < evals[0] < start
    assert result.global_step == 40 and result.training_loss == pytest.approx(np.mean(losses), rel=1e-6)
    assert result.metrics["eval_loss"] < 0.5 * start
    assert any(not np.array_equal(a, b) for a, b in zip(initial, leaves(model.lora_params)))
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()  # save_strategy="no"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 40 and len(state["log_history"]) == len(trainer.history)


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt("simulated kill")


class Started(TrainerCallback):
    def on_train_begin(self, trainer):
        self.global_step = trainer.state.global_step


def test_resume_after_kill_is_exact(base, records, tmp_path):
    """A run killed after step 5 (last checkpoint: step 4, plus an unfinished save of step 6 left on disk)
    and resumed ends bit-identical to an uninterrupted run, LoRA dropout included."""
    model_b, tokenizer = base
    model = peft(model_b, dropout=0.1)
    initial = jax.tree.map(jnp.array, model.lora_params)

    def run(out, resume=None, callbacks=()):
        model.lora_params = jax.tree.map(jnp.array, initial)
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=6, learning_rate=5e-3, warmup_steps=2, logging_steps=1, save_steps=2,
                         save_total_limit=2, disable_tqdm=True, seed=1)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records[:10], args=args,
                             callbacks=list(callbacks))
        return trainer, trainer.train(resume_from_checkpoint=resume)

    full_trainer, full = run(tmp_path / "full")
    expected = leaves(model.lora_params)
    lrs = [h["learning_rate"] for h in full_trainer.history if "loss" in h]
    np.testing.assert_allclose(lrs, [0, 2.5e-3, 5e-3, 3.75e-3, 2.5e-3, 1.25e-3], rtol=1e-6)  # warmup 2, linear
    ckpt = tmp_path / "full" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["4", "6"]  # save_total_limit=2; no temporary directory left

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", callbacks=[KillAt(5)])
    ckpt = tmp_path / "killed" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["2", "4"]
    assert all((ckpt / s / "commit_success.txt").is_file() for s in ("2", "4"))
    partial = ckpt / "6.orbax-checkpoint-tmp-1700000000000000"  # what a kill during a save leaves behind
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 10)

    started = Started()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed_trainer, resumed = run(tmp_path / "killed", resume=True, callbacks=[started])
    assert not [w for w in caught if "different settings" in str(w.message)]
    assert started.global_step == 4  # the unfinished save was ignored
    assert sorted(os.listdir(ckpt)) == ["4", "6"]  # and cleaned up
    for a, b in zip(expected, leaves(model.lora_params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.global_step == full.global_step == 6
    assert resumed.training_loss == full.training_loss
    strip = lambda hist: [{k: v for k, v in h.items() if "second" not in k and "runtime" not in k} for h in hist]
    assert strip(resumed_trainer.history) == strip(full_trainer.history)

    # resuming a finished run changes nothing; a checkpoint path works too
    run(tmp_path / "killed", resume=str(ckpt / "6"))
    for a, b in zip(expected, leaves(model.lora_params)):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_matches_one_big_batch(base, records):
    model_b, tokenizer = base
    model = peft(model_b)
    data = prepare_dataset(records[:2], tokenizer, 64)
    rows = {k: v for k, v in data.take(np.array([0, 1])).items()}
    # Plain SGD with lr 1: the update is the (accumulated) gradient itself. (Adam's first update is about
    # lr * sign(g), where a gradient near eps amplifies float noise.)
    optimizer = optax.sgd(learning_rate=1.0)
    step = training.make_train_step(model, optimizer)
    results = []
    for accum, micro in ((2, 1), (1, 2)):
        params = jax.tree.map(jnp.array, model.lora_params)
        batch = {k: v.reshape(accum, micro, -1) for k, v in rows.items()}
        params, _, metrics = step(params, optimizer.init(params), batch, None)
        results.append((leaves(params), float(metrics["loss"]), int(metrics["tokens"])))
    (p21, loss21, tok21), (p12, loss12, tok12) = results
    assert tok21 == tok12 and loss21 == pytest.approx(loss12, rel=1e-6)
    for a, b in zip(p21, p12):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert any(not np.array_equal(a, b) for a, b in zip(p21, leaves(model.lora_params)))


def test_train_on_responses_only(base, records):
    model_b, tokenizer = base
    model = peft(model_b)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=records[:4],
                         args=SFTConfig(max_steps=1, disable_tqdm=True))
    everything = trainer.train_data.num_label_tokens
    train_on_responses_only(trainer, instruction_part="<|user|>\n", response_part="<|assistant|>\n")
    labels = trainer.train_data.labels
    for row, record in enumerate(records[:4]):
        trained = labels[row][labels[row] != IGNORE_INDEX]
        assert tokenizer.decode(trained, skip_special_tokens=True) == record["messages"][-1]["content"]
    assert trainer.train_data.num_label_tokens < everything
    by_template = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=records[:4],
                             args=SFTConfig(max_steps=1, assistant_only_loss=True))
    np.testing.assert_array_equal(by_template.train_data.labels, labels)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_logged_learning_rate_is_the_optimizers(base, records, schedule):
    """With a constant gradient of 1 (no clipping, no decay) every AdamW update is -lr_t."""
    model_b, tokenizer = base
    trainer = SFTTrainer(model=peft(model_b), processing_class=tokenizer, train_dataset=records[:4],
                         args=SFTConfig(max_steps=10, warmup_steps=3, learning_rate=1e-3, lr_scheduler_type=schedule,
                                        max_grad_norm=0, disable_tqdm=True))
    optimizer = trainer.create_optimizer(10)
    params = {"w": jnp.zeros(())}
    state = optimizer.init(params)
    for step in range(1, 11):
        updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
        assert float(-updates["w"]) == pytest.approx(trainer.learning_rate_at(step, 10), rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("kwargs, message", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0"),
    ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps=1.5"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0"),
    ({"max_steps": 0}, "max_steps=0"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type='polynomial'"),
    ({"save_total_limit": 0}, "save_total_limit=0"),
    ({"logging_steps": 2.5}, "logging_steps=2.5"),
    ({"optim": "sgd"}, "optim='sgd'"),
    ({"packing_strategy": "ffd"}, "packing_strategy='ffd'"),
    ({"max_seq_length": 128, "max_length": 64}, "max_seq_length=128 and max_length=64"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainingArguments(**kwargs)


def test_bad_trainer_inputs(base, records, tmp_path):
    model_b, tokenizer = base
    model = peft(model_b)
    with pytest.raises(ValueError, match="get_peft_model"):
        SFTTrainer(model=model_b, processing_class=tokenizer, train_dataset=records)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_sequence_length'\]"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records, max_sequence_length=4)
    with pytest.raises(ValueError, match="eval_strategy='steps' needs an eval_dataset"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records,
                   args=SFTConfig(eval_strategy="steps"))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records,
                         args=SFTConfig(output_dir=str(tmp_path), disable_tqdm=True))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    # Unsloth's older keywords on the trainer override args
    legacy = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=[{"body": "a b c"}],
                        dataset_text_field="body", max_seq_length=16, args=SFTConfig(disable_tqdm=True))
    assert legacy.max_seq_length == 16 and legacy.args.dataset_text_field == "body"


def test_cli_train_and_merged_export(model_dir, records, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastlora_jax import cli

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    rc = cli.main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
                   "--max-steps", "3", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--r", "4",
                   "--target-modules", ",".join(TARGETS), "--no-load-in-4bit", "--gradient-checkpointing", "false",
                   "--max-seq-length", "64", "--save-steps", "2", "--quiet"])
    assert rc == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == TARGETS
    assert os.path.isabs(config["base_model_name_or_path"])

    assert cli.main(["export", "--adapter", str(out), "--output", str(merged), "--merged"]) == 0
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    ids = torch.tensor([[1, 31, 95, 262, 345, 95, 33, 202, 269, 261, 288]])
    hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    hf_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = hf_base(ids).logits.numpy()
        merged_logits = hf_merged(ids).logits.numpy()
        adapter_logits = PeftModel.from_pretrained(hf_base, str(out))(ids).logits.numpy()
    np.testing.assert_allclose(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)  # PEFT reads our adapter
    assert np.abs(merged_logits - base_logits).max() > 1e-3  # and training changed it

    assert cli.main(["train", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"),
                     "--output-dir", str(tmp_path / "x"), "--no-load-in-4bit", "--quiet"]) == 2


@pytest.mark.gpu
def test_qlora_resume_is_exact_on_gpu(model_dir, records, tmp_path):
    """The real configuration: NF4 base, bf16 compute, 'unsloth' checkpointing (host offload), all linear
    layers, dropout; killed after step 3 and resumed from the step-2 checkpoint: bit-identical params."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, load_in_4bit=True)
    assert model.is_4bit and model.dtype == jnp.bfloat16
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules="all-linear",
                                             lora_dropout=0.1, use_gradient_checkpointing="unsloth", random_state=0)
    initial = jax.tree.map(jnp.array, model.lora_params)

    def run(out, resume=None, callbacks=()):
        model.lora_params = jax.tree.map(jnp.array, initial)
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=5, learning_rate=2e-3, save_steps=2, disable_tqdm=True, seed=3)
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records[:12], args=args,
                   callbacks=list(callbacks)).train(resume_from_checkpoint=resume)
        return leaves(model.lora_params)

    expected = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", callbacks=[KillAt(3)])
    for a, b in zip(expected, run(tmp_path / "killed", resume=True)):
        np.testing.assert_array_equal(a, b)
