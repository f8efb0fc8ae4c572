"""Causal grouped-query attention: cuDNN's fused flash attention on a GPU, the jnp reference elsewhere.

The reference (`reference.attention_reference`) is what the fused path is checked against
(tests/test_gpu.py::test_cudnn_attention_matches_reference). Sliding windows run on cuDNN
(`local_window_size`); soft-capped logits (Gemma 2) stay on the reference until a kernel that caps inside
the softmax lands (kernels/flash_attention.py, wired in here by `impl`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.kernels.reference import attention_reference, cached_attention_reference

IMPLS = ("auto", "xla", "cudnn")


def attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale: float, *, logit_softcap: float | None = None,
              sliding_window: int | None = None, impl: str = "auto") -> jax.Array:
    """Causal GQA attention (transformers' semantics: query i sees key j iff j <= i, and i - j < sliding_window
    with a window; the cap is `cap * tanh(s / cap)` of the scaled scores, before masking).

    impl: "auto" (cuDNN on a GPU for 16-bit inputs it takes, else the reference), "xla" (the reference) or
    "cudnn" (an error when cuDNN cannot run the call)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    why_not = _cudnn_why_not(q_bshd, logit_softcap)
    if impl == "cudnn" and why_not:
        raise ValueError(f"impl='cudnn' cannot run this call: {why_not}; use impl='auto' or 'xla'")
    if impl != "xla" and not why_not:
        mask = None
        if attention_mask_bs is not None:  # cuDNN takes a mask as a [batch, 1, q, k] bias (16-bit, B*S*S bytes)
            b, s = attention_mask_bs.shape
            mask = jnp.broadcast_to(attention_mask_bs.astype(bool)[:, None, None, :], (b, 1, s, s))
        # jax's window (left, right): query i sees key j iff i - left <= j <= i + right
        window = None if sliding_window is None else (int(sliding_window) - 1, 0)
        return jax.nn.dot_product_attention(q_bshd, k_bskd, v_bskd, mask=mask, scale=scale, is_causal=True,
                                            local_window_size=window, implementation="cudnn")
    return attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, logit_softcap=logit_softcap,
                               sliding_window=sliding_window)


def _cudnn_why_not(q_bshd, logit_softcap) -> str:
    """Why cuDNN cannot run this call ('' when it can)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}"
    if q_bshd.dtype not in (jnp.bfloat16, jnp.float16):
        return f"q dtype {q_bshd.dtype} (cuDNN takes bfloat16/float16)"
    head_dim = q_bshd.shape[-1]
    if head_dim % 8 or head_dim > 128:
        return f"head_dim={head_dim} (cuDNN takes multiples of 8 up to 128)"
    if logit_softcap is not None:
        return f"logit_softcap={logit_softcap} (cuDNN has no soft-cap)"
    return ""


def cached_attention(q_bshd, k_bLkd, v_bLkd, allowed_bsL, scale: float, *, logit_softcap: float | None = None):
    """Attention of this call's queries over the KV cache (generation): the mask `allowed_bsL` carries
    causality, the window and padding (models.decoder.cache_attention_allowed). A decode step is one query
    per row, memory-bound: the jnp reference is what runs everywhere for now."""
    return cached_attention_reference(q_bshd, k_bLkd, v_bLkd, allowed_bsL, scale, logit_softcap=logit_softcap)
