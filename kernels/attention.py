"""Causal grouped-query attention: cuDNN's fused flash attention on a GPU, the jnp reference elsewhere.

The reference (`reference.attention_reference`) is what the fused path is checked against
(tests/test_gpu.py::test_cudnn_attention_matches_reference).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from fastlora_jax.kernels.reference import attention_reference


def attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale: float) -> jax.Array:
    """Causal GQA attention: cuDNN's fused flash attention on a GPU for 16-bit inputs (never builds the
    [seq, seq] scores), the jnp reference elsewhere. FASTLORA_ATTENTION=xla forces the reference."""
    if _cudnn_attention_ok(q_bshd):
        mask = None
        if attention_mask_bs is not None:  # cuDNN takes a mask as a [batch, 1, q, k] bias (16-bit, B*S*S bytes)
            b, s = attention_mask_bs.shape
            mask = jnp.broadcast_to(attention_mask_bs.astype(bool)[:, None, None, :], (b, 1, s, s))
        return jax.nn.dot_product_attention(q_bshd, k_bskd, v_bskd, mask=mask, scale=scale, is_causal=True,
                                            implementation="cudnn")
    return attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale)


def _cudnn_attention_ok(q_bshd) -> bool:
    if os.environ.get("FASTLORA_ATTENTION", "auto") == "xla" or jax.default_backend() != "gpu":
        return False
    head_dim = q_bshd.shape[-1]
    return q_bshd.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
