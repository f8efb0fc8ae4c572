"""Causal GQA attention with a sliding window and a logit soft-cap that never builds the [seq, seq] scores.

Gemma 2 caps its attention logits (attn_logit_softcapping=50), Gemma 2/3 and Mistral use sliding windows;
cuDNN's fused attention takes neither the cap nor (in jax.nn) the window, so these layers would otherwise
fall back to the dense reference. This file holds two implementations of one op:

* `flash_attention_reference`: pure jnp, any backend. An online softmax over key blocks under `lax.scan`
  (only one [.., seq, block_k] score tile is alive at a time), with a `custom_vjp` whose backward recomputes
  the scores block by block from the saved (out, logsumexp), FlashAttention-2's backward in jnp. Memory is
  O(seq * block_k) per head instead of O(seq^2). It visits every key block (it does not skip the masked
  band), which is what lets it match `reference.attention_reference` exactly, padded queries included.
* `flash_attention`: a Pallas Mosaic GPU kernel for Hopper (bf16), the forward described below; on other
  backends (or shapes `supported` refuses) it is the reference.

Semantics (transformers' eager attention, `kernels/reference.attention_reference` plus cap and window):
    s = (q . k) * scale in fp32;  s = cap * tanh(s / cap) if logit_softcap
    allowed(i, j) = j <= i  and  i - j < sliding_window (when set)  and  attention_mask[b, j]
    s = where(allowed, s, MASK_VALUE);  p = softmax(s) in fp32;  out = p.astype(q.dtype) @ v
A row with no allowed key (a padded query) gets a finite output: the reference's softmax over an all-
MASK_VALUE row is uniform, so it averages v over all keys. `flash_attention_reference` reproduces that;
the kernel, which skips key blocks outside the causal/window band, averages v over the blocks it visits
instead (finite, different; such rows are padding, and the kernel's backward gives them no gradient
through the scores, as the reference does not either).

How the forward kernel works (one CTA = 2 compute warpgroups + 1 TMA warpgroup, FlashAttention-3 style):

* Grid (q_heads, seq / (2 * BLOCK_Q), batch). Each compute warpgroup owns BLOCK_Q = 64 query rows of one
  head; the CTA's 128 rows share K/V tiles of BLOCK_K keys of that head's KV head (GQA: the KV head is
  q_head // groups, read through the index, never repeated in memory).
* The CTA visits only key blocks [lo, hi) that intersect its causal/window band:
  hi = cdiv(q0 + 128, BLOCK_K), lo = max(0, q0 - window + 1) // BLOCK_K. With a 4096 window at 32k tokens
  that is ~1/4 of the causal work: this is where the window saves time.
* The TMA warpgroup streams K, V and the key-padding row (as an fp32 additive 0 / MASK_VALUE vector,
  1-D TMA) into a ring of STAGES slots; compute warpgroups release a slot through "consumed" barriers.
* Per key block each compute warpgroup does: S = Q K^T (wgmma, fp32 accumulator in registers), the scale,
  the cap (tanh), the mask (iota compares for causal/window plus the padding vector), the online softmax
  in base 2 (running max m, sum l, rescale alpha), then O += P V (P in bf16 as the wgmma A operand from
  registers). At the end O / l goes to HBM through SMEM and TMA, and lse = m + log2(l) (base 2) is saved
  for the backward.
* Masked logits become MASK_VALUE (finite), never -inf: exp2 of (-inf) - (-inf) is NaN, and a row whose
  visited keys are all masked must stay finite.

Backward: the kernel's residuals (out, lse) feed the blockwise jnp backward (`_bwd_blockwise`), which
recomputes each score tile once: dV += P^T dO, dS = P * (dP - delta) (times 1 - tanh^2 under the cap),
dQ += dS K, dK += dS^T Q. It runs over all key blocks; a Mosaic GPU backward kernel is future work.

`supported` lists what the kernel takes (bf16, head_dim 64/128/256, seq a multiple of 128, same seq for
q and k); `flash_attention` falls back to the reference otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fastlora_jax.kernels.reference import MASK_VALUE

__all__ = ["flash_attention", "flash_attention_reference", "supported"]

LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------------------------
# argument checks shared by both implementations
# ----------------------------------------------------------------------------------------------


def _check_args(q_bshd, k_bskd, v_bskd, attention_mask_bs, logit_softcap, sliding_window):
    if q_bshd.ndim != 4 or k_bskd.ndim != 4 or v_bskd.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got shapes {q_bshd.shape}, "
                         f"{k_bskd.shape}, {v_bskd.shape}")
    b, s, h, d = q_bshd.shape
    if k_bskd.shape != v_bskd.shape or k_bskd.shape[0] != b or k_bskd.shape[1] != s or k_bskd.shape[3] != d:
        raise ValueError(f"k_bskd.shape={k_bskd.shape}, v_bskd.shape={v_bskd.shape}; expected both "
                         f"[{b}, {s}, kv_heads, {d}] (self-attention: q's batch, seq and head_dim)")
    if h % k_bskd.shape[2]:
        raise ValueError(f"q heads {h} is not a multiple of kv heads {k_bskd.shape[2]}")
    if attention_mask_bs is not None and tuple(attention_mask_bs.shape) != (b, s):
        raise ValueError(f"attention_mask_bs.shape={tuple(attention_mask_bs.shape)}; expected [{b}, {s}]")
    if logit_softcap is not None and not float(logit_softcap) > 0:
        raise ValueError(f"logit_softcap={logit_softcap}; expected None or a positive number")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window}; expected None or an integer >= 1")


def _allowed(q_pos, k_pos, k_valid, sliding_window):
    """[..., Sq, Sk] bool: causal, window and key padding (k_valid [B, Sk] bool) -> [B, 1, 1, Sq, Sk]."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    return allowed[None, None, None] & k_valid[:, None, None, None, :]


def _capped(s, logit_softcap):
    """(capped scores, tanh term or None) from fp32 scores."""
    if logit_softcap is None:
        return s, None
    t = jnp.tanh(s / logit_softcap)
    return logit_softcap * t, t


# ----------------------------------------------------------------------------------------------
# the blockwise jnp implementation (reference, and the kernel's backward)
# ----------------------------------------------------------------------------------------------


def _blocks(k_bskd, v_bskd, mask_bs, block_k):
    """K, V, key-valid mask and key positions split into key blocks along a leading axis."""
    b, s, hk, d = k_bskd.shape
    nb = s // block_k
    kb = k_bskd.reshape(b, nb, block_k, hk, d).swapaxes(0, 1)
    vb = v_bskd.reshape(b, nb, block_k, hk, d).swapaxes(0, 1)
    mb = mask_bs.reshape(b, nb, block_k).swapaxes(0, 1)
    posb = jnp.arange(s, dtype=jnp.int32).reshape(nb, block_k)
    return kb, vb, mb, posb


def _fwd_blockwise(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, block_k):
    """(out [B, S, H, D] in q's dtype, (m, l) [B, Hk, G, S] fp32: the row max and the sum of exp(s - m))
    by an online softmax. m and l stay separate: for a fully masked row m = MASK_VALUE absorbs log(l)."""
    b, s, h, d = q_bshd.shape
    hk = k_bskd.shape[2]
    g = h // hk
    q_bskgd = q_bshd.reshape(b, s, hk, g, d)
    q_pos = jnp.arange(s, dtype=jnp.int32)

    def step(carry, blk):
        m, l, acc = carry                          # [B,Hk,G,S], [B,Hk,G,S], [B,Hk,G,S,D] fp32
        k_b, v_b, valid_b, k_pos = blk
        sc = jnp.einsum("bqkgd,bskd->bkgqs", q_bskgd, k_b, preferred_element_type=jnp.float32) * scale
        sc, _ = _capped(sc, logit_softcap)
        sc = jnp.where(_allowed(q_pos, k_pos, valid_b, sliding_window), sc, MASK_VALUE)
        m_new = jnp.maximum(m, sc.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[..., None])
        l = l * alpha + p.sum(-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(q_bshd.dtype), v_b, preferred_element_type=jnp.float32)
        return (m_new, l, acc * alpha[..., None] + pv), None

    init = (jnp.full((b, hk, g, s), MASK_VALUE, jnp.float32), jnp.zeros((b, hk, g, s), jnp.float32),
            jnp.zeros((b, hk, g, s, d), jnp.float32))
    (m, l, acc), _ = lax.scan(step, init, _blocks(k_bskd, v_bskd, valid_bs, block_k))
    out = (acc / l[..., None]).astype(q_bshd.dtype)           # [B,Hk,G,S,D]
    out_bshd = out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
    return out_bshd, (m, l)


def _bwd_blockwise(q_bshd, k_bskd, v_bskd, valid_bs, out_bshd, stats, do_bshd, scale, logit_softcap,
                   sliding_window, block_k):
    """(dq, dk, dv) from the forward's out and softmax statistics, one key block at a time.

    stats: (m, l) of `_fwd_blockwise`, or ("lse2", lse) with the kernel's base-2 logsumexp [B, Hk, G, S]."""
    b, s, h, d = q_bshd.shape
    hk = k_bskd.shape[2]
    g = h // hk
    dtype = q_bshd.dtype
    q_bskgd = q_bshd.reshape(b, s, hk, g, d)
    do_bskgd = do_bshd.reshape(b, s, hk, g, d).astype(dtype)
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", out_bshd.reshape(b, s, hk, g, d).astype(jnp.float32),
                       do_bskgd.astype(jnp.float32))
    q_pos = jnp.arange(s, dtype=jnp.int32)

    def step(dq_acc, blk):
        k_b, v_b, valid_b, k_pos = blk
        raw = jnp.einsum("bqkgd,bskd->bkgqs", q_bskgd, k_b, preferred_element_type=jnp.float32) * scale
        sc, t = _capped(raw, logit_softcap)
        allowed = _allowed(q_pos, k_pos, valid_b, sliding_window)
        sc = jnp.where(allowed, sc, MASK_VALUE)
        p = _probs(sc, stats)                                                # normalized probabilities
        p16 = p.astype(dtype)
        dv_b = jnp.einsum("bkgqs,bqkgd->bskd", p16, do_bskgd, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_bskgd, v_b, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        ds = jnp.where(allowed, ds, 0.0) * scale
        ds16 = ds.astype(dtype) if dtype != jnp.float32 else ds
        dq_acc = dq_acc + jnp.einsum("bkgqs,bskd->bqkgd", ds16, k_b, preferred_element_type=jnp.float32)
        dk_b = jnp.einsum("bkgqs,bqkgd->bskd", ds16, q_bskgd, preferred_element_type=jnp.float32)
        return dq_acc, (dk_b, dv_b)

    dq, (dk_blocks, dv_blocks) = lax.scan(step, jnp.zeros((b, s, hk, g, d), jnp.float32),
                                          _blocks(k_bskd, v_bskd, valid_bs, block_k))
    unblock = lambda x: x.swapaxes(0, 1).reshape(k_bskd.shape)
    return (dq.reshape(b, s, h, d).astype(dtype), unblock(dk_blocks).astype(k_bskd.dtype),
            unblock(dv_blocks).astype(v_bskd.dtype))


def _probs(sc, stats):
    if isinstance(stats[0], str):  # ("lse2", lse) from the kernel
        return jnp.exp2(sc * LOG2E - stats[1][..., None])
    m, l = stats
    return jnp.exp(sc - m[..., None]) / l[..., None]


def _pick_block(s: int, block_k: int) -> int:
    """The largest divisor of s that is <= block_k (keys are not padded: padding would change the average
    a fully masked row takes)."""
    block_k = max(1, min(block_k, s))
    while s % block_k:
        block_k -= 1
    return block_k


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _reference_op(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, block_k):
    return _fwd_blockwise(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, block_k)[0]


def _reference_op_fwd(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, block_k):
    out, lse = _fwd_blockwise(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, block_k)
    return out, (q_bshd, k_bskd, v_bskd, valid_bs, out, lse)


def _reference_op_bwd(scale, logit_softcap, sliding_window, block_k, res, do_bshd):
    q_bshd, k_bskd, v_bskd, valid_bs, out, lse = res
    dq, dk, dv = _bwd_blockwise(q_bshd, k_bskd, v_bskd, valid_bs, out, lse, do_bshd, scale, logit_softcap,
                                sliding_window, block_k)
    return dq, dk, dv, None


_reference_op.defvjp(_reference_op_fwd, _reference_op_bwd)


def _valid(attention_mask_bs, b, s):
    if attention_mask_bs is None:
        return jnp.ones((b, s), bool)
    return attention_mask_bs.astype(bool)


def flash_attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, *, logit_softcap=None,
                              sliding_window=None, block_k=512):
    """Causal GQA attention (optional cap and window, key padding mask [batch, seq], 1 = real token), pure
    jnp, O(seq * block_k) memory per head, forward and backward blockwise. -> [batch, seq, q_heads, head_dim]."""
    _check_args(q_bshd, k_bskd, v_bskd, attention_mask_bs, logit_softcap, sliding_window)
    b, s = q_bshd.shape[:2]
    cap = None if logit_softcap is None else float(logit_softcap)
    window = None if sliding_window is None else int(sliding_window)
    return _reference_op(q_bshd, k_bskd, v_bskd, _valid(attention_mask_bs, b, s), float(scale), cap, window,
                         _pick_block(s, block_k))
