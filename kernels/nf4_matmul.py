"""NF4 dequantization fused into the matmul: a Pallas Mosaic GPU kernel for Hopper, beside its jnp reference.

    nf4_matmul(x_mk, w)    = x @ deq(W)^T  -> [M, N]   the forward of a Linear whose W is [out=N, in=K]
    nf4_matmul_t(dy_mn, w) = dy @ deq(W)   -> [M, K]   the backward's dX

    with the LoRA branch in the same fp32 accumulator (R = rank, xa already scaled by the caller):
    nf4_matmul(x_mk, w, lora=(xa_mr, b_nr))    = x @ deq(W)^T + xa @ b^T
    nf4_matmul_t(dy_mn, w, lora=(gb_mr, a_rk)) = dy @ deq(W) + gb @ a

`w` is a `fastlora_jax.quant.NF4Weight` in bitsandbytes' layout: `packed` is the row-major W, two codes a
byte, the FIRST element in the HIGH nibble (so it reshapes to [N, K/2]); blocks of 64 along the flattened
order, so with K % 64 == 0 the scales form [N, K/64]. deq(W) = bf16(float32(NF4[code] * scale)), rounded
once, exactly as `NF4Weight.dequantize(bfloat16)` (and so bnb's dequantize_4bit) computes it.

How the kernel works (one CTA = 2 compute warpgroups + 1 TMA warpgroup, persistent over output tiles):

* The TMA warpgroup streams, per contraction step of 64: the activation tile (256 x 64 bf16, swizzled for
  wgmma), the packed weight tile (uint8, unswizzled) and its float32 scales. The scales are decoded from the
  double-quantized absmax by one tiny XLA op before the kernel and passed transposed, [K/64, N], so a
  scale tile is a TMA box whose inner extent is at least 16 bytes.
* The two compute warpgroups split the 256 rows of the activation tile (128 each) and SHARE one dequantized
  weight tile: each dequantizes half of its rows into a triple-buffered SMEM tile, in exactly the 128-byte
  swizzled layout wgmma reads, then both wait on an mbarrier and issue wgmma with fp32 accumulators
  (wgmma_wait(1): the dequantization of step k+1 overlaps the tensor-core work of step k). The
  dequantized W therefore never leaves SMEM.
* Forward: the weight tile is [128 rows of N, 64 of K] and is wgmma's B operand transposed (K-major).
  Transposed op: the tile is [64 rows of N (the contraction), 128 of K] and is B as stored (N-major).
  Same packed bytes, same dequantization code, the other contraction.
* LoRA (`lora=`): after the last NF4 step each output tile takes one more contraction step of 64 whose
  operands are dense bf16 tiles, so the LoRA product adds no [M, N] pass of its own (and no rounding: both
  products meet in fp32). The wrapper zero-pads R to 64 (R <= 64; R is 8..64 in practice), so the step has
  exactly the shape and 128-byte swizzle of a K step: the left tile (xa or gb, [rows, 64]) is the A operand,
  the right tile is B exactly as a W tile would be (b [128 of N, 64], K-major; a [64, 128 of K], as stored).
  SMEM is full (~226 of 227 KiB), so nothing new is allocated: each warpgroup TMA-loads its 128 rows of the
  left tile into its own [128, 64] epilogue buffer at the start of the tile (hidden behind the main loop;
  the epilogue only needs that buffer after the last wgmma), and the right tile after the main loop into
  the dequantized-W buffer that a next step would have used (step numbering counts the LoRA step, so the
  buffer-reuse argument is unchanged; shared layout: warpgroup 0 loads it, the other arrives on its barrier
  once past its own main loop, which is the barrier that step would have had). Its load latency (one 16 KiB
  tile, mostly from L2) is exposed once per output tile.
* Dequantization in registers (`_dequant_unit`): each thread takes 32 consecutive codes of one row (one
  16-byte shared load) and their block's scale. It builds the row's 16-entry table bf16(NF4[i] * scale)
  (16 multiplies, 8 `cvt.rn.bf16x2.f32`) and splits it into low and high bytes (8 `prmt`). A code is then
  looked up four at a time with byte permutes: `prmt` on the table's low/high halves indexed by code & 7,
  a `lop3` picking the half by code bit 3 (its byte mask is itself one `prmt` in sign-replicate mode), and
  two `prmt`s interleaving low and high bytes into bf16 pairs: about 3 integer instructions per element,
  no select trees, no shared-memory lookups. Each thread then writes four 16-byte `st.shared.v4` at
  swizzled addresses (conflict-free: the eight lanes of a phase cover eight rows of one 1024-byte atom).

Off the GPU the same kernel runs in Pallas' GPU interpret mode; there the register-level dequantization
(raw Mosaic GPU code through `plgpu.inline_mgpu`, which the interpreter cannot run) is replaced by its jnp
equivalent, and the raw algorithm is checked separately by `_emulate_dequant`, which runs the very same
`_dequant_program` code on numpy "registers" for all 128 threads of both warpgroups.

Measured (H100 80GB HBM3, jax 0.11.2, M = 4096, `benchmarks/nf4_matmul.py`, lines in results.jsonl): the
kernel reaches 0.59-0.73 of the FLOP floor (784 TFLOP/s), on par with XLA's dequantize-then-matmul
(0.96-1.10x) while never writing a bf16 W; 0.77x of XLA for the N=512 forward, whose 64 CTA tiles leave
half of the 132 SMs idle. cuBLAS on an already dense bf16 W is ~25% faster than both. JAX's dense bf16
Pallas matmul with this same CTA skeleton runs 0.177 ms at 4096^3 (cuBLAS 0.188, this kernel 0.250): the
pipeline is not the limit, the dequantization sitting between wgmma issues is. Next steps: a dedicated
dequantizing warpgroup feeding the tile ring (warp specialization), or the dequantized W as wgmma's
register A operand (out^T = W x^T), which also drops its SMEM round trip. The 'split' layout
(`TileConfig(shared_dequant=False)`) measured equal in the forward and 10-20% slower transposed.

Known open question: the last contraction step's activation slot is never released, so the next output
tile's prologue may refill it by TMA while the last wgmma could still read it. The HBM load is slower than
one wgmma, so no test has seen it; nothing guarantees it either. (One-step contractions with more tiles than
CTAs, where the loader can run a whole tile ahead, are refused by `supported`.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fastlora_jax.quant import NF4_CODE, NF4Weight

__all__ = [
    "IMPLS",
    "TileConfig",
    "kernel_scales",
    "nf4_matmul",
    "nf4_matmul_reference",
    "nf4_matmul_t",
    "nf4_matmul_t_reference",
    "supported",
]

IMPLS = ("auto", "pallas", "xla", "interpret")


# ----------------------------------------------------------------------------------------------
# reference (what the kernel is checked against, and what runs off-GPU)
# ----------------------------------------------------------------------------------------------


def _as_2d_weight(w: NF4Weight) -> tuple[int, int]:
    if not isinstance(w, NF4Weight):
        raise ValueError(f"w must be an NF4Weight, got {type(w).__name__}")
    if w.stack_shape:
        raise ValueError(f"w is a stack of weights {w.stack_shape}; pass one weight (slice the stack first)")
    if len(w.weight_shape) != 2:
        raise ValueError(f"w must be a 2-D [out, in] weight, got shape {w.weight_shape}")
    n, k = w.weight_shape
    return n, k


def _check_lora(lora, *, op: str, lead: tuple, other: tuple[str, int], transposed: bool):
    """(left [..., R], right) of a `lora=` pair after checking them; R = the LoRA rank.

    Forward: (xa_mr [..., R], b_nr [N, R]); transposed: (gb_mr [..., R], a_rk [R, K]). `other` names the
    right operand's non-rank dimension and its size, for the messages."""
    names = ("gb_mr", "a_rk") if transposed else ("xa_mr", "b_nr")
    if not isinstance(lora, (tuple, list)) or len(lora) != 2:
        raise ValueError(f"{op}: lora must be None or a pair ({names[0]}, {names[1]}), got {type(lora).__name__}"
                         + (f" of length {len(lora)}" if isinstance(lora, (tuple, list)) else ""))
    left, right = map(jnp.asarray, lora)
    for name, v in zip(names, (left, right)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"{op}: lora {name} has dtype {v.dtype}; a floating dtype is accepted "
                             "(it is rounded to bfloat16, as the kernel's tensor cores read it)")
    if left.ndim < 1 or tuple(left.shape[:-1]) != tuple(lead) or left.shape[-1] < 1:
        raise ValueError(f"{op}: lora {names[0]}.shape={tuple(left.shape)}; expected {(*lead, 'R')} "
                         f"(the activation's leading dims {tuple(lead)}, then the rank R >= 1)")
    r = left.shape[-1]
    dim, size = other
    want = (r, size) if transposed else (size, r)
    if tuple(right.shape) != want:
        want_s = f"[R={r}, {dim}={size}]" if transposed else f"[{dim}={size}, R={r}]"
        raise ValueError(f"{op}: lora {names[1]}.shape={tuple(right.shape)}; expected {want_s} "
                         f"(R from {names[0]}.shape[-1])")
    return left, right


def nf4_matmul_reference(x_mk: jax.Array, w: NF4Weight, *, lora=None) -> jax.Array:
    """x @ deq(W)^T (+ xa @ b^T) with deq in bf16 (as `kernels.reference.dense_weight(w, bf16)`), operands in
    bf16, both products summed in fp32 and rounded once: the kernel's math."""
    n, _ = _as_2d_weight(w)
    w_nk = w.dequantize(jnp.bfloat16)
    acc = jnp.einsum("...k,nk->...n", x_mk.astype(jnp.bfloat16), w_nk, preferred_element_type=jnp.float32)
    if lora is not None:
        xa_mr, b_nr = _check_lora(lora, op="nf4_matmul", lead=x_mk.shape[:-1], other=("N", n), transposed=False)
        acc = acc + jnp.einsum("...r,nr->...n", xa_mr.astype(jnp.bfloat16), b_nr.astype(jnp.bfloat16),
                               preferred_element_type=jnp.float32)
    return acc.astype(jnp.bfloat16)


def nf4_matmul_t_reference(dy_mn: jax.Array, w: NF4Weight, *, lora=None) -> jax.Array:
    """dy @ deq(W) (+ gb @ a) with deq in bf16, fp32 accumulation of both products, one rounding."""
    _, k = _as_2d_weight(w)
    w_nk = w.dequantize(jnp.bfloat16)
    acc = jnp.einsum("...n,nk->...k", dy_mn.astype(jnp.bfloat16), w_nk, preferred_element_type=jnp.float32)
    if lora is not None:
        gb_mr, a_rk = _check_lora(lora, op="nf4_matmul_t", lead=dy_mn.shape[:-1], other=("K", k), transposed=True)
        acc = acc + jnp.einsum("...r,rk->...k", gb_mr.astype(jnp.bfloat16), a_rk.astype(jnp.bfloat16),
                               preferred_element_type=jnp.float32)
    return acc.astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------

WG_ROWS = 128   # threads of a warpgroup; also its rows of the activation in the shared layout
NUM_COMPUTE_WGS = 2
K_STEP = 64     # contraction per pipeline step (one 128-byte swizzle row of bf16, one NF4 block)
BLOCK = 64      # NF4 blocksize the kernel supports
EPI = 64        # epilogue sub-tile (64 x 64 bf16 through SMEM, then TMA)
MAX_LORA_RANK = K_STEP  # the LoRA term is one extra contraction step, its rank zero-padded to K_STEP


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Knobs of the kernel (tile sizes follow from `shared_dequant`; they are tied to the dequant layout).

    shared_dequant=True: CTA tile 256 (M) x 128 (out); the two compute warpgroups take 128 rows each and
    share one dequantized weight tile (each fills half of it, then both wait on an mbarrier).
    shared_dequant=False: CTA tile 128 x 256; each warpgroup owns 128 output columns and dequantizes its
    own weight tile (twice the dequantization work per FLOP, no lockstep between the warpgroups)."""
    stages: int = 4            # TMA pipeline depth (must exceed delay_release=1)
    shared_dequant: bool = True
    grid_minor: int = 1        # planar_snake: 0 -> walk M fastest, 1 -> walk the output columns fastest
    grid_tile_width: int = 8   # planar_snake tile width (L2 reuse)
    memory_registers: int = 40


DEFAULT_CONFIG = TileConfig()


@dataclasses.dataclass(frozen=True)
class _Geom:
    """Tile geometry of one kernel variant (all sizes in elements, packed widths in bytes)."""
    transposed: bool
    shared: bool

    @property
    def cta_m(self): return 256 if self.shared else 128          # activation rows per CTA
    @property
    def cta_out(self): return 128 if self.shared else 256        # output columns per CTA
    @property
    def w_rows(self): return K_STEP if self.transposed else 128  # one dequantized W buffer: rows of W
    @property
    def w_cols(self): return 128 if self.transposed else K_STEP  # ... and columns of W (K)
    @property
    def p_rows(self): return K_STEP if self.transposed else self.cta_out   # packed tile per step
    @property
    def p_bytes(self): return self.cta_out // 2 if self.transposed else K_STEP // 2
    @property
    def s_rows(self): return self.cta_out // BLOCK if self.transposed else 1  # scale tile per step
    @property
    def s_cols(self): return K_STEP if self.transposed else self.cta_out
    @property
    def dq_buffers(self): return 3 if self.shared else 2


def supported(m: int, n: int, k: int, *, transposed: bool = False, config: TileConfig | None = None) -> bool:
    """Whether the fused kernel handles x[m, k] @ W[n, k]^T (or dy[m, n] @ W[n, k] when transposed)."""
    g = _Geom(transposed, (config or DEFAULT_CONFIG).shared_dequant)
    if min(m, n, k) <= 0 or m % g.cta_m or k % K_STEP:
        return False
    if transposed:
        ok, steps, tiles = n % K_STEP == 0 and k % g.cta_out == 0, n // K_STEP, (m // g.cta_m) * (k // g.cta_out)
    else:
        ok, steps, tiles = n % g.cta_out == 0, k // K_STEP, (m // g.cta_m) * (n // g.cta_out)
    # One contraction step with more output tiles than CTAs: the loading warpgroup (delay_release=1) can run
    # ahead of the compute warpgroups into the next tile (found in interpret mode) -- not supported.
    return ok and (steps > 1 or tiles <= _num_sms())


def kernel_scales(w: NF4Weight) -> jax.Array:
    """float32 scales [K/64, N] (transposed, so that a [.., 128] tile is a legal TMA box), nested absmax decoded.

    Exactly `NF4Weight.absmax_f32()` (bnb's `code[q] * nested_absmax + offset`, no fma), transposed."""
    n, k = _as_2d_weight(w)
    return w.absmax_f32().reshape(n, k // BLOCK).T


# ----------------------------------------------------------------------------------------------
# the register-level dequantization (one "unit" = 32 codes of one row, per thread)
# ----------------------------------------------------------------------------------------------

# prmt selectors (PTX prmt.b32 d, a, b, c: byte i of d is byte c[4i+2:4i] of {b, a}, a = bytes 0-3;
# c[4i+3] set -> the selected byte's bit 7 replicated).
_SEL_LOW_BYTES = 0x6420   # bytes 0, 2 of a and b: low bytes of two bf16 pairs
_SEL_HIGH_BYTES = 0x7531
_SEL_MASK_03 = 0xD9C8     # sign of bytes a0, b0, a1, b1: bit 3 of codes 0..3 (see _dequant_unit)
_SEL_MASK_47 = 0xFBEA     # sign of bytes a2, b2, a3, b3: bit 3 of codes 4..7
_SEL_PAIR_LO = 0x5140     # (lo0, hi0, lo1, hi1): two bf16 values from low-byte and high-byte words
_SEL_PAIR_HI = 0x7362
_LOP3_SELECT = 0xD8       # lop3 immLut of (a & ~c) | (b & c)


def _dequant_unit(ops, words, scale):
    """32 NF4 codes (4 uint32 words of packed bytes) and their float32 scale -> 16 uint32 words of bf16 pairs.

    `ops` is either the Mosaic GPU emitter (per-thread MLIR values) or the numpy emulator (arrays over all
    threads): the same code is what runs on the GPU and what the CPU tests check bit for bit.
    Packed byte j of a row holds code 2j in its high nibble and 2j+1 in its low nibble; a little-endian word
    w therefore has nibbles (e1, e0, e3, e2, e5, e4, e7, e6) from bit 0 up.
    """
    # The row's table T[i] = bf16(NF4[i] * scale) as 8 bf16 pairs, then split into low and high bytes.
    prods = [ops.fmul(ops.f32_const(float(v)), scale) for v in NF4_CODE]
    pairs = [ops.cvt_bf16x2(prods[2 * j + 1], prods[2 * j]) for j in range(8)]  # T[2j] low half, T[2j+1] high
    lo = [ops.prmt(pairs[2 * q], pairs[2 * q + 1], _SEL_LOW_BYTES) for q in range(4)]   # lo[q] = low bytes of T[4q..4q+3]
    hi = [ops.prmt(pairs[2 * q], pairs[2 * q + 1], _SEL_HIGH_BYTES) for q in range(4)]
    out = []
    for w in words:
        # nibble i of ws is code e_i
        ws = ops.or_(ops.and_(ops.shr(w, 4), 0x0F0F0F0F), ops.and_(ops.shl(w, 4), 0xF0F0F0F0))
        ws4 = ops.shl(ws, 4)
        sel = ops.and_(ws, 0x77777777)       # prmt reads selector bits 0-15: codes 0..3 (& 7)
        sel_hi = ops.shr(sel, 16)            # codes 4..7 (& 7)
        # byte k of ws4 has bit 7 = bit 3 of e_{2k}; byte k of ws has bit 7 = bit 3 of e_{2k+1}
        masks = (ops.prmt(ws4, ws, _SEL_MASK_03), ops.prmt(ws4, ws, _SEL_MASK_47))
        for s, m in zip((sel, sel_hi), masks):
            lob = ops.lop3(ops.prmt(lo[0], lo[1], s), ops.prmt(lo[2], lo[3], s), m, _LOP3_SELECT)
            hib = ops.lop3(ops.prmt(hi[0], hi[1], s), ops.prmt(hi[2], hi[3], s), m, _LOP3_SELECT)
            out.append(ops.prmt(lob, hib, _SEL_PAIR_LO))
            out.append(ops.prmt(lob, hib, _SEL_PAIR_HI))
    return out


def _swizzled_offset(r, col_chunk, tile_cols, ops):
    """Byte offset of 16-byte chunk `col_chunk` (8 bf16) of row r in a [rows, tile_cols] bf16 tile stored
    with tiling (8, 64) and the 128-byte swizzle: atoms of 8 rows x 128 bytes, chunk index XOR (row % 8)."""
    atoms_per_row = tile_cols // 64
    r8 = ops.and_(r, 7)
    atom = ops.add(ops.mul(ops.shr(r, 3), atoms_per_row), ops.shr(col_chunk, 3))
    within = ops.add(ops.shl(r8, 7), ops.shl(ops.xor(ops.and_(col_chunk, 7), r8), 4))
    return ops.add(ops.shl(atom, 10), within)


def _dequant_program(ops, g: _Geom, wg, t):
    """Per-thread program of thread t (0..127) of compute warpgroup wg: load packed bytes and a scale from
    the step's packed/scale tiles, dequantize, store 16-byte chunks (swizzled) into the W buffer.

    shared: the warpgroup covers half the rows of the shared tile, a thread 32 codes (half a block) of one
    row: row (t % rows_per_wg), half-block (t // rows_per_wg). Not shared: the warpgroup fills its own
    tile, a thread one whole block (64 codes, one table) of row (t % rows). Either way the 8 lanes of a
    store phase are 8 consecutive rows, which the 128-byte swizzle spreads over all 32 banks."""
    if g.shared:
        rows_per_wg = g.w_rows // NUM_COMPUTE_WGS
        assert rows_per_wg * (g.w_cols // 32) == WG_ROWS, g
        r = ops.add(ops.mul(wg, rows_per_wg), ops.rem(t, rows_per_wg))    # row in the W tile
        hb0 = ops.div(t, rows_per_wg)                                        # first half-block
        nh = 1
        p_off = ops.add(ops.mul(r, g.p_bytes), ops.shl(hb0, 4))
        s_off = ops.add(ops.mul(ops.shr(hb0, 1), g.s_cols), r)
    else:
        assert g.w_rows * (g.w_cols // BLOCK) == WG_ROWS, g
        r = ops.rem(t, g.w_rows)
        blk = ops.div(t, g.w_rows)
        hb0 = ops.shl(blk, 1)
        nh = 2
        if g.transposed:   # the warpgroup's columns: packed bytes [wg*64, +64), scale rows [wg*2, +2)
            p_off = ops.add(ops.mul(r, g.p_bytes), ops.add(ops.mul(wg, g.w_cols // 2), ops.shl(blk, 5)))
            s_off = ops.add(ops.mul(ops.add(ops.mul(wg, g.w_cols // BLOCK), blk), g.s_cols), r)
        else:              # the warpgroup's rows: packed rows [wg*128, +128), scale columns [wg*128, +128)
            row = ops.add(ops.mul(wg, g.w_rows), r)
            p_off = ops.mul(row, g.p_bytes)
            s_off = row
    words = []
    for j in range(nh):
        words += ops.load_packed_v4(ops.add(p_off, 16 * j))
    out = _dequant_unit(ops, words, ops.load_scale(s_off))
    for c in range(4 * nh):
        chunk = ops.add(ops.shl(hb0, 2), c)                                  # 16-byte chunk of the row
        ops.store_v4(_swizzled_offset(r, chunk, g.w_cols, ops), out[4 * c: 4 * c + 4])


class _NumpyOps:
    """Emulates the per-thread program on numpy arrays (one lane per thread), with PTX semantics."""

    def __init__(self, packed_tile: np.ndarray, scale_tile: np.ndarray, out_bytes: np.ndarray):
        self.packed = np.ascontiguousarray(packed_tile, np.uint8).reshape(-1)
        self.scales = np.ascontiguousarray(scale_tile, np.float32).reshape(-1)
        self.out = out_bytes  # flat uint8 buffer of the swizzled tile

    @staticmethod
    def _u(x):
        return np.asarray(x).astype(np.uint32) if not isinstance(x, np.ndarray) or x.dtype != np.uint32 else x

    def add(self, a, b): return (np.asarray(a, np.int64) + np.asarray(b, np.int64))
    def mul(self, a, b): return (np.asarray(a, np.int64) * np.asarray(b, np.int64))
    def rem(self, a, b): return np.asarray(a, np.int64) % b
    def div(self, a, b): return np.asarray(a, np.int64) // b
    def xor(self, a, b): return np.asarray(a, np.int64) ^ np.asarray(b, np.int64)

    def and_(self, a, b):
        if isinstance(a, np.ndarray) and a.dtype == np.uint32:
            return a & np.uint32(b)
        return np.asarray(a, np.int64) & b

    def or_(self, a, b): return self._u(a) | self._u(b)

    def shl(self, a, n):
        if isinstance(a, np.ndarray) and a.dtype == np.uint32:
            return (a << np.uint32(n)).astype(np.uint32)
        return np.asarray(a, np.int64) << n

    def shr(self, a, n):
        if isinstance(a, np.ndarray) and a.dtype == np.uint32:
            return a >> np.uint32(n)
        return np.asarray(a, np.int64) >> n

    def f32_const(self, v): return np.float32(v)
    def fmul(self, a, b): return (np.float32(a) * np.asarray(b, np.float32)).astype(np.float32)

    def cvt_bf16x2(self, a, b):
        """cvt.rn.bf16x2.f32 d, a, b: bf16(a) in the upper half, bf16(b) in the lower (round to nearest even)."""
        def bf16_bits(x):
            u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) & np.uint32(0xFFFF)
        return ((bf16_bits(a) << np.uint32(16)) | bf16_bits(b)).astype(np.uint32)

    def prmt(self, a, b, c):
        a = self._u(a)
        b = self._u(b)
        c = self._u(c)
        a, b, c = np.broadcast_arrays(a, b, c)
        src = np.stack([(a >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
                       + [(b >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)])
        d = np.zeros(a.shape, np.uint32)
        for i in range(4):
            nib = (c >> np.uint32(4 * i)) & np.uint32(0xF)
            byte = np.take_along_axis(src, (nib & np.uint32(7)).astype(np.int64)[None], axis=0)[0]
            sign = np.where((byte & np.uint32(0x80)) != 0, np.uint32(0xFF), np.uint32(0))
            byte = np.where((nib & np.uint32(8)) != 0, sign, byte)
            d |= (byte.astype(np.uint32) << np.uint32(8 * i))
        return d

    def lop3(self, a, b, c, lut):
        assert lut == _LOP3_SELECT
        a, b, c = self._u(a), self._u(b), self._u(c)
        return (a & ~c) | (b & c)

    def load_packed_v4(self, off):
        off = np.asarray(off, np.int64)
        assert np.all(off % 16 == 0)
        b = self.packed[off[:, None] + np.arange(16)[None, :]]  # [threads, 16]
        return [b[:, 4 * i: 4 * i + 4].copy().view(np.uint32)[:, 0] for i in range(4)]

    def load_scale(self, off):
        return self.scales[np.asarray(off, np.int64)]

    def store_v4(self, off, words):
        off = np.asarray(off, np.int64)
        assert np.all(off % 16 == 0)
        data = np.stack([self._u(w) for w in words], axis=1).astype("<u4").view(np.uint8)  # [threads, 16]
        idx = off[:, None] + np.arange(16)[None, :]
        self.out[idx] = data


def _unswizzle(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A [rows, cols] bf16 tile (uint16 bits) from its SMEM bytes: tiled (8, 64) atoms, chunk XOR row % 8."""
    tiled = buf.view(np.uint16).reshape(rows // 8, cols // 64, 8, 64)
    res = np.zeros((rows, cols), np.uint16)
    for r in range(rows):
        for c in range(cols // 8):
            sw = (c % 8) ^ (r % 8)
            res[r, 8 * c: 8 * c + 8] = tiled[r // 8, c // 8][r % 8, 8 * sw: 8 * sw + 8]
    return res


def _emulate_dequant(packed_tile: np.ndarray, scale_tile: np.ndarray, *, transposed: bool,
                     shared: bool = True) -> np.ndarray:
    """Run the GPU dequantization program of one pipeline step for all threads of both warpgroups on numpy.

    packed_tile: uint8 [p_rows, p_bytes], scale_tile: float32 [s_rows, s_cols] (the step's TMA tiles).
    Returns the weight tile(s) the kernel's SMEM then holds, un-swizzled, as bf16 bits: the shared tile
    [w_rows, w_cols], or (not shared) both warpgroups' tiles placed as in W ([p_rows, 2 * p_bytes])."""
    g = _Geom(transposed, shared)
    assert packed_tile.shape == (g.p_rows, g.p_bytes) and scale_tile.shape == (g.s_rows, g.s_cols)
    t = np.arange(WG_ROWS)
    tile_bytes = g.w_rows * g.w_cols * 2
    if shared:
        out = np.zeros(tile_bytes, np.uint8)
        ops = _NumpyOps(packed_tile, scale_tile, out)
        for wg in range(NUM_COMPUTE_WGS):
            _dequant_program(ops, g, wg, t)
        return _unswizzle(out, g.w_rows, g.w_cols)
    tiles = []
    for wg in range(NUM_COMPUTE_WGS):
        out = np.zeros(tile_bytes, np.uint8)
        _dequant_program(_NumpyOps(packed_tile, scale_tile, out), g, wg, t)
        tiles.append(_unswizzle(out, g.w_rows, g.w_cols))
    return np.concatenate(tiles, axis=1 if transposed else 0)


def _emulate_dequant_tile(packed_tile: np.ndarray, scale_tile: np.ndarray) -> np.ndarray:
    """Shared-layout step tile from packed [rows, cols/2] and scales [cols/64, rows] (shape picks the op)."""
    return _emulate_dequant(packed_tile, scale_tile, transposed=packed_tile.shape[0] == K_STEP)


class _MgpuOps:
    """Emits the per-thread program as Mosaic GPU (MLIR) ops: i32 integers, f32 floats, inline PTX."""

    def __init__(self, packed_ptr, scale_ptr, out_ptr):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm, vector
        from jax.experimental.mosaic.gpu import utils as mgpu_utils
        self.ir, self.arith, self.llvm, self.vector, self.u = ir, arith, llvm, vector, mgpu_utils
        self.i8 = ir.IntegerType.get_signless(8)
        self.i32 = ir.IntegerType.get_signless(32)
        self.f32 = ir.F32Type.get()
        self.v4i32 = ir.VectorType.get((4,), self.i32)
        self.packed_ptr, self.scale_ptr, self.out_ptr = packed_ptr, scale_ptr, out_ptr

    def _v(self, x):
        return self.u.c(int(x) & 0xFFFFFFFF if int(x) >= 0 else int(x), self.i32) if isinstance(x, (int, np.integer)) else x

    def _c32(self, x):
        x = int(x)
        if x >= 2**31:
            x -= 2**32
        return self.u.c(x, self.i32)

    def _bin(self, fn, a, b):
        if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
            raise TypeError("constant folding is done in Python")
        a = self._c32(a) if isinstance(a, (int, np.integer)) else a
        b = self._c32(b) if isinstance(b, (int, np.integer)) else b
        return fn(a, b)

    def add(self, a, b): return self._bin(self.arith.addi, a, b)
    def mul(self, a, b): return self._bin(self.arith.muli, a, b)
    def rem(self, a, b): return self._bin(self.arith.remui, a, b)
    def div(self, a, b): return self._bin(self.arith.divui, a, b)
    def xor(self, a, b): return self._bin(self.arith.xori, a, b)
    def and_(self, a, b): return self._bin(self.arith.andi, a, b)
    def or_(self, a, b): return self._bin(self.arith.ori, a, b)
    def shl(self, a, n): return self._bin(self.arith.shli, a, n)
    def shr(self, a, n): return self._bin(self.arith.shrui, a, n)

    def f32_const(self, v):
        return self.arith.constant(self.f32, self.ir.FloatAttr.get(self.f32, float(v)))

    def fmul(self, a, b):
        return self.arith.mulf(a, b)

    def cvt_bf16x2(self, a, b):
        return self.u.inline_ptx("cvt.rn.bf16x2.f32 $0, $1, $2;", a, b, result_types=self.i32)

    def prmt(self, a, b, c):
        if isinstance(c, (int, np.integer)):
            return self.u.inline_ptx(f"prmt.b32 $0, $1, $2, {int(c):#x};", a, b, result_types=self.i32)
        return self.u.inline_ptx("prmt.b32 $0, $1, $2, $3;", a, b, c, result_types=self.i32)

    def lop3(self, a, b, c, lut):
        return self.u.inline_ptx(f"lop3.b32 $0, $1, $2, $3, {int(lut):#x};", a, b, c, result_types=self.i32)

    def _gep(self, ptr, byte_off):
        return self.u.getelementptr(ptr, [byte_off], self.i8)

    def load_packed_v4(self, off):
        vec = self.llvm.load(self.v4i32, self._gep(self.packed_ptr, off), alignment=16)
        return [self.vector.extract(vec, dynamic_position=[], static_position=[i]) for i in range(4)]

    def load_scale(self, off):
        return self.llvm.load(self.f32, self.u.getelementptr(self.scale_ptr, [off], self.f32), alignment=4)

    def store_v4(self, off, words):
        vec = self.llvm.mlir_undef(self.v4i32) if hasattr(self.llvm, "mlir_undef") else self.llvm.UndefOp(self.v4i32).result
        for i, w in enumerate(words):
            vec = self.vector.insert(w, vec, dynamic_position=[], static_position=[i])
        self.llvm.store(vec, self._gep(self.out_ptr, off), alignment=16)


def _dequant_into_smem_mgpu(g: _Geom, p_ref, s_ref, w_ref):
    """Compiled path: the per-thread program through plgpu.inline_mgpu (raw Mosaic GPU), then a proxy fence
    and a warpgroup barrier, so that wgmma (async proxy) sees the tile once anyone signals it ready."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    w_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(w_transforms)))
    def _emit(ctx, p_mem, s_mem, w_mem):
        del ctx
        ops = _MgpuOps(mgpu_utils.memref_ptr(p_mem), mgpu_utils.memref_ptr(s_mem), mgpu_utils.memref_ptr(w_mem))
        tid = mgpu_utils.thread_idx()
        _dequant_program(ops, g, ops.shr(tid, 7), ops.and_(tid, WG_ROWS - 1))
        mgpu_utils.commit_shared()

    _emit(p_ref, s_ref, w_ref)


def _nf4_values_select(codes):
    """NF4_CODE[codes] without a captured constant array (Pallas kernels cannot close over arrays)."""
    out = jnp.zeros(codes.shape, jnp.float32)
    for i, v in enumerate(NF4_CODE):
        out = jnp.where(codes == i, jnp.float32(v), out)
    return out


def _dequant_into_smem_jnp(g: _Geom, p_ref, s_ref, w_ref, wg):
    """Interpret-mode path: the same part of the tile, dequantized with jnp ops (the interpreter cannot
    run inline_mgpu)."""
    import jax.experimental.pallas as pl
    if g.shared:  # half the rows of the shared tile
        nr = g.w_rows // NUM_COMPUTE_WGS
        rows = pl.ds(wg * nr, nr)
        p, sc, w_ref = p_ref[rows, :], s_ref[:, rows], w_ref.at[rows, :]
    elif g.transposed:  # the warpgroup's columns
        nr = g.w_rows
        p = p_ref[:, pl.ds(wg * (g.w_cols // 2), g.w_cols // 2)]
        sc = s_ref[pl.ds(wg * (g.w_cols // BLOCK), g.w_cols // BLOCK), :]
    else:  # the warpgroup's rows
        nr = g.w_rows
        p = p_ref[pl.ds(wg * g.w_rows, g.w_rows), :]
        sc = s_ref[:, pl.ds(wg * g.w_rows, g.w_rows)]
    p = p.astype(jnp.int32)                                                   # [nr, w_cols/2]
    codes = jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(nr, g.w_cols)
    scale = jnp.repeat(sc.T, BLOCK, axis=1)                                  # [nr, w_cols]
    w_ref[...] = (_nf4_values_select(codes) * scale).astype(jnp.bfloat16)


def _dequant_step(g: _Geom, p_ref, s_ref, w_ref, wg, interpret: bool):
    if interpret:
        import jax.experimental.pallas.mosaic_gpu as plgpu
        _dequant_into_smem_jnp(g, p_ref, s_ref, w_ref, wg)
        plgpu.commit_smem()
    else:
        _dequant_into_smem_mgpu(g, p_ref, s_ref, w_ref)


def _fused_call(a, packed, scales_t, lora_l=None, lora_r=None, *, transposed: bool, cfg: TileConfig,
                interpret: bool):
    """out = a @ deq(W)^T (transposed=False; a [M, K]) or a @ deq(W) (transposed=True; a [M, N]).

    With the LoRA operands (bf16, rank zero-padded to K_STEP): + lora_l [M, 64] @ lora_r [N, 64]^T
    (forward) or + lora_l [M, 64] @ lora_r [64, K] (transposed), one more wgmma into the same accumulator."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    g = _Geom(transposed, cfg.shared_dequant)
    m, kc = a.shape
    n, kh = packed.shape
    k = 2 * kh
    assert kc == (n if transposed else k), (a.shape, packed.shape)
    out_cols = k if transposed else n
    m_iters, n_iters, k_iters = m // g.cta_m, out_cols // g.cta_out, kc // K_STEP
    assert m_iters * g.cta_m == m and n_iters * g.cta_out == out_cols and k_iters * K_STEP == kc, g
    lora = lora_l is not None
    if lora:
        want_r = (K_STEP, k) if transposed else (n, K_STEP)
        assert lora_l.shape == (m, K_STEP) and lora_r.shape == want_r, (lora_l.shape, lora_r.shape, want_r)
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def make_pipeline(body, compute_context):
        a_spec = plgpu.BlockSpec((g.cta_m, K_STEP), lambda s: (0, s), transforms=swizzled, delay_release=1)
        if transposed:
            p_spec = plgpu.BlockSpec((g.p_rows, g.p_bytes), lambda s: (s, 0), delay_release=1)
            s_spec = plgpu.BlockSpec((g.s_rows, g.s_cols), lambda s: (0, s), delay_release=1)
        else:
            p_spec = plgpu.BlockSpec((g.p_rows, g.p_bytes), lambda s: (0, s), delay_release=1)
            s_spec = plgpu.BlockSpec((g.s_rows, g.s_cols), lambda s: (s, 0), delay_release=1)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=cfg.memory_registers, in_specs=[a_spec, p_spec, s_spec],
            wg_axis="wg", num_compute_wgs=NUM_COMPUTE_WGS, max_concurrent_steps=cfg.stages,
            compute_context=compute_context)

    w_shape = (g.dq_buffers, g.w_rows, g.w_cols) if g.shared else (NUM_COMPUTE_WGS, g.dq_buffers, g.w_rows, g.w_cols)
    # out_smem: per warpgroup two EPI x EPI epilogue slots, i.e. one [128, 64] tile, which also holds the
    # warpgroup's LoRA left tile during the main loop (SMEM is full: 4 stages of 32 KiB activation tiles,
    # 3 x 16 KiB W tiles and this 32 KiB already take ~226 of the 227 KiB)
    scoped = {
        "w_smem": plgpu.SMEM(w_shape, jnp.bfloat16, transforms=swizzled),
        "out_smem": plgpu.SMEM((NUM_COMPUTE_WGS, 2 * EPI, EPI), jnp.bfloat16, transforms=swizzled),
    }
    if g.shared:
        scoped["dq_ready"] = plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=g.dq_buffers)
    if lora:
        scoped["l_ready"] = plgpu.Barrier(num_arrivals=1, num_barriers=NUM_COMPUTE_WGS)
        # shared: warpgroup 0 loads the one right tile, the other only arrives; split: each loads its own
        scoped["r_ready"] = (plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS) if g.shared
                             else plgpu.Barrier(num_arrivals=1, num_barriers=NUM_COMPUTE_WGS))

    def kernel(a_gmem, p_gmem, s_gmem, *rest):
        l_gmem, r_gmem, out_gmem = rest if lora else (None, None, *rest)
        ignore = lambda *_, **__: None  # the allocations do not depend on the body

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=make_pipeline(ignore, ignore).get_allocations(a_gmem, p_gmem, s_gmem),
            **scoped,
            collective_axes="wg",
        )
        def _scope(pipeline_allocs, w_smem, out_smem, dq_ready=None, l_ready=None, r_ready=None):
            wg = lax.axis_index("wg")
            acc_rows, acc_cols = (WG_ROWS, g.cta_out) if g.shared else (g.cta_m, g.cta_out // NUM_COMPUTE_WGS)

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), cfg.grid_minor, cfg.grid_tile_width)
                m_sl = pl.ds(mi * g.cta_m, g.cta_m)
                o_sl = pl.ds(ni * g.cta_out, g.cta_out)
                # this warpgroup's part of the CTA's output tile
                out_tile = out_gmem.at[m_sl, o_sl]
                out_tile = out_tile.at[pl.ds(wg * acc_rows, acc_rows)] if g.shared else \
                    out_tile.at[:, pl.ds(wg * acc_cols, acc_cols)]
                # dequantized tiles are numbered across output tiles, so the buffer-reuse argument in
                # _body holds at tile boundaries too; the LoRA step is step k_iters of the tile
                step0 = info.local_index * (k_iters + 1 if lora else k_iters)

                def lora_load_left():
                    """The warpgroup's rows of the LoRA left operand -> out_smem[wg], while the main loop runs."""
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last epilogue's stores read it
                    rows = pl.ds(mi * g.cta_m + (wg * WG_ROWS if g.shared else 0), WG_ROWS)
                    plgpu.copy_gmem_to_smem(l_gmem.at[rows, :], out_smem.at[wg], l_ready.at[wg])

                def lora_step(acc_ref):
                    """One more contraction step of 64: the LoRA tiles, dense bf16, into the same accumulator.

                    The right tile goes by TMA into the W buffer of step j = step0 + k_iters, free by the
                    argument in _body: this warpgroup has passed step j-1. Shared: warpgroup 0 loads the
                    tile, the other arrives on the same barrier after its own main loop (so after its
                    wgmma_wait(1) retired step j-2); both wait, so the next tile's step j+1 reuses buffer
                    (j-2) % 3 safely, as if this were a dequantizing step with its barrier."""
                    buf = lax.rem(step0 + k_iters, g.dq_buffers)
                    o0 = ni * g.cta_out
                    if g.shared:
                        r_tile = w_smem.at[buf]
                        src = r_gmem.at[:, o_sl] if transposed else r_gmem.at[o_sl, :]

                        @pl.when(wg == 0)
                        def _load():
                            plgpu.copy_gmem_to_smem(src, r_tile, r_ready)

                        @pl.when(wg != 0)
                        def _done():
                            plgpu.barrier_arrive(r_ready)

                        r_bar = r_ready
                    else:
                        r_tile = w_smem.at[wg, buf]
                        cols = pl.ds(o0 + wg * acc_cols, acc_cols)
                        src = r_gmem.at[:, cols] if transposed else r_gmem.at[cols, :]
                        plgpu.copy_gmem_to_smem(src, r_tile, r_ready.at[wg])
                        r_bar = r_ready.at[wg]
                    plgpu.barrier_wait(l_ready.at[wg])
                    plgpu.barrier_wait(r_bar)
                    plgpu.wgmma(acc_ref, out_smem.at[wg], r_tile if transposed else r_tile.T)

                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((acc_rows, acc_cols), jnp.float32))
                    def _acc_scope(acc_ref):
                        if lora:
                            lora_load_left()
                        run_pipeline(acc_ref)
                        if lora:
                            lora_step(acc_ref)
                        acc = acc_ref[...].astype(jnp.bfloat16)   # waits for every wgmma
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for ei in range(acc_rows // EPI):
                            for ej in range(acc_cols // EPI):
                                slot = (ei * (acc_cols // EPI) + ej) % 2
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_slot = out_smem.at[wg, pl.ds(slot * EPI, EPI)]
                                out_slot[...] = acc[ei * EPI:(ei + 1) * EPI, ej * EPI:(ej + 1) * EPI]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_slot,
                                    out_tile.at[ei * EPI:(ei + 1) * EPI, ej * EPI:(ej + 1) * EPI])

                def _body(idxs, a_smem, p_smem, s_smem, acc_ref):
                    (step,) = idxs
                    buf = lax.rem(step0 + step, g.dq_buffers)
                    if g.shared:
                        # Both warpgroups fill half of the shared tile, then wait for each other. Buffer
                        # j % 3 is rewritten at step j only after this warpgroup passed the barrier of
                        # step j-1, i.e. after the other one finished step j-2, whose wgmma_wait(1)
                        # retired its wgmma of step j-3: three buffers are enough, two are not.
                        w_tile = w_smem.at[buf]
                        _dequant_step(g, p_smem, s_smem, w_tile, wg, interpret)
                        plgpu.barrier_arrive(dq_ready.at[buf])
                        plgpu.barrier_wait(dq_ready.at[buf])
                        a_rows = a_smem.at[pl.ds(wg * WG_ROWS, WG_ROWS)]
                    else:
                        # Own tile: buffer j % 2 was last read by this warpgroup's wgmma of step j-2,
                        # which the wgmma_wait(1) of step j-1 retired.
                        w_tile = w_smem.at[wg, buf]
                        _dequant_step(g, p_smem, s_smem, w_tile, wg, interpret)
                        a_rows = a_smem
                    plgpu.wgmma(acc_ref, a_rows, w_tile if transposed else w_tile.T)
                    plgpu.wgmma_wait(1)
                    return acc_ref

                if transposed:
                    p_view = p_gmem.at[:, pl.ds(ni * (g.cta_out // 2), g.cta_out // 2)]
                    s_view = s_gmem.at[pl.ds(ni * (g.cta_out // BLOCK), g.cta_out // BLOCK), :]
                else:
                    p_view = p_gmem.at[o_sl, :]
                    s_view = s_gmem.at[:, o_sl]
                make_pipeline(_body, compute_context)(
                    a_gmem.at[m_sl, :], p_view, s_view, allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel.__name__ = kernel.__qualname__ = f"nf4_matmul_{'t' if transposed else 'fwd'}{'_lora' if lora else ''}"
    num_tiles = m_iters * n_iters
    num_sms = _num_sms() if not interpret else min(num_tiles, 4)
    kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, out_cols), jnp.bfloat16),
        grid=(min(num_sms, num_tiles),),
        grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        **kwargs,
    )
    return f(a, packed, scales_t, lora_l, lora_r) if lora else f(a, packed, scales_t)


def _num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 132) or 132)


def _dequantize_tiles_call(packed, scales_t, *, transposed: bool, shared: bool, interpret: bool):
    """deq(W) [N, K] bf16 produced step tile by step tile by exactly the kernel's in-SMEM dequantization
    (a test hook). Each CTA loads one step's packed and scale tiles with TMA, both warpgroups dequantize as
    the matmul kernel does, and the tile(s) go back to HBM through TMA (which un-swizzles them). Only for
    checking the in-kernel tiles bit for bit against `NF4Weight.dequantize`."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    g = _Geom(transposed, shared)
    n, kh = packed.shape
    k = 2 * kh
    cta_rows, cta_cols = g.p_rows, 2 * g.p_bytes      # the W region one step covers
    if n % cta_rows or k % cta_cols:
        raise ValueError(f"W shape {(n, k)} is not a multiple of the step tile {(cta_rows, cta_cols)}")
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    w_shape = (g.w_rows, g.w_cols) if shared else (NUM_COMPUTE_WGS, g.w_rows, g.w_cols)

    def kernel(p_gmem, s_gmem, out_gmem):
        ri = lax.axis_index("r")
        ci = lax.axis_index("c")

        @functools.partial(
            pl.run_scoped,
            p_smem=plgpu.SMEM((g.p_rows, g.p_bytes), jnp.uint8),
            s_smem=plgpu.SMEM((g.s_rows, g.s_cols), jnp.float32),
            w_smem=plgpu.SMEM(w_shape, jnp.bfloat16, transforms=swizzled),
            loaded=plgpu.Barrier(num_arrivals=2),  # one arrival (with its bytes) per copy
            done=plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),
            collective_axes="wg",
        )
        def _scope(p_smem, s_smem, w_smem, loaded, done):
            wg = lax.axis_index("wg")
            # scales_t is [K/64, N]: the step's scale tile is rows (K blocks) x columns (W rows)
            s_rows_sl = pl.ds(ci * (cta_cols // BLOCK), cta_cols // BLOCK)
            s_cols_sl = pl.ds(ri * cta_rows, cta_rows)

            @pl.when(wg == 0)
            def _load():
                plgpu.copy_gmem_to_smem(
                    p_gmem.at[pl.ds(ri * cta_rows, cta_rows), pl.ds(ci * g.p_bytes, g.p_bytes)], p_smem, loaded)
                plgpu.copy_gmem_to_smem(s_gmem.at[s_rows_sl, s_cols_sl], s_smem, loaded)

            plgpu.barrier_wait(loaded)
            w_tile = w_smem if shared else w_smem.at[wg]
            _dequant_step(g, p_smem, s_smem, w_tile, wg, interpret)
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            region = out_gmem.at[pl.ds(ri * cta_rows, cta_rows), pl.ds(ci * cta_cols, cta_cols)]
            if shared:
                @pl.when(wg == 0)
                def _store():
                    plgpu.copy_smem_to_gmem(w_smem, region)
                    plgpu.wait_smem_to_gmem(0)
            else:
                mine = region.at[:, pl.ds(wg * g.w_cols, g.w_cols)] if transposed else \
                    region.at[pl.ds(wg * g.w_rows, g.w_rows), :]
                plgpu.copy_smem_to_gmem(w_smem.at[wg], mine)
                plgpu.wait_smem_to_gmem(0)

    kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
        grid=(n // cta_rows, k // cta_cols),
        grid_names=("r", "c"),
        num_threads=NUM_COMPUTE_WGS,
        thread_name="wg",
        **kwargs,
    )
    return f(packed, scales_t)


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------


def _resolve_impl(impl: str, *, m: int, n: int, k: int, transposed: bool, w: NF4Weight, dtype,
                  config: TileConfig | None = None, rank: int | None = None) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    g = _Geom(transposed, (config or DEFAULT_CONFIG).shared_dequant)
    why_not = None
    if w.blocksize != BLOCK:
        why_not = f"w.blocksize={w.blocksize} (the kernel needs {BLOCK})"
    elif jnp.dtype(dtype) != jnp.bfloat16:
        why_not = f"activation dtype {jnp.dtype(dtype).name} (the kernel takes bfloat16)"
    elif not supported(m, n, k, transposed=transposed, config=config):
        need = (f"M % {g.cta_m}, K % {g.cta_out}, N % {K_STEP}" if transposed
                else f"M % {g.cta_m}, N % {g.cta_out}, K % {K_STEP}")
        why_not = f"shape M={m}, N={n}, K={k} (the kernel needs {need} == 0)"
    elif rank is not None and rank > MAX_LORA_RANK:
        why_not = f"LoRA rank R={rank} (the kernel's LoRA step takes R <= {MAX_LORA_RANK})"
    if impl == "auto":
        return "pallas" if why_not is None and jax.default_backend() == "gpu" else "xla"
    if impl in ("pallas", "interpret") and why_not is not None:
        raise ValueError(f"impl={impl!r} cannot run this call: {why_not}; use impl='auto' or 'xla'")
    return impl


def _pad_rank(v: jax.Array, axis: int) -> jax.Array:
    """bf16, the rank axis zero-padded to K_STEP: the LoRA step is then exactly a K step (zeros add nothing)."""
    v = v.astype(jnp.bfloat16)
    pad = [(0, 0)] * v.ndim
    pad[axis] = (0, K_STEP - v.shape[axis])
    return jnp.pad(v, pad)


def nf4_matmul(x_mk: jax.Array, w: NF4Weight, *, lora=None, impl: str = "auto",
               config: TileConfig | None = None) -> jax.Array:
    """x @ deq(W)^T for W an NF4Weight of shape [N, K] (torch Linear [out, in]); x [..., K] -> [..., N] bf16.

    lora=(xa_mr, b_nr) adds xa @ b^T (xa [..., R] already scaled, b [N, R]) inside the same fp32 accumulator:
    the kernel runs it as one more contraction step, so the LoRA product costs no [M, N] pass of its own.
    impl: "auto" (the fused Pallas kernel on a GPU when the shape is supported, else "xla"), "pallas",
    "xla" (dequantize then matmul, `nf4_matmul_reference`) or "interpret" (the kernel in Pallas' GPU
    interpret mode, for CPU tests). fp32 accumulation, bf16 result."""
    return _nf4_op(x_mk, w, lora, impl, config, transposed=False)


def nf4_matmul_t(dy_mn: jax.Array, w: NF4Weight, *, lora=None, impl: str = "auto",
                 config: TileConfig | None = None) -> jax.Array:
    """dy @ deq(W) for W an NF4Weight of shape [N, K]; dy [..., N] -> [..., K] bf16 (a Linear's dX).

    lora=(gb_mr, a_rk) adds gb @ a (gb [..., R], a [R, K]) in the same accumulator, as in `nf4_matmul`.
    Same `impl` choices as `nf4_matmul`; the kernel reads the same packed bytes for the other contraction."""
    return _nf4_op(dy_mn, w, lora, impl, config, transposed=True)


def _nf4_op(a: jax.Array, w: NF4Weight, lora, impl: str, config: TileConfig | None, *, transposed: bool):
    """Both public ops: `a` contracts with W's N (transposed) or K (forward) axis."""
    n, k = _as_2d_weight(w)
    name, (contracted, contracted_dim), other = (
        ("dy_mn", ("N", n), ("K", k)) if transposed else ("x_mk", ("K", k), ("N", n)))
    if a.shape[-1] != contracted_dim:
        raise ValueError(f"{name}.shape={tuple(a.shape)} does not end in {contracted}={contracted_dim} "
                         f"(w is [{n}, {k}])")
    lead = a.shape[:-1]
    m = math.prod(lead)
    if lora is not None:
        lora = _check_lora(lora, op="nf4_matmul_t" if transposed else "nf4_matmul", lead=lead, other=other,
                           transposed=transposed)
    rank = None if lora is None else lora[0].shape[-1]
    impl = _resolve_impl(impl, m=m, n=n, k=k, transposed=transposed, w=w, dtype=a.dtype, config=config, rank=rank)
    if impl == "xla":
        reference = nf4_matmul_t_reference if transposed else nf4_matmul_reference
        return reference(a, w, lora=lora)
    # the right LoRA operand pads its rank axis: b [N, R] on axis 1, a [R, K] on axis 0
    lora_ops = () if lora is None else (_pad_rank(lora[0].reshape(m, rank), 1),
                                        _pad_rank(lora[1], 0 if transposed else 1))
    out = _fused_call(a.reshape(m, contracted_dim), w.packed.reshape(n, k // 2), kernel_scales(w), *lora_ops,
                      transposed=transposed, cfg=config or DEFAULT_CONFIG, interpret=impl == "interpret")
    return out.reshape(*lead, other[1])


def dequantize_tiles(w: NF4Weight, *, transposed: bool = False, impl: str = "pallas",
                     config: TileConfig | None = None) -> jax.Array:
    """deq(W) in bf16 as the kernel's SMEM holds it, tile by tile (a test hook; impl "pallas" or "interpret")."""
    n, k = _as_2d_weight(w)
    if impl not in ("pallas", "interpret"):
        raise ValueError(f"impl={impl!r}; dequantize_tiles takes 'pallas' or 'interpret'")
    if w.blocksize != BLOCK:
        raise ValueError(f"w.blocksize={w.blocksize}; the kernel needs {BLOCK}")
    return _dequantize_tiles_call(w.packed.reshape(n, k // 2), kernel_scales(w), transposed=transposed,
                                  shared=(config or DEFAULT_CONFIG).shared_dequant, interpret=impl == "interpret")
