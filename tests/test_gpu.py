"""The model on the GPU: parity with transformers (torch on the CPU as the oracle), NF4 loading, and the
three checkpointing modes giving the same gradients. Run with `pytest -m gpu` on the GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from fastlora_jax import FastLanguageModel
from fastlora_jax.tiny import write_tiny_llama

pytestmark = pytest.mark.gpu


def _hf_logits(model_dir, ids):
    import torch
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def test_fp32_and_bf16_logits_on_gpu_match_transformers(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})
    ids = rng.integers(0, 512, size=(2, 40))
    expected = _hf_logits(model_dir, ids)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=False)
    logits = model(ids).logits
    assert logits.devices() == {jax.devices()[0]} and jax.devices()[0].platform == "gpu"
    assert rel_l2(np.asarray(logits), expected) < 1e-4
    bf16, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)  # dtype=None: bf16 on a GPU
    assert bf16.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(bf16(ids).logits.astype(jnp.float32)), expected) < 2e-2


def test_nf4_on_gpu_equals_nf4_on_cpu(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False)
    ids = rng.integers(0, 512, size=(2, 24))
    gpu_model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    with jax.default_device(jax.devices("cpu")[0]):
        cpu_model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
        cpu_logits = np.asarray(cpu_model(ids).logits)
    gpu_q = gpu_model.base_params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    cpu_q = cpu_model.base_params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(gpu_q.packed), np.asarray(cpu_q.packed))
    assert rel_l2(np.asarray(gpu_model(ids).logits), cpu_logits) < 1e-4


def test_checkpointing_modes_give_same_gradients_on_gpu(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    ids = rng.integers(0, 512, size=(2, 32))
    grads = {}
    for mode in ("unsloth", True, False):
        pm = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False, use_gradient_checkpointing=mode)
        fn = pm.loss_sum_fn()
        g = jax.jit(jax.grad(lambda lp, base: fn(base, lp, jnp.asarray(ids), jnp.asarray(ids))[0]))(
            pm.lora_params, pm.base_params)
        grads[mode] = pm.peft_state_dict(g)
    for mode in ("unsloth", True):
        for key, value in grads[False].items():
            assert rel_l2(np.asarray(grads[mode][key]), np.asarray(value)) < 1e-5, (mode, key)


@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_attention_matches_reference(rng, padded):
    from fastlora_jax.kernels.attention import attention
    from fastlora_jax.kernels.reference import attention_reference
    b, s, h, k, d = 2, 256, 8, 2, 64
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
                ((b, s, h, d), (b, s, k, d), (b, s, k, d)))
    mask = None
    if padded:
        mask = np.ones((b, s), np.int32)
        mask[1, -37:] = 0  # right padding, as the trainer pads
        mask = jnp.asarray(mask)
    got = jax.jit(attention, static_argnums=4)(q, kk, v, mask, d ** -0.5)
    want = attention_reference(q.astype(jnp.float32), kk.astype(jnp.float32), v.astype(jnp.float32), mask, d ** -0.5)
    keep = np.ones((b, s), bool) if mask is None else np.asarray(mask).astype(bool)
    assert rel_l2(np.asarray(got, np.float32)[keep], np.asarray(want)[keep]) < 1e-2
    grad = jax.grad(lambda q_: attention(q_, kk, v, mask, d ** -0.5).astype(jnp.float32).sum())(q)
    grad_ref = jax.grad(lambda q_: attention_reference(q_, kk.astype(jnp.float32), v.astype(jnp.float32), mask,
                                                         d ** -0.5).sum())(q.astype(jnp.float32))
    assert rel_l2(np.asarray(grad, np.float32)[keep], np.asarray(grad_ref)[keep]) < 2e-2


@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_sliding_window_matches_reference(rng, padded):
    """`sliding_window` on cuDNN (`local_window_size`) is transformers' window: i - j < window (issue 13)."""
    from fastlora_jax.kernels.attention import attention
    from fastlora_jax.kernels.reference import attention_reference
    b, s, h, k, d, window = 2, 256, 8, 2, 64, 37
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
                ((b, s, h, d), (b, s, k, d), (b, s, k, d)))
    mask = None
    if padded:
        mask = np.ones((b, s), np.int32)
        mask[1, :29] = 0  # left padding, as generation pads
        mask = jnp.asarray(mask)
    call = jax.jit(lambda q_, k_, v_, m_: attention(q_, k_, v_, m_, d ** -0.5, sliding_window=window, impl="cudnn"))
    got = call(q, kk, v, mask)
    f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
    want = attention_reference(*f32, mask, d ** -0.5, sliding_window=window)
    full = attention_reference(*f32, mask, d ** -0.5)
    keep = np.ones((b, s), bool) if mask is None else np.asarray(mask).astype(bool)
    keep[:, :window] = False  # where the window changes nothing, both agree anyway
    assert rel_l2(np.asarray(got, np.float32)[keep], np.asarray(want)[keep]) < 1e-2
    assert rel_l2(np.asarray(full)[keep], np.asarray(want)[keep]) > 0.1  # the window matters here
    grad = jax.grad(lambda q_: call(q_, kk, v, mask).astype(jnp.float32).sum())(q)
    grad_ref = jax.grad(lambda q_: attention_reference(q_, *f32[1:], mask, d ** -0.5,
                                                         sliding_window=window).sum())(f32[0])
    assert rel_l2(np.asarray(grad, np.float32)[keep], np.asarray(grad_ref)[keep]) < 2e-2
