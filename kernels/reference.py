"""Pure-jnp reference ops: what every kernel in this folder is checked against, and what runs off-GPU.

Each op follows the arithmetic of the Hugging Face torch modules it replaces (dtypes of intermediates
included), because fp32 logit parity with transformers at 1e-4 is a test of this project.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.quant import NF4Weight
from fastlora_jax.sharding import gathered

MASK_VALUE = -1e30  # finite, so a fully masked row (a padded query) gives a uniform softmax, not NaN


def dense_weight(weight, dtype) -> jax.Array:
    """A linear weight `[out, in]` as a plain array in `dtype`, dequantizing NF4 (gathered whole first when it is
    FSDP-sharded over a mesh: fastlora_jax.sharding.gathered)."""
    weight = gathered(weight)
    if isinstance(weight, NF4Weight):
        return weight.dequantize(dtype)
    return weight.astype(dtype)


def linear(x_bsi: jax.Array, weight_oi, bias_o: jax.Array | None = None) -> jax.Array:
    """`x @ W.T (+ b)`, W stored `[out, in]` as in torch; NF4 weights are dequantized to x's dtype first."""
    w_oi = dense_weight(weight_oi, x_bsi.dtype)
    y = jnp.einsum("...i,oi->...o", x_bsi, w_oi, preferred_element_type=x_bsi.dtype)
    if bias_o is not None:
        y = y + bias_o.astype(y.dtype)
    return y


def rms_norm(x_bsd: jax.Array, weight_d: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm with the arithmetic of the HF module it replaces.

    `offset=0` is Llama's: normalize in fp32, cast back to the input dtype, then scale by the weight.
    `offset=1` is Gemma's `(1 + w)`: the scale is applied in fp32 and the result cast once (Gemma's
    weights are stored centred on 0).
    """
    x32 = x_bsd.astype(jnp.float32)
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed32 = x32 * jax.lax.rsqrt(variance + eps)
    if offset:
        return (normed32 * (offset + weight_d.astype(jnp.float32))).astype(x_bsd.dtype)
    return weight_d.astype(x_bsd.dtype) * normed32.astype(x_bsd.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)` in x's dtype (Gemma 2's attention-logit and final-logit soft-capping); None: x."""
    if cap is None:
        return x
    return jnp.tanh(x / jnp.asarray(cap, x.dtype)) * jnp.asarray(cap, x.dtype)


def causal_allowed(query_pos_q: jax.Array, key_pos_k: jax.Array, sliding_window: int | None = None,
                   query_block_bq: jax.Array | None = None, key_block_bk: jax.Array | None = None) -> jax.Array:
    """`[q, k]` bool: query i sees key j iff j <= i and, with a window, i - j < sliding_window (transformers'
    `sliding_window_overlay`). Positions here are sequence slots, as transformers' cache positions.

    With blocks (`[batch, q]` / `[batch, k]` int ids, -1 outside every block; Gemma 3's image tokens) the result
    is `[batch, q, k]`: a query also sees every key of its own block, later ones included (transformers'
    `blockwise_overlay` OR'd with causality), and the window, applied after, still bounds the keys before it."""
    diff = query_pos_q[:, None] - key_pos_k[None, :]
    allowed = diff >= 0
    if query_block_bq is not None:
        same = (query_block_bq[:, :, None] == key_block_bk[:, None, :]) & (query_block_bq[:, :, None] >= 0)
        allowed = allowed[None] | same
    if sliding_window is not None:
        allowed = allowed & (diff < sliding_window)
    return allowed


def attention_reference(q_bshd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, attention_mask_bs: jax.Array | None,
                        scale: float, *, logit_softcap: float | None = None,
                        sliding_window: int | None = None, block_ids_bs: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention with an optional key padding mask (1 = attend).

    Softmax in fp32 and probabilities cast back to the query dtype before the value product, as
    transformers' eager attention does. `logit_softcap` caps the scaled scores (`cap * tanh(s / cap)`, fp32)
    before masking; `sliding_window` limits query i to keys j with i - j < sliding_window; `block_ids_bs`
    (`[batch, seq]`, -1 outside every block) makes each block bidirectional (`causal_allowed`).
    Returns `[batch, seq, q_heads, head_dim]`.
    """
    batch, seq, q_heads, head_dim = q_bshd.shape
    kv_heads = k_bskd.shape[2]
    groups = q_heads // kv_heads
    q_bskgd = q_bshd.reshape(batch, seq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_bskgd, k_bskd, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, logit_softcap)
    slots = jnp.arange(seq, dtype=jnp.int32)
    if block_ids_bs is None:
        allowed = causal_allowed(slots, slots, sliding_window)[None, None, None]
    else:
        allowed = causal_allowed(slots, slots, sliding_window, block_ids_bs, block_ids_bs)[:, None, None]
    if attention_mask_bs is not None:
        allowed = allowed & attention_mask_bs.astype(bool)[:, None, None, None, :]
    scores = jnp.where(allowed, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_bshd.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_bskd, preferred_element_type=q_bshd.dtype)
    return out.reshape(batch, seq, q_heads, head_dim)


def cached_attention_reference(q_bshd, k_bLkd, v_bLkd, allowed_bsL, scale: float, *,
                               logit_softcap: float | None = None):
    """Grouped-query attention of `seq` queries over `max_len` cached keys with an explicit mask (causality,
    window and padding are already in `allowed_bsL [batch|1, seq, max_len]`), with `attention_reference`'s
    arithmetic and cap (fp32 scores and softmax, probabilities cast to the query dtype)."""
    batch, seq, q_heads, head_dim = q_bshd.shape
    kv_heads = k_bLkd.shape[2]
    q_bskgd = q_bshd.reshape(batch, seq, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_bskgd, k_bLkd, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, logit_softcap)
    scores = jnp.where(allowed_bsL[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_bshd.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_bLkd, preferred_element_type=q_bshd.dtype)
    return out.reshape(batch, seq, q_heads, head_dim)



def masked_attention_reference(q_bqhd, k_bkgd, v_bkgd, allowed_bqk, scale: float) -> jax.Array:
    """Non-causal grouped-query attention of the queries over keys of any length, as transformers' eager attention:
    scores `q·k * scale` in fp32 plus `finfo(q.dtype).min` where `allowed_bqk` ([batch, queries, keys] bool) is
    False, softmax in fp32, probabilities cast to the query dtype. `allowed_bqk` None: every key (an encoder's
    attention over the patches of one image).

    The mask is added, not applied as a select, as transformers' masks are: a row whose every key is masked then
    becomes uniform, exactly as in torch."""
    batch, nq, q_heads, head_dim = q_bqhd.shape
    kv_heads = k_bkgd.shape[2]
    q = q_bqhd.reshape(batch, nq, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k_bkgd, preferred_element_type=jnp.float32) * scale
    if allowed_bqk is not None:
        bias = jnp.where(allowed_bqk, 0.0, jnp.finfo(q_bqhd.dtype).min).astype(jnp.float32)
        scores = scores + bias[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(q_bqhd.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_bkgd, preferred_element_type=q_bqhd.dtype)
    return out.reshape(batch, nq, q_heads, head_dim)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def lora_linear(x_bsi: jax.Array, module: dict, dropout_key=None, dropout_rate: float = 0.0) -> jax.Array:
    """A linear layer with its LoRA branch, as PEFT's `lora.Linear.forward` computes it.

    `module` holds the base `weight` [out, in] (dense or NF4) and optional `bias`, plus `lora_A` [r, in],
    `lora_B` [out, r], `scaling` (a scalar; 0 switches the adapter off, e.g. a layer outside
    layers_to_transform) and, with DoRA, `lora_magnitude_vector` [out] and `targeted` (bool scalar).
    Dropout applies to the LoRA input only; `dropout_key=None` means evaluation (no dropout).
    """
    w_oi = dense_weight(module["weight"], x_bsi.dtype)
    base = jnp.einsum("...i,oi->...o", x_bsi, w_oi, preferred_element_type=x_bsi.dtype)
    x_lora = x_bsi
    if dropout_key is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x_bsi.shape)
        x_lora = jnp.where(keep, x_bsi / (1.0 - dropout_rate), 0).astype(x_bsi.dtype)
    a_ri = module["lora_A"].astype(x_bsi.dtype)
    b_or = module["lora_B"].astype(x_bsi.dtype)
    scaling = module["scaling"].astype(x_bsi.dtype)
    lora = jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x_lora, a_ri), b_or) * scaling
    if "lora_magnitude_vector" in module:
        # DoRA (PEFT's DoraLinearLayer): the column norm of W + s*B@A is detached, as in the paper (sec. 4.3).
        merged_oi = w_oi + scaling * (b_or @ a_ri)
        weight_norm_o = jax.lax.stop_gradient(jnp.linalg.norm(merged_oi.astype(jnp.float32), axis=1))
        magnitude_scale = (module["lora_magnitude_vector"].astype(jnp.float32) / weight_norm_o).astype(x_bsi.dtype)
        magnitude_scale = jnp.where(module["targeted"], magnitude_scale, jnp.ones_like(magnitude_scale))
        if x_lora is not x_bsi:
            base = jnp.einsum("...i,oi->...o", x_lora, w_oi, preferred_element_type=x_bsi.dtype)
            plain = jnp.einsum("...i,oi->...o", x_bsi, w_oi, preferred_element_type=x_bsi.dtype)
            out = plain + (magnitude_scale - 1) * base + magnitude_scale * lora
        else:
            out = base + (magnitude_scale - 1) * base + magnitude_scale * lora
    else:
        out = base + lora
    if module.get("bias") is not None:
        out = out + module["bias"].astype(out.dtype)
    return out


def embedding(ids_bs: jax.Array, module: dict, dtype) -> jax.Array:
    """Embedding lookup, plus PEFT's LoRA embedding branch when `lora_embedding_A` [r, vocab] is present."""
    out = jnp.take(module["weight"], ids_bs, axis=0).astype(dtype)
    if "lora_embedding_A" in module:
        after_a = jnp.take(module["lora_embedding_A"].T, ids_bs, axis=0).astype(dtype)
        out = out + (after_a @ module["lora_embedding_B"].T.astype(dtype)) * module["scaling"].astype(dtype)
    return out
