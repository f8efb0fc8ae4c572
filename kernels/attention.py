"""Causal grouped-query attention: cuDNN's fused flash attention on a GPU, a flash-style Pallas kernel where
cuDNN cannot run the call (a logit soft-cap), the jnp reference elsewhere.

The reference (`reference.attention_reference`) is what the fused paths are checked against
(tests/test_gpu.py, tests/test_flash_attention.py). Sliding windows run on cuDNN (`local_window_size`).
Soft-capped logits (Gemma 2) run on the GPU on `flash_attention.flash_attention_reference` (blockwise
online softmax, blockwise backward: never an O(S^2) score matrix); the Mosaic GPU forward kernel beside it is
opt-in (`impl="flash"`, `KernelOptions(attention="flash")`) until an interpret-mode deadlock in one of its
tests is understood; under a mesh of several devices "flash" runs the blockwise reference (XLA partitions it;
the kernel has no shard_map wrapper yet), while cuDNN, an XLA custom call with its own partitioning rule, runs
per device as it is. On the kernel path rows with no visible key (padding queries) come out as zeros; their
outputs feed no loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.kernels import flash_attention as flash
from fastlora_jax.kernels.reference import (attention_reference, cached_attention_reference, causal_allowed,
                                            masked_attention_reference)
from fastlora_jax.sharding import multi_device

IMPLS = ("auto", "xla", "cudnn", "flash")


def attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale: float, *, logit_softcap: float | None = None,
              sliding_window: int | None = None, impl: str = "auto", block_ids_bs=None) -> jax.Array:
    """Causal GQA attention (transformers' semantics: query i sees key j iff j <= i, and i - j < sliding_window
    with a window; the cap is `cap * tanh(s / cap)` of the scaled scores, before masking).

    impl: "auto" (on a GPU: cuDNN for the 16-bit calls it takes, else the flash kernel or its blockwise
    reference; elsewhere the reference), "xla" (the reference), "cudnn" (an error when cuDNN cannot run the
    call) or "flash" (the flash kernel where supported, else its blockwise reference, on any backend).

    `block_ids_bs` (`[batch, seq]` int, -1 outside every block): each block of equal ids is bidirectional
    (Gemma 3's image tokens; `reference.causal_allowed`). cuDNN takes it as an explicit `[batch, 1, seq, seq]`
    mask; where cuDNN cannot run the call the dense reference does (the flash paths have no block mask)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    why_not = _cudnn_why_not(q_bshd, logit_softcap)
    if impl == "cudnn" and why_not:
        raise ValueError(f"impl='cudnn' cannot run this call: {why_not}; use impl='auto' or 'xla'")
    if block_ids_bs is not None:
        return _block_attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, logit_softcap, sliding_window,
                                block_ids_bs, use_cudnn=impl in ("auto", "cudnn") and not why_not)
    if impl == "flash" and multi_device():
        # Under a mesh of several devices the Mosaic kernel is not wrapped in a shard_map (yet): its blockwise
        # XLA reference runs instead, which the SPMD partitioner splits over the batch like any jnp code.
        return flash.flash_attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale,
                                               logit_softcap=logit_softcap, sliding_window=sliding_window)
    if impl == "flash":
        return flash.flash_attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, logit_softcap=logit_softcap,
                                     sliding_window=sliding_window)
    on_gpu_16bit = jax.default_backend() == "gpu" and q_bshd.dtype in (jnp.bfloat16, jnp.float16)
    if impl == "auto" and why_not and on_gpu_16bit:
        # The kernel stays opt-in (impl="flash"): Pallas' GPU interpreter deadlocks on one of its test cases
        # (tests/test_flash_attention.py::test_kernel_gradients_interpret), not yet understood.
        return flash.flash_attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale,
                                               logit_softcap=logit_softcap, sliding_window=sliding_window)
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


def _block_attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, logit_softcap, sliding_window, block_ids_bs,
                     use_cudnn: bool):
    if not use_cudnn:
        return attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, logit_softcap=logit_softcap,
                                   sliding_window=sliding_window, block_ids_bs=block_ids_bs)
    slots = jnp.arange(q_bshd.shape[1], dtype=jnp.int32)
    allowed = causal_allowed(slots, slots, sliding_window, block_ids_bs, block_ids_bs)
    if attention_mask_bs is not None:
        allowed = allowed & attention_mask_bs.astype(bool)[:, None, :]
    return jax.nn.dot_product_attention(q_bshd, k_bskd, v_bskd, mask=allowed[:, None], scale=scale,
                                        implementation="cudnn")


def masked_attention(q_bqhd, k_bkgd, v_bkgd, allowed_bqk, scale: float, *, impl: str = "auto") -> jax.Array:
    """Non-causal attention of the queries over keys of any length where `allowed_bqk` (`[batch, queries, keys]`
    bool; None: every key) is True: Mllama's vision encoder and its cross-attention over the image tokens,
    SigLIP's attention over the patches of one image. The values of `reference.masked_attention_reference`.

    On a GPU, for 16-bit calls of more than one query: cuDNN's fused attention (jax turns the mask into an additive
    large negative, so a fully masked row is uniform as in the reference). Why: the reference's fp32 scores are
    `[heads, queries, keys]` per layer (Llama-3.2-11B-Vision: 1.68 GB for a 2,048-token cross-attention over one
    4-tile image, 2.65 GB in its vision encoder), and its QLoRA step held several at once (35-40 GiB peak).
    Elsewhere (and with `impl` "xla" or "flash", which has no such kernel): the reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    why_not = _cudnn_why_not(q_bqhd, None) or ("a single query" if q_bqhd.shape[1] == 1 else "")
    if impl == "cudnn" and why_not:
        raise ValueError(f"impl='cudnn' cannot run this call: {why_not}; use impl='auto' or 'xla'")
    if impl in ("auto", "cudnn") and not why_not:
        mask = None if allowed_bqk is None else allowed_bqk[:, None]
        return jax.nn.dot_product_attention(q_bqhd, k_bkgd, v_bkgd, mask=mask, scale=scale, implementation="cudnn")
    return masked_attention_reference(q_bqhd, k_bkgd, v_bkgd, allowed_bqk, scale)


def runs_cudnn(q_bshd, logit_softcap, impl: str = "auto") -> bool:
    """Whether `attention(q_bshd, ..., impl=impl)` runs cuDNN (whose forward outputs a checkpoint policy can keep:
    the `dot_product_attention_fwd` primitive). `q_bshd` may be a `jax.ShapeDtypeStruct`."""
    return impl in ("auto", "cudnn") and not _cudnn_why_not(q_bshd, logit_softcap)


def _cudnn_why_not(q_bshd, logit_softcap) -> str:
    """Why cuDNN cannot run this call ('' when it can)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}"
    if q_bshd.dtype not in (jnp.bfloat16, jnp.float16):
        return f"q dtype {q_bshd.dtype} (cuDNN takes bfloat16/float16)"
    head_dim = q_bshd.shape[-1]
    max_head_dim = 256 if _compute_capability() >= (9, 0) else 128  # Hopper's cuDNN kernels take 256
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head_dim={head_dim} (cuDNN takes multiples of 8 up to {max_head_dim} on this GPU)"
    if logit_softcap is not None:
        return f"logit_softcap={logit_softcap} (cuDNN has no soft-cap)"
    return ""


def _compute_capability() -> tuple[int, int]:
    major, _, minor = str(getattr(jax.devices()[0], "compute_capability", "0.0")).partition(".")
    return int(major), int(minor or 0)


def cached_attention(q_bshd, k_bLkd, v_bLkd, allowed_bsL, scale: float, *, logit_softcap: float | None = None):
    """Attention of this call's queries over the KV cache (generation): the mask `allowed_bsL` carries
    causality, the window and padding (models.decoder.cache_attention_allowed). A decode step is one query
    per row, memory-bound: the jnp reference is what runs everywhere for now."""
    return cached_attention_reference(q_bshd, k_bLkd, v_bLkd, allowed_bsL, scale, logit_softcap=logit_softcap)
