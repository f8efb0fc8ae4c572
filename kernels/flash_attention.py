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

Backward: the kernel's residuals (out, lse) feed a jnp backward (FlashAttention-2's, recomputing each score
tile once: dV += P^T dO, dS = P * (dP - delta) (times 1 - tanh^2 under the cap), dQ += dS K, dK += dS^T Q).
With a sliding window it is `_bwd_band`: query blocks of 512 against only the window's key slab, so the
window saves time in the backward too (seq * (window + 511) score pairs, not seq^2); without one it is
`_bwd_blockwise` over all key blocks. A Mosaic GPU backward kernel is future work.

Tested on the CPU: the whole kernel in Pallas' GPU interpret mode (there P goes to wgmma through SMEM,
because the interpreter's wgmma reads its A operand from SMEM only; compiled, P stays in registers), and
the compiled variant through Mosaic GPU lowering for cuda (no PTX, no run). The masked and unmasked key
ranges are not split into separate loops: the split variant hung the interpreter (as did fori_loops with a
traced lower bound, hence `_loop_from`), and untested control flow is not worth a few VALU ops per score.

Maintained alternative: tokamax 0.0.17 (PyPI, pure Python, needs jax >= 0.11.1) has a Hopper Mosaic GPU
flash attention with `logits_soft_cap`, `local_window_size` and a Mosaic GPU backward:
`tokamax.dot_product_attention(q, k, v, mask=..., is_causal=True, local_window_size=(window - 1, 0),
logits_soft_cap=cap, implementation="mosaic")`. With a window, its mask decomposition turns causality into
per-row k_start/k_end (is_causal=False): the sm90 forward skips key blocks outside them, but the sm90
backward's loops are bounded only by is_causal, so with a window it runs over all seq^2 blocks (masking
elementwise). Not run here (no GPU).

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


def _bwd_band(q_bshd, k_bskd, v_bskd, valid_bs, out_bshd, lse2_bkgs, do_bshd, scale, logit_softcap,
              sliding_window, block_q):
    """(dq, dk, dv) for a sliding window, one query block at a time against only the keys it can see.

    Query block [q0, q0 + block_q) sees keys [q0 - window + 1, q0 + block_q): a static slab of
    L = window - 1 + block_q keys (clamped into [0, seq)), so the work is seq * L, not seq^2. dK and dV are
    accumulated into fp32 [B, S, Hk, D] carries slab by slab. Stats: the kernel's base-2 lse (+inf for rows
    without a visible key, which then get no gradient)."""
    b, s, h, d = q_bshd.shape
    hk = k_bskd.shape[2]
    g = h // hk
    dtype = q_bshd.dtype
    nq = s // block_q
    slab = min(s, sliding_window - 1 + block_q)
    q_bskgd = q_bshd.reshape(b, s, hk, g, d)
    do_bskgd = do_bshd.reshape(b, s, hk, g, d).astype(dtype)
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", out_bshd.reshape(b, s, hk, g, d).astype(jnp.float32),
                       do_bskgd.astype(jnp.float32))
    split_q = lambda x: x.reshape(b, nq, block_q, *x.shape[2:]).swapaxes(0, 1)      # [nq, B, bq, ...]
    split_stat = lambda x: jnp.moveaxis(x.reshape(b, hk, g, nq, block_q), 3, 0)    # [nq, B, Hk, G, bq]

    def step(carry, blk):
        dk_acc, dv_acc = carry
        qi, q_b, do_b, lse_b, delta_b = blk
        q0 = qi * block_q
        start = jnp.clip(q0 + block_q - slab, 0, s - slab)
        k_b = lax.dynamic_slice_in_dim(k_bskd, start, slab, axis=1)
        v_b = lax.dynamic_slice_in_dim(v_bskd, start, slab, axis=1)
        valid_b = lax.dynamic_slice_in_dim(valid_bs, start, slab, axis=1)
        q_pos = q0 + jnp.arange(block_q, dtype=jnp.int32)
        k_pos = start + jnp.arange(slab, dtype=jnp.int32)
        raw = jnp.einsum("bqkgd,bskd->bkgqs", q_b, k_b, preferred_element_type=jnp.float32) * scale
        sc, t = _capped(raw, logit_softcap)
        allowed = _allowed(q_pos, k_pos, valid_b, sliding_window)
        sc = jnp.where(allowed, sc, MASK_VALUE)
        p = jnp.exp2(sc * LOG2E - lse_b[..., None])
        dv_b = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dtype), do_b, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_b, v_b, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_b[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        ds = jnp.where(allowed, ds, 0.0) * scale
        ds16 = ds.astype(dtype) if dtype != jnp.float32 else ds
        dq_b = jnp.einsum("bkgqs,bskd->bqkgd", ds16, k_b, preferred_element_type=jnp.float32)
        dk_b = jnp.einsum("bkgqs,bqkgd->bskd", ds16, q_b, preferred_element_type=jnp.float32)
        add = lambda acc, x: lax.dynamic_update_slice_in_dim(
            acc, lax.dynamic_slice_in_dim(acc, start, slab, axis=1) + x, start, axis=1)
        return (add(dk_acc, dk_b), add(dv_acc, dv_b)), dq_b

    zeros = jnp.zeros(k_bskd.shape, jnp.float32)
    blocks = (jnp.arange(nq, dtype=jnp.int32), split_q(q_bskgd), split_q(do_bskgd), split_stat(lse2_bkgs),
              split_stat(delta))
    (dk, dv), dq_blocks = lax.scan(step, (zeros, zeros), blocks)
    dq = dq_blocks.swapaxes(0, 1).reshape(b, s, h, d)
    return dq.astype(dtype), dk.astype(k_bskd.dtype), dv.astype(v_bskd.dtype)


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


# ----------------------------------------------------------------------------------------------
# the Mosaic GPU forward kernel
# ----------------------------------------------------------------------------------------------

BLOCK_Q = 64               # query rows per compute warpgroup (wgmma's M is 64 per warpgroup)
NUM_COMPUTE_WGS = 2        # the CTA covers 2 * BLOCK_Q query rows
CTA_Q = BLOCK_Q * NUM_COMPUTE_WGS
HEAD_DIMS = (64, 128, 256)
# key block and pipeline depth per head_dim: K/V ring = 2 * STAGES * BLOCK_K * D * 2 bytes of SMEM
_BLOCKS = {64: (128, 3), 128: (128, 2), 256: (64, 2)}
MASK2 = MASK_VALUE * LOG2E  # the mask value in base-2 logit units (finite)


def supported(q_bshd, k_bskd=None, v_bskd=None, attention_mask_bs=None, *, logit_softcap=None,
              sliding_window=None) -> bool:
    """Whether the Mosaic GPU kernel takes these inputs (else `flash_attention` runs the reference):
    bf16 q/k/v, head_dim in HEAD_DIMS, seq a multiple of CTA_Q (128), kv heads dividing q heads."""
    del logit_softcap, sliding_window, attention_mask_bs
    if q_bshd.ndim != 4 or q_bshd.dtype != jnp.bfloat16:
        return False
    b, s, h, d = q_bshd.shape
    if d not in HEAD_DIMS or s % CTA_Q or s == 0:
        return False
    for x in (k_bskd, v_bskd):
        if x is not None and (x.dtype != jnp.bfloat16 or x.ndim != 4 or x.shape[0] != b or x.shape[1] != s
                              or x.shape[3] != d or h % x.shape[2]):
            return False
    return True


def _kv_range(q0, rows, seq, block_k, window):
    """Key blocks [lo, hi) that a tile of query rows [q0, q0 + rows) can see (causal, window)."""
    hi = lax.min(lax.div(q0 + jnp.int32(rows + block_k - 1), jnp.int32(block_k)), jnp.int32(seq // block_k))
    if window is None:
        return jnp.int32(0), hi
    first_key = lax.max(q0 - jnp.int32(window - 1), jnp.int32(0))
    return lax.div(first_key, jnp.int32(block_k)), hi


def _fwd_kernel_call(q_bshd, k_bskd, v_bskd, bias_bs, *, scale, logit_softcap, sliding_window, interpret,
                     block_k=None, stages=None):
    """(out [B, S, H, D] bf16, lse2 [B, H, S] fp32 base-2 logsumexp; +inf for rows with no visible key)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, s, h, d = q_bshd.shape
    hk = k_bskd.shape[2]
    groups = h // hk
    bk_default, stages_default = _BLOCKS[d]
    bk = block_k or bk_default
    stages = stages or stages_default
    assert s % CTA_Q == 0 and s % bk == 0, (s, bk)
    window = sliding_window
    dtype = q_bshd.dtype
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)   # one value per query row
    col_layout = plgpu.Layout.WGMMA.reduce(0)   # one value per key

    def kernel(q_ref, k_ref, v_ref, bias_ref, out_ref, lse_ref, q_smem, k_smem, v_smem, bias_smem, lse_smem,
               q_ready, k_ready, v_ready, k_consumed, v_consumed, *p_smem_if_interpret):
        p_smem = p_smem_if_interpret[0] if interpret else None
        hi_ = lax.axis_index("heads")
        bi = lax.axis_index("batch")
        q_cta = lax.axis_index("q_tiles") * CTA_Q
        kv_head = lax.div(hi_, jnp.array(groups, hi_.dtype))
        lo, hi = _kv_range(q_cta, CTA_Q, s, bk, window)
        n_steps = hi - lo
        wg = lax.axis_index("wg")

        @pl.when(wg < NUM_COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = q_cta + wg * BLOCK_Q                  # this warpgroup's first query row
            my_q = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(r0, BLOCK_Q), hi_], my_q, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            def kv_step(i, carry):
                """Key block lo + i (i counts from 0, see _loop_from)."""
                acc, m_i, l_i = carry
                step = lo + i
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].T)
                    return acc_ref[...]

                sc = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, bk), jnp.float32))
                key_bias = plgpu.load(bias_smem.at[slot], layout=col_layout)
                plgpu.barrier_arrive(k_consumed.at[slot])
                # base-2 logits: p = exp2(s2 - m) with s2 = capped logit * log2(e)
                if logit_softcap is None:
                    sc = sc * (scale * LOG2E)
                else:
                    sc = jnp.tanh(sc * (scale / logit_softcap)) * (logit_softcap * LOG2E)
                sc = sc + lax.broadcast_in_dim(key_bias, sc.shape, [1])
                # causal and window masks on every block (splitting the loop into masked and unmasked
                # ranges hung Pallas' GPU interpreter, so it is not done: compiled code = tested code)
                q_pos = r0 + plgpu.broadcasted_iota(jnp.int32, sc.shape, 0, layout=wgmma_layout)
                k_pos = step * bk + plgpu.broadcasted_iota(jnp.int32, sc.shape, 1, layout=wgmma_layout)
                ok = k_pos <= q_pos
                if window is not None:
                    ok = ok & (q_pos - k_pos < window)
                sc = jnp.where(ok, sc, MASK2)
                m_new = jnp.maximum(m_i, sc.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_ready.at[slot])
                if interpret:
                    # the interpreter's wgmma reads A from SMEM only: P goes through SMEM there
                    my_p = p_smem.at[wg]
                    my_p[...] = p16
                    plgpu.commit_smem()

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, my_p, v_smem.at[slot])
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((BLOCK_Q, d), jnp.float32))
                else:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])   # P from registers

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l_i

            # Both warpgroups consume every block of the CTA's range [lo, hi), so the ring stays in step.
            carry = (
                plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), wgmma_layout),
                plgpu.layout_cast(jnp.full((BLOCK_Q,), MASK2, jnp.float32), row_layout),
                plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), row_layout),
            )
            acc, m_i, l_i = _loop_from(0, n_steps, kv_step, carry)

            visible = m_i > 0.5 * MASK2                  # the row saw at least one allowed key
            inv_l = jnp.where(visible, 1.0 / l_i, 0.0)
            my_q[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(visible, m_i + jnp.log(l_i) * (1 / math.log(2)), jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, out_ref.at[bi, pl.ds(r0, BLOCK_Q), hi_])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi_, pl.ds(r0, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == NUM_COMPUTE_WGS)
        def _load():
            plgpu.set_max_registers(40, action="decrease")

            def load(step, slot):
                keys = pl.ds(step * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(bias_ref.at[bi, keys], bias_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kv_head], v_smem.at[slot], v_ready.at[slot])

            for i in range(stages):
                @pl.when(i < n_steps)
                def _prologue():
                    load(lo + i, i)

            @pl.loop(stages, n_steps)
            def _steady(i):
                step = lo + i
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.barrier_wait(v_consumed.at[slot])
                load(step, slot)

            # observe the last releases too (nothing left to load), so every barrier phase is waited on
            @pl.loop(lax.max(n_steps - stages, jnp.int32(0)), n_steps)
            def _drain(i):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.barrier_wait(v_consumed.at[slot])

    scratch = [
        plgpu.SMEM((NUM_COMPUTE_WGS, BLOCK_Q, d), dtype, transforms=swizzled),      # Q, then O
        plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled),                    # K ring
        plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled),                    # V ring
        plgpu.SMEM((stages, bk), jnp.float32),                                      # key padding bias
        plgpu.SMEM((NUM_COMPUTE_WGS, BLOCK_Q), jnp.float32),                        # lse
        plgpu.Barrier(num_barriers=NUM_COMPUTE_WGS),                                # q_ready
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),                         # k_ready (K + bias)
        plgpu.Barrier(num_barriers=stages),                                         # v_ready
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=stages),           # k_consumed
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=stages),           # v_consumed
    ]
    if interpret:  # P's SMEM tile (the compiled kernel keeps P in registers)
        scratch.append(plgpu.SMEM((NUM_COMPUTE_WGS, BLOCK_Q, bk), dtype, transforms=swizzled))
    kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    f = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, s, h, d), dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
        scratch_types=scratch,
        grid=(h, s // CTA_Q, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )
    return f(q_bshd, k_bskd, v_bskd, bias_bs)


def _loop_from(start, stop, body, carry):
    """fori_loop over [start, stop) as a loop from 0 (Pallas' GPU interpreter hung on fori_loops whose lower
    bound is traced; jax 0.11.2)."""
    return lax.fori_loop(0, stop - start, lambda j, c: body(start + j, c), carry)


def _key_bias(valid_bs):
    """fp32 [B, S]: 0 for a real key, MASK2 for padding (added to base-2 logits in the kernel)."""
    return jnp.where(valid_bs, 0.0, MASK2).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _kernel_op(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, interpret):
    return _kernel_op_fwd(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, interpret)[0]


def _kernel_op_fwd(q_bshd, k_bskd, v_bskd, valid_bs, scale, logit_softcap, sliding_window, interpret):
    out, lse2 = _fwd_kernel_call(q_bshd, k_bskd, v_bskd, _key_bias(valid_bs), scale=scale,
                                 logit_softcap=logit_softcap, sliding_window=sliding_window, interpret=interpret)
    return out, (q_bshd, k_bskd, v_bskd, valid_bs, out, lse2)


def _kernel_op_bwd(scale, logit_softcap, sliding_window, interpret, res, do_bshd):
    del interpret
    q_bshd, k_bskd, v_bskd, valid_bs, out, lse2 = res
    b, s, h, _ = q_bshd.shape
    hk = k_bskd.shape[2]
    lse2_bkgs = lse2.reshape(b, hk, h // hk, s)
    block_q = _pick_block(s, 512)
    if sliding_window is not None and sliding_window - 1 + block_q < s:
        return (*_bwd_band(q_bshd, k_bskd, v_bskd, valid_bs, out, lse2_bkgs, do_bshd, scale, logit_softcap,
                           sliding_window, block_q), None)
    dq, dk, dv = _bwd_blockwise(q_bshd, k_bskd, v_bskd, valid_bs, out, ("lse2", lse2_bkgs), do_bshd, scale,
                                logit_softcap, sliding_window, _pick_block(s, 512))
    return dq, dk, dv, None


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


def flash_attention(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, *, logit_softcap=None, sliding_window=None,
                    interpret=False):
    """Causal GQA attention with optional logit soft-cap and sliding window, key padding mask [batch, seq]
    (1 = real token). The Mosaic GPU kernel on a GPU (or in interpret mode when `interpret`) for inputs
    `supported` takes; `flash_attention_reference` otherwise. -> [batch, seq, q_heads, head_dim].

    Rows with no visible key (padded queries) give 0 from the kernel, and no gradient."""
    _check_args(q_bshd, k_bskd, v_bskd, attention_mask_bs, logit_softcap, sliding_window)
    b, s = q_bshd.shape[:2]
    cap = None if logit_softcap is None else float(logit_softcap)
    window = None if sliding_window is None else int(sliding_window)
    use_kernel = (interpret or jax.default_backend() == "gpu") and supported(q_bshd, k_bskd, v_bskd)
    if not use_kernel:
        return flash_attention_reference(q_bshd, k_bskd, v_bskd, attention_mask_bs, scale, logit_softcap=cap,
                                         sliding_window=window)
    return _kernel_op(q_bshd, k_bskd, v_bskd, _valid(attention_mask_bs, b, s), float(scale), cap, window,
                      bool(interpret))


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
