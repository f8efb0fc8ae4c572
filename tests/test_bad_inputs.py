"""Bad inputs are refused at the boundary with a message naming the argument (or file), the value and what is
accepted; multi-file artifacts are never half-written; the CLI turns every error class into one line and exit 2.

The cases are issue 12's: each reproduces a silently-wrong or unclear behaviour found on the tiny Llama.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fastlora_jax import FastLanguageModel, atomic
from fastlora_jax.convert.hf_checkpoint import CheckpointError
from fastlora_jax.tiny import write_tiny_llama
from fastlora_jax.trainer import SFTConfig, SFTTrainer

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def base(model_dir):
    return FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=128, load_in_4bit=False)


def peft(model, **kwargs):
    return FastLanguageModel.get_peft_model(model, **{"r": 4, "target_modules": TARGETS,
                                                      "use_gradient_checkpointing": False, **kwargs})


# ------------------------------------------------------------------------------------------ 4: max_seq_length


def test_get_peft_model_keeps_from_pretrained_max_seq_length(base):
    model, tokenizer = base
    assert peft(model).max_seq_length == 128  # was replaced by get_peft_model's default 2048
    long = [{"text": "hello world " * 400}]
    trainer = SFTTrainer(model=peft(model), processing_class=tokenizer, train_dataset=long,
                         args=SFTConfig(output_dir="unused", disable_tqdm=True, max_steps=1))
    assert trainer.train_data.seq_len <= 128
    assert peft(model, max_seq_length=64).max_seq_length == 64  # a value given still replaces it
    with pytest.raises(ValueError, match=r"max_seq_length=0 is not accepted: use a positive int, or None"):
        peft(model, max_seq_length=0)


# ------------------------------------------------------------------------------------------ 5: booleans


@pytest.mark.parametrize("name", ["load_in_4bit", "double_quant"])
@pytest.mark.parametrize("value", ["False", "yes", 2, None])
def test_boolean_switches_take_only_bools(model_dir, name, value):
    with pytest.raises(TypeError, match=rf"{name}={value!r} is not accepted: use True or False"):
        FastLanguageModel.from_pretrained(str(model_dir), **{name: value})


def test_boolean_switches_elsewhere(model_dir, base):
    from fastlora_jax import FastVisionModel
    with pytest.raises(TypeError, match=r"load_in_4bit='False' is not accepted"):
        FastVisionModel.from_pretrained(str(model_dir), load_in_4bit="False")
    with pytest.raises(TypeError, match=r"load_in_4bit=1 is not accepted"):
        FastLanguageModel.from_config(base[0].config, load_in_4bit=1)
    with pytest.raises(TypeError, match=r"full_finetuning='no' is not accepted"):
        FastLanguageModel.from_pretrained(str(model_dir), full_finetuning="no")
    with pytest.raises(TypeError, match=r"use_rslora must be True or False, got .yes."):
        peft(base[0], use_rslora="yes")
    with pytest.raises(TypeError, match=r"do_sample='yes' is not accepted"):
        base[0].generate([[1, 2, 3]], max_new_tokens=2, do_sample="yes")
    with pytest.raises(TypeError, match=r"return_dict=1 is not accepted"):
        base[0].generate([[1, 2, 3]], max_new_tokens=2, return_dict=1)


# ------------------------------------------------------------------------------------------ 6: non-finite weights


def _poison(src: Path, dst: Path, name: str) -> Path:
    import shutil
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = tensors[name].copy()
    tensors[name][0, 3] = np.nan
    tensors[name][1, 0] = np.inf
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "4bit"])
def test_non_finite_weight_is_named_at_load(model_dir, tmp_path, load_in_4bit):
    name = "model.layers.1.self_attn.q_proj.weight"
    bad = _poison(model_dir, tmp_path / "nan", name)
    with pytest.raises(CheckpointError) as err:
        FastLanguageModel.from_pretrained(str(bad), load_in_4bit=load_in_4bit)
    message = str(err.value)
    assert repr(name) in message and str(bad / "model.safetensors") in message
    assert "1 NaN and 1 infinite values" in message


# ------------------------------------------------------------------------------------------ 8: located load errors


def test_fp4_bnb_checkpoint_says_fp4_is_not_supported(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu")
    hf.save_pretrained(tmp_path / "fp4")
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type='fp4' is not supported; only 'nf4'"):
        FastLanguageModel.from_pretrained(str(tmp_path / "fp4"))
    # without the config's word for it, the tensors' names say fp4 too
    config = json.loads((tmp_path / "fp4" / "config.json").read_text())
    del config["quantization_config"]["bnb_4bit_quant_type"]
    (tmp_path / "fp4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"holds bitsandbytes 'fp4' weights; only 'nf4' is supported"):
        FastLanguageModel.from_pretrained(str(tmp_path / "fp4"))


@pytest.fixture
def adapter(base, tmp_path):
    model = peft(base[0])
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_corrupt_adapter_files_are_named(adapter):
    model, directory = adapter
    config = directory / "adapter_config.json"
    good = config.read_bytes()
    config.write_text('{"r": 4, ')
    with pytest.raises(ValueError, match=rf"{str(config)!r} is not valid JSON"):
        model.load_adapter(directory)
    with pytest.raises(ValueError, match=rf"{str(config)!r} is not valid JSON"):
        FastLanguageModel.from_pretrained(str(directory))
    config.write_bytes(good)
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"cannot read adapter weights {str(weights)!r} \(truncated or corrupt\?\)"):
        model.load_adapter(directory)


def test_non_finite_adapter_tensor_is_named(adapter):
    model, directory = adapter
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = np.nan
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=rf"tensor {key!r} in {str(weights)!r} holds 1 NaN"):
        model.load_adapter(directory)


# ------------------------------------------------------------------------------------------ 3: whole adapters


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_adapter_is_never_half_written(base, adapter, monkeypatch):
    """r=4 on disk; an r=8 save fails while its config is written: the r=4 adapter is whole and loads."""
    _, directory = adapter
    before = _snapshot(directory)
    bigger = peft(base[0], r=8)
    real_stage = atomic.stage_bytes

    def fail_on_config(path, data):
        if Path(path).name == "adapter_config.json":
            raise OSError(f"disk full while writing {path}")
        return real_stage(path, data)

    monkeypatch.setattr(atomic, "stage_bytes", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        bigger.save_pretrained(directory)
    monkeypatch.undo()
    assert _snapshot(directory) == before  # same files, same bytes, no temporary file left
    reloaded = peft(base[0])
    reloaded.load_adapter(directory)


def test_adapter_pair_torn_between_renames_is_refused(base, adapter, monkeypatch):
    """A crash between the two renames (weights new, config old) is detected on read, not loaded wrong."""
    model, directory = adapter
    bigger = peft(base[0], r=8)
    real_replace = os.replace

    def crash_on_config(src, dst):
        if Path(dst).name == "adapter_config.json":
            raise OSError("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_config)
    with pytest.raises(OSError, match="killed"):
        bigger.save_pretrained(directory)
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match=r"was written with a different adapter_config.json than the one beside it"):
        model.load_adapter(directory)


def test_merged_export_is_never_half_written(adapter, tmp_path, monkeypatch):
    from fastlora_jax.convert import peft as peft_files
    model, _ = adapter
    target = tmp_path / "merged"
    model.save_pretrained_merged(target)
    before = _snapshot(target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_files, "atomic_write_bytes", fail)  # config.json, written after the shards
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained_merged(target)
    monkeypatch.undo()
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temporary sibling left
    somewhere = tmp_path / "notes"
    somewhere.mkdir()
    (somewhere / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"non-empty directory that does not hold a previous export"):
        model.save_pretrained_merged(somewhere)
    assert (somewhere / "todo.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ 9: generate


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(temperature=float("nan")), ValueError, r"temperature=nan is not accepted: use a finite number in \[0, inf\)"),
    (dict(temperature="hot"), ValueError, r"temperature='hot' is not accepted"),
    (dict(temperature=None), ValueError, r"temperature=None is not accepted"),
    (dict(temperature=-1.0), ValueError, r"temperature=-1.0 is not accepted"),
    (dict(top_p=float("nan")), ValueError, r"top_p=nan is not accepted: use a finite number in \(0, 1\]"),
    (dict(top_p=0.0), ValueError, r"top_p=0.0 is not accepted"),
    (dict(top_k=2.5), ValueError, r"top_k=2.5 is not accepted: use an int >= 0"),
    (dict(max_new_tokens=True), ValueError, r"max_new_tokens=True is not accepted"),
    (dict(seed="x"), ValueError, r"seed='x' is not accepted: use an int"),
    (dict(eos_token_id="</s>"), ValueError, r"eos_token_id='</s>' is not accepted: use None, a token id or a list"),
    (dict(eos_token_id=[2, 9999]), ValueError, r"eos_token_id=\[2, 9999\] is not accepted: .* in \[0, 512\)"),
    (dict(pad_token_id=-1), ValueError, r"pad_token_id=-1 is not accepted: use None or a token id in \[0, 512\)"),
])
def test_generate_settings(base, kwargs, error, message):
    with pytest.raises(error, match=message):
        base[0].generate([[1, 5, 7]], **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("prompt", [[], [[]], np.zeros((1, 0), np.int64)], ids=["list", "nested", "array"])
def test_generate_empty_prompt(base, prompt):
    with pytest.raises(ValueError, match="input_ids is empty: generate needs at least one prompt token"):
        base[0].generate(prompt, max_new_tokens=2)


def test_generate_past_max_position_embeddings(base):
    model = base[0]
    assert model.config.max_position_embeddings == 512
    with pytest.raises(ValueError, match=r"input_ids has 10 tokens and max_new_tokens=503: 513 positions exceed "
                                         r"the model's max_position_embeddings=512"):
        model.generate([list(range(1, 11))], max_new_tokens=503)


# ------------------------------------------------------------------------------------------ 7: the CLI


def cli(*args, cwd=None):
    """The installed CLI in a subprocess: (exit code, stdout, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "fastlora_jax.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(rc, stderr, *fragments):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


TRAIN = ["train", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--r", "4", "--target-modules",
         "q_proj,v_proj", "--no-load-in-4bit", "--gradient-checkpointing", "false", "--max-seq-length", "64",
         "--quiet"]


def test_cli_errors_are_one_line_exit_2(model_dir, adapter, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # an OS error: the output directory under a file
    rc, _, err = cli(*TRAIN, "--model", model_dir, "--output-dir", blocker / "out")
    assert_one_line_error(rc, err, "NotADirectoryError", str(blocker))
    # a non-finite loss
    rc, _, err = cli(*TRAIN, "--model", model_dir, "--output-dir", tmp_path / "lr", "--lr", "1e8", "--max-steps", "6",
                     "--warmup-steps", "0")
    assert_one_line_error(rc, err, "FloatingPointError", "training stopped at step", "learning_rate (now 100000000.0)")
    # truncated weights on export: the adapter's base model is truncated
    _, directory = adapter
    broken = tmp_path / "broken-base"
    broken.mkdir()
    for p in Path(model_dir).iterdir():
        broken.joinpath(p.name).write_bytes(p.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(broken)
    (directory / "adapter_config.json").write_text(json.dumps(config))  # an edited field: still loads
    rc, _, err = cli("export", "--adapter", directory, "--output", tmp_path / "merged", "--merged")
    assert_one_line_error(rc, err, str(weights), "truncated or corrupt")
    # demo into a place that cannot be written
    rc, _, err = cli("demo", "--model-dir", blocker / "model", "--max-steps", "1")
    assert_one_line_error(rc, err, str(blocker))
    # a usage error is one line too
    rc, _, err = cli("train", "--lr", "fast")
    assert_one_line_error(rc, err, "--lr", "'fast'")


# ------------------------------------------------------------------------------------------ the sweep


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_decay=float("nan")), "weight_decay=nan is not accepted"),
    (dict(adam_epsilon=float("nan")), "adam_epsilon=nan is not accepted"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm=inf is not accepted"),
    (dict(warmup_steps=float("nan")), "warmup_steps=nan is not accepted"),
    (dict(logging_steps=float("nan")), "logging_steps=nan is not accepted"),
    (dict(max_steps=-1, num_train_epochs=float("nan")), "num_train_epochs=nan is not accepted"),
    (dict(fp16="yes"), "fp16='yes' is not accepted: must be True or False"),
    (dict(completion_only_loss=1), "completion_only_loss=1 is not accepted: must be None, True or False"),
])
def test_training_arguments_refuse_nan_and_non_bools(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTConfig(**kwargs)


def test_trainer_inputs_and_data_files(base, tmp_path):
    model, tokenizer = base
    trainer = SFTTrainer(model=peft(model), processing_class=tokenizer, train_dataset=[{"text": "a b c"}],
                         args=SFTConfig(output_dir=str(tmp_path), disable_tqdm=True, max_steps=1))
    with pytest.raises(TypeError, match=r"resume_from_checkpoint=1 is not accepted: use True"):
        trainer.train(resume_from_checkpoint=1)
    broken = tmp_path / "data.json"
    broken.write_text('[{"text": "a"},')
    with pytest.raises(ValueError, match=rf"{broken}:1: not valid JSON"):
        SFTTrainer(model=peft(model), processing_class=tokenizer, train_dataset=str(broken))
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"{str(binary)!r} is not UTF-8 text"):
        SFTTrainer(model=peft(model), processing_class=tokenizer, train_dataset=str(binary))
