"""NF4 dequantization fused into the matmul: a Pallas Mosaic GPU kernel for Hopper, beside its jnp reference.

    nf4_matmul(x_mk, w)    = x @ deq(W)^T  -> [M, N]   the forward of a Linear whose W is [out=N, in=K]
    nf4_matmul_t(dy_mn, w) = dy @ deq(W)   -> [M, K]   the backward's dX

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
equivalent, and the raw algorithm is checked separately by `_emulate_dequant_tile`, which runs the very same
`_dequant_unit` code on numpy "registers" for all 128 threads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fastlora_jax.quant import NF4_CODE, NF4Weight

__all__ = [
    "nf4_matmul",
    "nf4_matmul_t",
    "nf4_matmul_reference",
    "nf4_matmul_t_reference",
    "kernel_scales",
    "supported",
    "TileConfig",
    "IMPLS",
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


def nf4_matmul_reference(x_mk: jax.Array, w: NF4Weight) -> jax.Array:
    """x @ deq(W)^T with deq in bf16 (as `kernels.reference.dense_weight(w, bf16)`), fp32 accumulation."""
    _as_2d_weight(w)
    w_nk = w.dequantize(jnp.bfloat16)
    return jnp.einsum("...k,nk->...n", x_mk.astype(jnp.bfloat16), w_nk,
                      preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def nf4_matmul_t_reference(dy_mn: jax.Array, w: NF4Weight) -> jax.Array:
    """dy @ deq(W) with deq in bf16, fp32 accumulation."""
    _as_2d_weight(w)
    w_nk = w.dequantize(jnp.bfloat16)
    return jnp.einsum("...n,nk->...k", dy_mn.astype(jnp.bfloat16), w_nk,
                      preferred_element_type=jnp.float32).astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------

WG_ROWS = 128   # rows of the activation per compute warpgroup (the wgmma M of one warpgroup)
NUM_COMPUTE_WGS = 2
CTA_M = WG_ROWS * NUM_COMPUTE_WGS
OUT_COLS = 128  # output columns per CTA tile (the wgmma N)
K_STEP = 64     # contraction per pipeline step (one 128-byte swizzle row of bf16, one NF4 block)
BLOCK = 64      # NF4 blocksize the kernel supports
EPI = 64        # epilogue sub-tile (64 x 64 bf16 through SMEM, then TMA)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Knobs of the kernel; tile sizes are fixed above (they are tied to the dequantization layout)."""
    stages: int = 4            # TMA pipeline depth (must exceed delay_release=1)
    dq_buffers: int = 3        # dequantized weight tiles in flight (3 is what the shared tile needs, see _body)
    grid_minor: int = 1        # planar_snake: 0 -> walk M fastest, 1 -> walk the output columns fastest
    grid_tile_width: int = 8   # planar_snake tile width (L2 reuse)
    memory_registers: int = 40


DEFAULT_CONFIG = TileConfig()


def supported(m: int, n: int, k: int, *, transposed: bool = False) -> bool:
    """Whether the fused kernel handles x[m, k] @ W[n, k]^T (or dy[m, n] @ W[n, k] when transposed)."""
    if m <= 0 or n <= 0 or k <= 0 or m % CTA_M or k % K_STEP:
        return False
    if transposed:
        return n % K_STEP == 0 and k % OUT_COLS == 0
    return n % OUT_COLS == 0


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


def _dequant_tile_generic(ops, tile_rows: int, tile_cols: int, wg, t):
    """Per-thread program: load 16 packed bytes and a scale, dequantize, store 4 x 16 bytes (swizzled).

    A warpgroup covers half the tile's rows; a unit is 32 codes (half an NF4 block) of one row, one unit
    per thread. Thread t takes row (t % rows_per_wg) and half-block (t // rows_per_wg): the 8 lanes of a
    store phase are 8 consecutive rows, which the 128-byte swizzle spreads over all 32 banks."""
    rows_per_wg = tile_rows // NUM_COMPUTE_WGS
    assert rows_per_wg * (tile_cols // 32) == WG_ROWS, (tile_rows, tile_cols)
    r = ops.add(ops.mul(wg, rows_per_wg), ops.rem(t, rows_per_wg))   # row in the tile
    hb = ops.div(t, rows_per_wg)                                          # half-block in the row
    packed_off = ops.add(ops.mul(r, tile_cols // 2), ops.shl(hb, 4))     # 16 bytes = 32 codes
    words = ops.load_packed_v4(packed_off)
    scale_off = ops.add(ops.mul(ops.shr(hb, 1), tile_rows), r)          # scales tile is [tile_cols/64, rows]
    scale = ops.load_scale(scale_off)
    out = _dequant_unit(ops, words, scale)
    for c in range(4):
        chunk = ops.add(ops.shl(hb, 2), c)                                # 16-byte chunk of the row
        ops.store_v4(_swizzled_offset(r, chunk, tile_cols, ops), out[4 * c: 4 * c + 4])


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


def _emulate_dequant_tile(packed_tile: np.ndarray, scale_tile: np.ndarray) -> np.ndarray:
    """Run the GPU dequantization program for all threads of both warpgroups on numpy.

    packed_tile: uint8 [rows, cols/2]; scale_tile: float32 [cols/64, rows]. Returns the tile as the
    kernel's SMEM holds it, un-swizzled back to bf16 [rows, cols] (as uint16 bits) for comparison."""
    rows, half = packed_tile.shape
    cols = 2 * half
    out = np.zeros(rows * cols * 2, np.uint8)
    ops = _NumpyOps(packed_tile, scale_tile, out)
    t = np.arange(WG_ROWS)
    for wg in range(NUM_COMPUTE_WGS):
        _dequant_tile_generic(ops, rows, cols, wg, t)
    # un-swizzle with the layout definition: tiled (8, 64) atoms, 16-byte chunk XOR row % 8
    tiled = out.view(np.uint16).reshape(rows // 8, cols // 64, 8, 64)
    res = np.zeros((rows, cols), np.uint16)
    for r in range(rows):
        for c in range(cols // 8):
            atom = tiled[r // 8, c // 8]
            res[r, 8 * c: 8 * c + 8] = atom[r % 8, 8 * ((c % 8) ^ (r % 8)): 8 * ((c % 8) ^ (r % 8)) + 8]
    return res


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


def _dequant_into_smem_mgpu(p_ref, s_ref, w_ref, tile_rows: int, tile_cols: int):
    """Compiled path: the per-thread program through plgpu.inline_mgpu (raw Mosaic GPU)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    w_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(w_transforms)))
    def _emit(ctx, p_mem, s_mem, w_mem):
        del ctx
        ops = _MgpuOps(mgpu_utils.memref_ptr(p_mem), mgpu_utils.memref_ptr(s_mem), mgpu_utils.memref_ptr(w_mem))
        tid = mgpu_utils.thread_idx()
        t = ops.and_(tid, WG_ROWS - 1)
        wg = ops.shr(tid, 7)
        _dequant_tile_generic(ops, tile_rows, tile_cols, wg, t)
        # make the generic-proxy stores visible to wgmma (async proxy) before anyone signals the tile ready
        mgpu_utils.commit_shared()

    _emit(p_ref, s_ref, w_ref)


def _nf4_values_select(codes):
    """NF4_CODE[codes] without a captured constant array (Pallas kernels cannot close over arrays)."""
    out = jnp.zeros(codes.shape, jnp.float32)
    for i, v in enumerate(NF4_CODE):
        out = jnp.where(codes == i, jnp.float32(v), out)
    return out


def _dequant_into_smem_jnp(p_ref, s_ref, w_ref, wg, tile_rows: int, tile_cols: int):
    """Interpret-mode path: the same rows, dequantized with jnp ops (the interpreter cannot run inline_mgpu)."""
    import jax.experimental.pallas as pl
    rows_per_wg = tile_rows // NUM_COMPUTE_WGS
    rows = pl.ds(wg * rows_per_wg, rows_per_wg)
    p = p_ref[rows, :].astype(jnp.int32)                                    # [rows, cols/2]
    codes = jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(rows_per_wg, tile_cols)
    scale = s_ref[:, rows]                                                   # [cols/64, rows]
    scale = jnp.repeat(scale.T, BLOCK, axis=1)                               # [rows, cols]
    w_ref[rows, :] = (_nf4_values_select(codes) * scale).astype(jnp.bfloat16)


def _fused_call(a, packed, scales_t, *, transposed: bool, cfg: TileConfig, interpret: bool):
    """out = a @ deq(W)^T (transposed=False; a [M, K]) or a @ deq(W) (transposed=True; a [M, N])."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, kc = a.shape
    n, kh = packed.shape
    k = 2 * kh
    if transposed:
        assert kc == n, (a.shape, packed.shape)
        out_cols, tile_rows, tile_cols = k, K_STEP, OUT_COLS
    else:
        assert kc == k, (a.shape, packed.shape)
        out_cols, tile_rows, tile_cols = n, OUT_COLS, K_STEP
    m_iters, n_iters, k_iters = m // CTA_M, out_cols // OUT_COLS, kc // K_STEP
    assert m_iters * CTA_M == m and n_iters * OUT_COLS == out_cols and k_iters * K_STEP == kc

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def make_pipeline(body, compute_context):
        a_spec = plgpu.BlockSpec((CTA_M, K_STEP), lambda s: (0, s), transforms=swizzled, delay_release=1)
        if transposed:
            p_spec = plgpu.BlockSpec((tile_rows, tile_cols // 2), lambda s: (s, 0), delay_release=1)
            s_spec = plgpu.BlockSpec((tile_cols // BLOCK, tile_rows), lambda s: (0, s), delay_release=1)
        else:
            p_spec = plgpu.BlockSpec((tile_rows, tile_cols // 2), lambda s: (0, s), delay_release=1)
            s_spec = plgpu.BlockSpec((tile_cols // BLOCK, tile_rows), lambda s: (s, 0), delay_release=1)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=cfg.memory_registers, in_specs=[a_spec, p_spec, s_spec],
            wg_axis="wg", num_compute_wgs=NUM_COMPUTE_WGS, max_concurrent_steps=cfg.stages,
            compute_context=compute_context)

    def kernel(a_gmem, p_gmem, s_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the body

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=make_pipeline(ignore, ignore).get_allocations(a_gmem, p_gmem, s_gmem),
            w_smem=plgpu.SMEM((cfg.dq_buffers, tile_rows, tile_cols), jnp.bfloat16, transforms=swizzled),
            dq_ready=plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=cfg.dq_buffers),
            out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, 2, EPI, EPI), jnp.bfloat16, transforms=swizzled),
            collective_axes="wg",
        )
        def _scope(pipeline_allocs, w_smem, dq_ready, out_smem):
            wg = lax.axis_index("wg")
            wg_rows = pl.ds(wg * WG_ROWS, WG_ROWS)

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), cfg.grid_minor, cfg.grid_tile_width)
                m_sl = pl.ds(mi * CTA_M, CTA_M)
                o_sl = pl.ds(ni * OUT_COLS, OUT_COLS)
                # dequantized tiles are numbered across output tiles, so the triple-buffer argument in
                # _body holds at tile boundaries too
                step0 = info.local_index * k_iters

                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_ROWS, OUT_COLS), jnp.float32))
                    def _acc_scope(acc_ref):
                        run_pipeline(acc_ref)
                        acc = acc_ref[...].astype(jnp.bfloat16)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for ei in range(WG_ROWS // EPI):
                            for ej in range(OUT_COLS // EPI):
                                slot = (ei * (OUT_COLS // EPI) + ej) % 2
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_smem[wg, slot] = acc[ei * EPI:(ei + 1) * EPI, ej * EPI:(ej + 1) * EPI]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    out_gmem.at[m_sl, o_sl].at[wg_rows].at[
                                        ei * EPI:(ei + 1) * EPI, ej * EPI:(ej + 1) * EPI])

                def _body(idxs, a_smem, p_smem, s_smem, acc_ref):
                    # Both warpgroups fill half of the shared tile, then wait for each other. Buffer
                    # g % 3 is rewritten at step g only after this warpgroup passed the barrier of step
                    # g-1, i.e. after the other one finished step g-2, whose wgmma_wait(1) retired its
                    # wgmma of step g-3: three buffers are enough, two are not.
                    (step,) = idxs
                    buf = lax.rem(step0 + step, cfg.dq_buffers)
                    w_tile = w_smem.at[buf]
                    if interpret:
                        _dequant_into_smem_jnp(p_smem, s_smem, w_tile, wg, tile_rows, tile_cols)
                        plgpu.commit_smem()
                    else:
                        _dequant_into_smem_mgpu(p_smem, s_smem, w_tile, tile_rows, tile_cols)
                    plgpu.barrier_arrive(dq_ready.at[buf])
                    plgpu.barrier_wait(dq_ready.at[buf])
                    plgpu.wgmma(acc_ref, a_smem.at[wg_rows], w_tile if transposed else w_tile.T)
                    plgpu.wgmma_wait(1)
                    return acc_ref

                if transposed:
                    p_view = p_gmem.at[:, pl.ds(ni * (OUT_COLS // 2), OUT_COLS // 2)]
                    s_view = s_gmem.at[pl.ds(ni * (OUT_COLS // BLOCK), OUT_COLS // BLOCK), :]
                else:
                    p_view = p_gmem.at[o_sl, :]
                    s_view = s_gmem.at[:, o_sl]
                make_pipeline(_body, compute_context)(
                    a_gmem.at[m_sl, :], p_view, s_view, allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    num_tiles = m_iters * n_iters
    num_sms = _num_sms() if not interpret else min(num_tiles, 4)
    kwargs = {}
    if interpret:
        kwargs["interpret"] = plgpu.InterpretGPUParams()
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, out_cols), jnp.bfloat16),
        grid=(min(num_sms, num_tiles),),
        grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        **kwargs,
    )
    return f(a, packed, scales_t)


def _num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 132) or 132)


def _dequantize_tiles_call(packed, scales_t, *, transposed: bool, interpret: bool):
    """deq(W) [N, K] bf16 produced tile by tile by exactly the kernel's in-SMEM dequantization (a test hook).

    Each CTA loads one packed tile and its scales with TMA, both warpgroups dequantize their halves into the
    swizzled SMEM tile as the matmul kernel does, and the tile goes back to HBM through TMA (which
    un-swizzles it). Only for checking the in-kernel tile bit for bit against `NF4Weight.dequantize`."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n, kh = packed.shape
    k = 2 * kh
    tile_rows, tile_cols = (K_STEP, OUT_COLS) if transposed else (OUT_COLS, K_STEP)
    if n % tile_rows or k % tile_cols:
        raise ValueError(f"W shape {(n, k)} is not a multiple of the tile {(tile_rows, tile_cols)}")
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(p_gmem, s_gmem, out_gmem):
        ri = lax.axis_index("r")
        ci = lax.axis_index("c")

        @functools.partial(
            pl.run_scoped,
            p_smem=plgpu.SMEM((tile_rows, tile_cols // 2), jnp.uint8),
            s_smem=plgpu.SMEM((tile_cols // BLOCK, tile_rows), jnp.float32),
            w_smem=plgpu.SMEM((tile_rows, tile_cols), jnp.bfloat16, transforms=swizzled),
            loaded=plgpu.Barrier(num_arrivals=2),  # one arrival (with its bytes) per copy
            done=plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),
            collective_axes="wg",
        )
        def _scope(p_smem, s_smem, w_smem, loaded, done):
            wg = lax.axis_index("wg")

            @pl.when(wg == 0)
            def _load():
                plgpu.copy_gmem_to_smem(
                    p_gmem.at[pl.ds(ri * tile_rows, tile_rows), pl.ds(ci * (tile_cols // 2), tile_cols // 2)],
                    p_smem, loaded)
                plgpu.copy_gmem_to_smem(
                    s_gmem.at[pl.ds(ci * (tile_cols // BLOCK), tile_cols // BLOCK), pl.ds(ri * tile_rows, tile_rows)],
                    s_smem, loaded)

            plgpu.barrier_wait(loaded)
            if interpret:
                _dequant_into_smem_jnp(p_smem, s_smem, w_smem, wg, tile_rows, tile_cols)
                plgpu.commit_smem()
            else:
                _dequant_into_smem_mgpu(p_smem, s_smem, w_smem, tile_rows, tile_cols)
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)

            @pl.when(wg == 0)
            def _store():
                plgpu.copy_smem_to_gmem(
                    w_smem, out_gmem.at[pl.ds(ri * tile_rows, tile_rows), pl.ds(ci * tile_cols, tile_cols)])
                plgpu.wait_smem_to_gmem(0)

    kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
        grid=(n // tile_rows, k // tile_cols),
        grid_names=("r", "c"),
        num_threads=NUM_COMPUTE_WGS,
        thread_name="wg",
        **kwargs,
    )
    return f(packed, scales_t)


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------


def _resolve_impl(impl: str, *, m: int, n: int, k: int, transposed: bool, w: NF4Weight, dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    why_not = None
    if w.blocksize != BLOCK:
        why_not = f"w.blocksize={w.blocksize} (the kernel needs {BLOCK})"
    elif jnp.dtype(dtype) != jnp.bfloat16:
        why_not = f"activation dtype {jnp.dtype(dtype).name} (the kernel takes bfloat16)"
    elif not supported(m, n, k, transposed=transposed):
        need = (f"M % {CTA_M}, K % {OUT_COLS}, N % {K_STEP}" if transposed
                else f"M % {CTA_M}, N % {OUT_COLS}, K % {K_STEP}")
        why_not = f"shape M={m}, N={n}, K={k} (the kernel needs {need} == 0)"
    if impl == "auto":
        return "pallas" if why_not is None and jax.default_backend() == "gpu" else "xla"
    if impl in ("pallas", "interpret") and why_not is not None:
        raise ValueError(f"impl={impl!r} cannot run this call: {why_not}; use impl='auto' or 'xla'")
    return impl


def nf4_matmul(x_mk: jax.Array, w: NF4Weight, *, impl: str = "auto", config: TileConfig | None = None) -> jax.Array:
    """x @ deq(W)^T for W an NF4Weight of shape [N, K] (torch Linear [out, in]); x [..., K] -> [..., N] bf16.

    impl: "auto" (the fused Pallas kernel on a GPU when the shape is supported, else "xla"), "pallas",
    "xla" (dequantize then matmul, `nf4_matmul_reference`) or "interpret" (the kernel in Pallas' GPU
    interpret mode, for CPU tests). fp32 accumulation, bf16 result."""
    n, k = _as_2d_weight(w)
    if x_mk.shape[-1] != k:
        raise ValueError(f"x_mk.shape={tuple(x_mk.shape)} does not end in K={k} (w is [{n}, {k}])")
    lead = x_mk.shape[:-1]
    m = math.prod(lead)
    impl = _resolve_impl(impl, m=m, n=n, k=k, transposed=False, w=w, dtype=x_mk.dtype)
    if impl == "xla":
        return nf4_matmul_reference(x_mk, w)
    out = _fused_call(x_mk.reshape(m, k), w.packed.reshape(n, k // 2), kernel_scales(w), transposed=False,
                      cfg=config or DEFAULT_CONFIG, interpret=impl == "interpret")
    return out.reshape(*lead, n)


def nf4_matmul_t(dy_mn: jax.Array, w: NF4Weight, *, impl: str = "auto", config: TileConfig | None = None) -> jax.Array:
    """dy @ deq(W) for W an NF4Weight of shape [N, K]; dy [..., N] -> [..., K] bf16 (a Linear's dX).

    Same `impl` choices as `nf4_matmul`; the kernel reads the same packed bytes for the other contraction."""
    n, k = _as_2d_weight(w)
    if dy_mn.shape[-1] != n:
        raise ValueError(f"dy_mn.shape={tuple(dy_mn.shape)} does not end in N={n} (w is [{n}, {k}])")
    lead = dy_mn.shape[:-1]
    m = math.prod(lead)
    impl = _resolve_impl(impl, m=m, n=n, k=k, transposed=True, w=w, dtype=dy_mn.dtype)
    if impl == "xla":
        return nf4_matmul_t_reference(dy_mn, w)
    out = _fused_call(dy_mn.reshape(m, n), w.packed.reshape(n, k // 2), kernel_scales(w), transposed=True,
                      cfg=config or DEFAULT_CONFIG, interpret=impl == "interpret")
    return out.reshape(*lead, k)


def dequantize_tiles(w: NF4Weight, *, transposed: bool = False, impl: str = "pallas") -> jax.Array:
    """deq(W) in bf16 as the kernel's SMEM holds it, tile by tile (a test hook; impl "pallas" or "interpret")."""
    n, k = _as_2d_weight(w)
    if impl not in ("pallas", "interpret"):
        raise ValueError(f"impl={impl!r}; dequantize_tiles takes 'pallas' or 'interpret'")
    if w.blocksize != BLOCK:
        raise ValueError(f"w.blocksize={w.blocksize}; the kernel needs {BLOCK}")
    return _dequantize_tiles_call(w.packed.reshape(n, k // 2), kernel_scales(w), transposed=transposed,
                                  interpret=impl == "interpret")
