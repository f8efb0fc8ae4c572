"""Llama parity with transformers (fp32, bf16, NF4 quantized on load, bnb-4bit checkpoints) and load errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import bnb_reference_path, rel_l2
from fastlora_jax import FastLanguageModel, NF4Weight
from fastlora_jax.convert.hf_checkpoint import CheckpointError
from fastlora_jax.tiny import write_tiny_llama

LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CONFIGS = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_parameters=LLAMA31_ROPE, max_position_embeddings=512),
    "head_dim_differs": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "odd_sizes": dict(vocab_size=131, hidden_size=40, intermediate_size=100, num_attention_heads=5,
                      num_key_value_heads=5, num_hidden_layers=3),
    "bias_and_linear_rope": dict(attention_bias=True, mlp_bias=True,
                                 rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}


def hf_logits(model_dir, input_ids, attention_mask=None, **kwargs):
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager", **kwargs)
    hf.eval()
    if "quantization_config" in kwargs:
        bnb_reference_path(hf)
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return hf(torch.tensor(input_ids), attention_mask=mask).logits.float().numpy(), hf


def random_ids(rng, vocab, batch=2, seq=24):
    return rng.integers(0, vocab, size=(batch, seq)).astype(np.int64)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_transformers(tmp_path, rng, name):
    model_dir = write_tiny_llama(tmp_path / name, seed=int(rng.integers(1 << 30)), tokenizer=False, **CONFIGS[name])
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), dtype="float32", load_in_4bit=False)
    assert tokenizer is None
    ids = random_ids(rng, model.config.vocab_size)
    expected, _ = hf_logits(model_dir, ids)
    logits = np.asarray(model(ids).logits)
    assert logits.shape == expected.shape
    assert rel_l2(logits, expected) < 1e-4


def test_padding_mask_matches_transformers(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=3, tokenizer=False)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype=jnp.float32, load_in_4bit=False)
    ids = random_ids(rng, model.config.vocab_size, batch=3, seq=16)
    mask = np.ones_like(ids)
    mask[0, :5] = 0   # left padding
    mask[1, -4:] = 0  # right padding
    expected, _ = hf_logits(model_dir, ids, mask)
    logits = np.asarray(model(ids, attention_mask=mask).logits)
    keep = mask.astype(bool)
    assert rel_l2(logits[keep], expected[keep]) < 1e-4
    # the mask really changes the result at the unpadded positions of the left-padded row
    unmasked = np.asarray(model(ids).logits)
    assert rel_l2(unmasked[0, 5:], logits[0, 5:]) > 1e-3


def test_bf16_within_bf16_tolerance(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=4, tokenizer=False)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="bfloat16", load_in_4bit=False)
    assert model.base_params["model"]["embed_tokens"]["weight"].dtype == jnp.bfloat16
    ids = random_ids(rng, model.config.vocab_size)
    expected, _ = hf_logits(model_dir, ids)
    logits = model(ids).logits
    assert logits.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(logits.astype(jnp.float32)), expected) < 2e-2


def bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def nf4_state_of(hf_model, module_name):
    """The bnb dict transformers would save for one Linear4bit weight."""
    module = hf_model.get_submodule(module_name)
    state = module.weight.quant_state.as_dict(packed=True)
    tensors = {"": module.weight.data.numpy()}
    tensors.update({k: v.numpy() for k, v in state.items()})
    return tensors


@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_nf4_on_load_matches_transformers_bitsandbytes(tmp_path, rng, name):
    model_dir = write_tiny_llama(tmp_path / name, seed=int(rng.integers(1 << 30)), tokenizer=False, **CONFIGS[name])
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    ids = random_ids(rng, model.config.vocab_size)
    expected, hf = hf_logits(model_dir, ids, quantization_config=bnb_config(), device_map="cpu")
    # the quantized bytes are bitsandbytes' own
    ours = model.base_params["model"]["layers"]["mlp"]["down_proj"]["weight"]
    assert isinstance(ours, NF4Weight)
    theirs = nf4_state_of(hf, "model.layers.1.mlp.down_proj")
    ours_layer1 = {k: np.asarray(v) for k, v in
                   NF4Weight.from_bnb(theirs).to_bnb().items()}  # normalised form of theirs
    mine = jax_tree_index(ours, 1).to_bnb()
    for key in ours_layer1:
        np.testing.assert_array_equal(np.asarray(mine[key]), ours_layer1[key], err_msg=key)
    # embeddings and lm_head stay in dtype
    assert model.base_params["model"]["embed_tokens"]["weight"].dtype == jnp.float32
    logits = np.asarray(model(ids).logits)
    assert rel_l2(logits, expected) < 1e-3


def jax_tree_index(weight: NF4Weight, i: int) -> NF4Weight:
    import jax
    return jax.tree.map(lambda x: x[i], weight)


def test_loads_bnb_4bit_checkpoint_as_stored(tmp_path, rng):
    src = write_tiny_llama(tmp_path / "src", seed=5, tokenizer=False)
    hf = bnb_reference_path(LlamaForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager",
                                                             quantization_config=bnb_config(), device_map="cpu"))
    saved = tmp_path / "bnb4"
    hf.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["load_in_4bit"]

    model, _ = FastLanguageModel.from_pretrained(saved, dtype="float32")
    assert model.weights_source == "bnb-4bit"
    stored = nf4_state_of(hf, "model.layers.0.self_attn.q_proj")
    loaded = jax_tree_index(model.base_params["model"]["layers"]["self_attn"]["q_proj"]["weight"], 0).to_bnb()
    for key, value in NF4Weight.from_bnb(stored).to_bnb().items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value), err_msg=key)

    ids = random_ids(rng, model.config.vocab_size)
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.float().numpy()
    assert rel_l2(np.asarray(model(ids).logits), expected) < 1e-3


def test_sharded_checkpoint_equals_single_file(tmp_path, rng):
    single = write_tiny_llama(tmp_path / "single", seed=6, tokenizer=False)
    sharded = write_tiny_llama(tmp_path / "sharded", seed=6, tokenizer=False, max_shard_bytes=60_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    a, _ = FastLanguageModel.from_pretrained(single, dtype="float32", load_in_4bit=False)
    b, _ = FastLanguageModel.from_pretrained(sharded, dtype="float32", load_in_4bit=False)
    ids = random_ids(rng, a.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(a(ids).logits), np.asarray(b(ids).logits))


def test_tokenizer_and_default_dtype(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "m", seed=7)
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir)
    assert model.dtype == jnp.float32  # dtype=None on the CPU
    assert model.is_4bit
    ids = tokenizer("What is the capital of France?")["input_ids"]
    assert len(ids) > 3
    assert model(ids).logits.shape == (1, len(ids), model.config.vocab_size)
    assert model.config.model_type == "llama"


# ------------------------------------------------------------------------------------------ errors


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        FastLanguageModel.from_pretrained(tmp_path / "empty")
    model_dir = write_tiny_llama(tmp_path / "m", tokenizer=False)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FastLanguageModel.from_pretrained(model_dir)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "m", tokenizer=False)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        FastLanguageModel.from_pretrained(model_dir)


def test_truncated_safetensors_names_file(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "m", tokenizer=False)
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        FastLanguageModel.from_pretrained(model_dir)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "m", tokenizer=False)
    other = write_tiny_llama(tmp_path / "other", tokenizer=False, intermediate_size=96)
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*model\.safetensors.*shape"):
        FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)


def test_missing_tensor_names_it(tmp_path):
    from safetensors.numpy import load_file, save_file
    model_dir = write_tiny_llama(tmp_path / "m", tokenizer=False)
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        FastLanguageModel.from_pretrained(model_dir)


def test_bad_arguments(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "m", tokenizer=False)
    with pytest.raises(ValueError, match="dtype"):
        FastLanguageModel.from_pretrained(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="max_seq_length"):
        FastLanguageModel.from_pretrained(model_dir, max_seq_length=0)
    with pytest.raises(TypeError, match="bogus"):
        FastLanguageModel.from_pretrained(model_dir, bogus=1)
