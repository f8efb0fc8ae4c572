"""NF4 exactly as bitsandbytes stores it, as a JAX pytree.

`NF4Weight` holds one matrix quantized to 4-bit NormalFloat in bitsandbytes' own layout, so that a
transformers bnb-4bit checkpoint loads without re-quantizing (`from_bnb`) and what we quantize saves
as one (`to_bnb`).  `NF4Weight.quantize` runs as jnp code on the device (an 8B model is quantized on
the GPU) and reproduces bitsandbytes' CPU quantization bit for bit; `dequantize` reproduces
`bitsandbytes.functional.dequantize_4bit` bit for bit.

How bitsandbytes 0.50 quantizes on the CPU, and so what this file reproduces:

* 4-bit step (torch code in ``backends/default/ops.py``): the input is upcast to float32 (bf16 and fp16
  exactly), split into blocks of `blocksize` (the last block may be short); per block
  ``absmax = max|x|`` and ``scaled = clamp(x * reciprocal(absmax), -1, 1)`` -- a multiply by the
  float32 reciprocal, except the short last block, which is a true division ``x / absmax``.  The code
  is ``torch.bucketize(scaled, midpoints)``: the number of midpoints between neighbouring NF4 values
  that are strictly below ``scaled`` -- nearest NF4 value, a tie going to the LOWER code.  An odd
  element count is padded with 0.0 (code 7).  Pairs are packed first-element-in-the-high-nibble.
* double quantization (``compress_statistics=True``): ``offset = absmax.mean()`` as torch computes it
  on the CPU (`torch_cpu_sum` / n), then ``absmax - offset`` goes through the C blockwise 8-bit
  quantizer (blocks of 256, the signed dynamic map).  That quantizer does NOT pick the nearest code:
  per block ``inv = 1/max|x|``, ``v = clamp(x*inv, -1, 1)``, ``i16 = trunc(fma((v+1)*0.5, 65535,
  0.5))`` and the code is ``lut[i16]``, where ``lut[i]`` is the number of midpoints (between
  neighbouring map values) strictly below the grid point ``2i/65535 - 1`` (ties to the lower code).
  A block whose max is 0 gets code 0 throughout.  We fold the grid, the fma and the table into 255
  float32 thresholds on ``v`` computed once on the host (`_nested_code_thresholds`), so the device
  only multiplies, clamps and compares, and no compiler rewrite can change the result.

Three XLA habits that would break bit-exactness are fenced off here: its GPU division is not
correctly rounded, it rewrites ``a / broadcast(b)`` and ``a / constant`` into ``a * (1/b)`` (two
roundings), and it fuses a multiply and an add into one fma on the GPU.  So every division is an
integer long division (`_div_rn`), and the one multiply-add (decoding the nested absmax) has an
optimization barrier between the two (`dequantize_absmax`).  Multiplies, adds, max and compares are
exact IEEE float32 everywhere.

Known, documented gaps: NaN/inf weights, and blocks whose absmax is a float32 subnormal (< 1.2e-38:
XLA flushes subnormals to zero, torch does not).  The offset depends on how torch split its sum:
`sum_lanes` (8: torch 2.11's float sum on x86, seen on AVX2 and on AVX512 CPUs) and, from 32768
absmax blocks on (>= 2M weights at blocksize 64), `sum_threads` (torch.get_num_threads() of the run
we compare with); with those right the match is exact.  bnb on CUDA averages differently again.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "NF4Weight",
    "NF4_CODE",
    "DYNAMIC_MAP",
    "SUPPORTED_BLOCKSIZES",
    "SUPPORTED_DTYPES",
    "NESTED_BLOCKSIZE",
    "dequantize_nf4",
    "dequantize_absmax",
    "torch_cpu_sum",
    "quantize_blocks",
    "double_quantize",
]

# The 16 NF4 values, bit for bit as bitsandbytes.functional.get_4bit_type("nf4") returns them.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.setflags(write=False)
# Midpoints torch.bucketize compares against, in float32 as bnb computes them ((a + b) / 2).
_NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

# bitsandbytes.functional.create_dynamic_map(signed=True): the 8-bit map for the nested absmax.
# torch.linspace's float32 rounding is not reproducible with numpy, so the 127 positive values
# below 1.0 are stored as little-endian float32 bits; the map is symmetric (negatives are exact
# negations), plus 0.0 and 1.0.
_DYNAMIC_POSITIVE_HEX = (
    "b7a31335941a5a36ff0502370642b23734803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a"
    "806a3c3a3ee8593aff65773a9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b"
    "3bdfcf3bd34de23b6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93c"
    "d7a3d03c15aee73c52b8fe3c48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d"
    "5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d"
    "6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e9a99353e0000443e6666523ecdcc603e"
    "33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e9a99bf3eccccc63e"
    "0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f"
    "3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f"
    "66663d3f0000413f9a99443f3333483fcdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f"
    "9a99683f33336c3fcdcc6f3f6666733f0000773f9a997a3f33337e3f"
)
_pos = np.frombuffer(bytes.fromhex(_DYNAMIC_POSITIVE_HEX), dtype="<f4").astype(np.float32)
DYNAMIC_MAP = np.concatenate([-_pos[::-1], [np.float32(0.0)], _pos, [np.float32(1.0)]]).astype(np.float32)
DYNAMIC_MAP.setflags(write=False)
del _pos

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # as bnb.functional.quantize_4bit
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")  # what bnb quantizes / dequantizes to
NESTED_BLOCKSIZE = 256  # bnb quantize_4bit always double-quantizes absmax in blocks of 256
_QS_KEY = "quant_state.bitsandbytes__nf4"


# ----------------------------------------------------------------------------------------------
# host-side tables
# ----------------------------------------------------------------------------------------------


def _f32_key(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 that orders like the floats (+0 and -0 share 0), to binary-search floats."""
    b = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _key_f32(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, np.int64)
    bits = np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32)
    return bits.view(np.float32)


def _lut_index(v: np.ndarray) -> np.ndarray:
    """bnb's C quantizer: uint16((v + 1) * 0.5 * 65535 + 0.5) with the last two ops one fma.

    t = (v+1)*0.5 is a float32 with >= 2**-48 resolution, so t*65535 + 0.5 is exact in float64 and
    one rounding to float32 is exactly what the fma does.
    """
    t = ((np.asarray(v, np.float32) + np.float32(1)) * np.float32(0.5)).astype(np.float32)
    e = (t.astype(np.float64) * 65535.0 + 0.5).astype(np.float32)
    return np.trunc(e).astype(np.int64) & 0xFFFF


@functools.lru_cache(maxsize=4)
def _nested_code_thresholds_cached(code_bytes: bytes) -> np.ndarray:
    code = np.frombuffer(code_bytes, np.float32)
    mid = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    i = np.arange(65536)
    grid = ((np.float32(2) * i.astype(np.float32)) / np.float32(65535) - np.float32(1)).astype(np.float32)
    lut = np.searchsorted(mid, grid, side="left")  # count of midpoints strictly below the grid point
    first_i = np.searchsorted(lut, np.arange(1, code.size), side="left")  # smallest i with lut[i] >= k
    # sigma_k = smallest float32 v in [-1, 1] with _lut_index(v) >= first_i[k]; code(v) = #{sigma_k <= v}
    lo = np.full(first_i.shape, _f32_key(np.float32(-1.0)), np.int64)
    hi = np.full(first_i.shape, _f32_key(np.float32(1.0)), np.int64)
    reachable = first_i < 65536
    for _ in range(40):
        mid_k = (lo + hi) // 2
        ok = _lut_index(_key_f32(mid_k)) >= first_i
        hi = np.where(ok, mid_k, hi)
        lo = np.where(ok, lo, mid_k + 1)
    sigma = np.where(reachable, _key_f32(lo), np.float32(np.inf)).astype(np.float32)
    sigma.setflags(write=False)
    return sigma


def _nested_code_thresholds(code: np.ndarray = DYNAMIC_MAP) -> np.ndarray:
    """255 float32 thresholds reproducing bnb's CPU 8-bit quantizer: code = #{k : sigma_k <= v}."""
    return _nested_code_thresholds_cached(np.ascontiguousarray(code, np.float32).tobytes())


# ----------------------------------------------------------------------------------------------
# jnp building blocks
# ----------------------------------------------------------------------------------------------


def _div_rn(a, b) -> jax.Array:
    """float32 ``a / b`` rounded to nearest-even, as torch divides, built from integer ops.

    XLA's own division cannot be used: on the GPU it is not correctly rounded (on an H100 about a
    third of random quotients, and a seventh of reciprocals, were 1 ulp off), and on every backend
    XLA rewrites ``a / broadcast(b)`` and ``a / constant`` into ``a * (1/b)``.  This is a 24-step
    long division of the significands in int32 -- exact on every backend and under vmap.  Needs a
    finite and b positive and normal (callers substitute 1 for a zero block's max); quotients below
    the normal range flush to zero (XLA's CPU backend flushes subnormals too; no NF4 code depends
    on them).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    a, b = jnp.broadcast_arrays(a, b)
    ai = lax.bitcast_convert_type(a, jnp.int32)
    bi = lax.bitcast_convert_type(b, jnp.int32)
    ea = (ai >> 23) & 0xFF
    eb = (bi >> 23) & 0xFF
    ma = (ai & 0x7FFFFF) | 0x800000
    mb = (bi & 0x7FFFFF) | 0x800000
    lt = (ma < mb).astype(jnp.int32)
    num = ma << lt  # num / mb in [1, 2)
    e = ea - eb + 127 - lt  # biased exponent of the quotient

    def step(_, qr):  # one more quotient bit; a loop, since unrolled XLA fuses it into a 3**24 tree
        q, r = qr
        r = r << 1
        ge = r >= mb
        return (q << 1) | ge.astype(jnp.int32), jnp.where(ge, r - mb, r)

    # 24 more quotient bits after the leading 1: 23 mantissa bits + 1 guard bit
    q, r = lax.fori_loop(0, 24, step, (jnp.ones_like(ma), num - mb))
    m = q >> 1
    m = m + ((q & 1) & ((r != 0).astype(jnp.int32) | (m & 1)))  # round half to even
    carry = m >> 24
    m = m >> carry
    e = e + carry
    mag = jnp.where(e >= 255, jnp.int32(0x7F800000), (e << 23) | (m & 0x7FFFFF))
    mag = jnp.where((e <= 0) | (ea == 0), 0, mag)  # underflow, or a zero (or subnormal) numerator
    bits = mag | ((ai ^ bi) & jnp.int32(-(2**31)))
    return lax.bitcast_convert_type(bits, jnp.float32)


def _seq_sum(a: jax.Array) -> jax.Array:
    """Left-to-right float32 sum over axis 0 (((a0 + a1) + a2) + ...), the order torch's loops use."""
    s = a[0]
    for i in range(1, a.shape[0]):
        s = s + a[i]
    return s


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    """Zero-pad axis 0 to a multiple: appending +0.0 to a left-to-right sum changes nothing."""
    pad = (-a.shape[0]) % multiple
    if pad == 0:
        return a
    return jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()  # c10 CeilLog2


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """torch SumKernel.cpp multi_row_sum over axis 0: chunks of L rows, 4 levels of L-groups.

    Zero-padding every level to a multiple of L gives the same additions as torch's running
    accumulators (their final ``acc0 + acc1 + acc2 + acc3`` appends each partial group last).
    """
    size = rows.shape[0]
    if size == 0:
        return jnp.zeros(rows.shape[1:], rows.dtype)
    level_power = max(4, _ceil_log2(size) // 4)
    step = 1 << level_power
    acc = rows
    for _ in range(3):  # rows -> chunk sums -> level-1 group sums -> level-2 group sums
        acc = _pad_rows(acc, step)
        acc = _seq_sum(jnp.swapaxes(acc.reshape((-1, step) + acc.shape[1:]), 0, 1))
    return _seq_sum(acc)  # level 3: running sum over all level-2 groups


def _row_sum(x: jax.Array) -> jax.Array:
    """torch row_sum: 4 interleaved accumulators (ilp), leftovers into the first, then combined."""
    size = x.shape[0]
    size_ilp = size // 4
    if size_ilp:
        parts = _multi_row_sum(x[: size_ilp * 4].reshape((size_ilp, 4) + x.shape[1:]))
        p = [parts[k] for k in range(4)]
    else:
        p = [jnp.zeros(x.shape[1:], x.dtype)] * 4
    for i in range(size_ilp * 4, size):
        p[0] = p[0] + x[i]
    for k in range(1, 4):
        p[0] = p[0] + p[k]
    return p[0]


def _inner_sum(x: jax.Array, lanes: int) -> jax.Array:
    """torch cascade_sum on one contiguous 1-D float32 run (vectorized_inner_sum or scalar path)."""
    size = x.shape[0]
    if size >= lanes:
        nvec = size // lanes
        vec = _row_sum(x[: nvec * lanes].reshape(nvec, lanes))
        acc = jnp.zeros((), x.dtype)
        for k in range(nvec * lanes, size):
            acc = acc + x[k]
        for k in range(lanes):
            acc = acc + vec[k]
    else:
        acc = _row_sum(x)
    return jnp.zeros((), x.dtype) + acc  # the kernel accumulates into a zero-filled output


def torch_cpu_sum(x: jax.Array, lanes: int = 8, threads: int = 1) -> jax.Array:
    """``torch.sum`` of a contiguous 1-D float32 tensor on the CPU, bit for bit, in jnp.

    bnb's offset is ``absmax.mean()`` = this sum / n.  `lanes` is the width of torch's vectorized
    accumulators (8 for torch 2.11 on x86, AVX2 and AVX512 CPUs alike); `threads` is torch.get_num_threads(),
    which only matters from 32768 elements on (at::parallel_reduce's grain size), where torch sums
    one chunk per thread and then sums the per-thread partials.
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1)
    n = x.shape[0]
    grain = 32768
    if n < grain or threads <= 1:
        return _inner_sum(x, lanes)
    nchunks = min(threads, -(-n // grain))
    chunk = -(-n // nchunks)
    partial = [_inner_sum(x[b : min(n, b + chunk)], lanes) for b in range(0, n, chunk)]
    partial += [jnp.zeros((), jnp.float32)] * (threads - len(partial))
    return _inner_sum(jnp.stack(partial), lanes)


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


def _check_blocksize(blocksize: Any, name: str = "blocksize") -> int:
    ok_type = isinstance(blocksize, (int, np.integer)) and not isinstance(blocksize, bool)
    if not ok_type or int(blocksize) not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name}={blocksize!r} is not supported; bitsandbytes NF4 accepts {SUPPORTED_BLOCKSIZES}")
    return int(blocksize)


def _check_dtype(dtype: Any, name: str) -> str:
    try:
        dname = jnp.dtype(dtype).name
    except TypeError:
        dname = None
    if dname not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}={dtype!r} is not supported; accepted: {SUPPORTED_DTYPES} (as bitsandbytes)")
    return dname


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant", "sum_lanes", "sum_threads"))
def _quantize_jit(w, *, blocksize: int, double_quant: bool, sum_lanes: int, sum_threads: int):
    x = w.reshape(-1).astype(jnp.float32)  # bf16/fp16 -> fp32 is exact, as A.float() in bnb
    n = x.shape[0]
    nfull = n // blocksize
    rem = n - nfull * blocksize
    scaled_parts, absmax_parts = [], []
    if nfull:
        xb = x[: nfull * blocksize].reshape(nfull, blocksize)
        am = jnp.max(jnp.abs(xb), axis=1)
        # torch: A * (1.0 / absmax.clamp(min=1e-38)); a zero block is all zeros, any scale gives 0.
        recip = _div_rn(jnp.float32(1), jnp.where(am > 0, am, jnp.float32(1)))
        scaled_parts.append(jnp.clip(xb * recip[:, None], -1.0, 1.0).reshape(-1))
        absmax_parts.append(am)
    if rem:
        xt = x[nfull * blocksize :]
        am_t = jnp.max(jnp.abs(xt))
        scaled_parts.append(jnp.clip(_div_rn(xt, jnp.where(am_t > 0, am_t, jnp.float32(1))), -1.0, 1.0))
        absmax_parts.append(am_t[None])
    scaled = jnp.concatenate(scaled_parts) if len(scaled_parts) > 1 else scaled_parts[0]
    absmax = jnp.concatenate(absmax_parts) if len(absmax_parts) > 1 else absmax_parts[0]
    if n % 2:
        scaled = jnp.concatenate([scaled, jnp.zeros((1,), jnp.float32)])
    # torch.bucketize(right=False): number of midpoints strictly below the value.
    q = jnp.sum(scaled[:, None] > jnp.asarray(_NF4_MIDPOINTS), axis=1).astype(jnp.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).reshape(-1, 1)
    if not double_quant:
        return packed, absmax, None, None
    qabsmax, nested_absmax, offset = double_quantize(absmax, sum_lanes, sum_threads)
    return packed, qabsmax, nested_absmax, offset


def quantize_blocks(w, blocksize: int = 64) -> tuple[jax.Array, jax.Array]:
    """The 4-bit step alone: `(packed uint8 [ceil(n/2), 1], absmax float32 [blocks])` of `w` (its dtype cast to
    float32 exactly). Traceable. Rows of a row-major weight whose element count is a multiple of `blocksize`
    give exactly the bytes and scales of those rows in the whole weight: what one device of an FSDP mesh
    quantizes of its shard (fastlora_jax.sharding)."""
    packed, absmax, _, _ = _quantize_jit(w, blocksize=_check_blocksize(blocksize), double_quant=False, sum_lanes=8,
                                         sum_threads=1)
    return packed, absmax


def double_quantize(absmax, sum_lanes: int = 8, sum_threads: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bnb's double quantization of float32 absmax `[blocks]`: `(uint8 codes [blocks], nested absmax
    [ceil(blocks/256)], offset [])`, the offset being torch's `absmax.mean()` (see `torch_cpu_sum`). Traceable;
    every op is exact, so the result is the same however XLA partitions it over devices."""
    nblocks = absmax.shape[0]
    offset = _div_rn(torch_cpu_sum(absmax, sum_lanes, sum_threads), jnp.float32(nblocks))  # torch mean
    qabsmax, nested_absmax = _quantize_blockwise_dynamic(absmax - offset, NESTED_BLOCKSIZE)
    return qabsmax, nested_absmax, offset


def _quantize_blockwise_dynamic(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE):
    """bnb's C ``quantize_blockwise`` (CPU, float32, dynamic map): uint8 codes [n], float32 absmax [blocks]."""
    n = x.shape[0]
    nb = -(-n // blocksize)
    c = _pad_rows(x, blocksize).reshape(nb, blocksize)  # zero padding cannot raise a block's max
    absmax = jnp.max(jnp.abs(c), axis=1)
    inv = _div_rn(jnp.float32(1), jnp.where(absmax > 0, absmax, jnp.float32(1)))
    v = jnp.clip(c * inv[:, None], -1.0, 1.0)
    codes = jnp.searchsorted(jnp.asarray(_nested_code_thresholds()), v.reshape(-1), side="right")
    codes = jnp.where(absmax[:, None] > 0, codes.reshape(nb, blocksize), 0)  # C: an all-zero block -> code 0
    return codes.reshape(-1)[:n].astype(jnp.uint8), absmax


# ----------------------------------------------------------------------------------------------
# dequantize (pure jnp reference; a Pallas kernel is checked against dequantize_nf4)
# ----------------------------------------------------------------------------------------------


def dequantize_absmax(absmax, nested_absmax=None, nested_quant_map=None, offset=None, *,
                      nested_blocksize=NESTED_BLOCKSIZE):
    """Per-block float32 scales: absmax itself, or bnb's ``code[q] * nested_absmax + offset``.

    The product goes through an optimization barrier so that XLA cannot fuse it with the add into
    one fma (bnb rounds the product, then adds).
    """
    if nested_absmax is None:
        return jnp.asarray(absmax, jnp.float32)
    nblocks = absmax.shape[0]
    vals = jnp.take(jnp.asarray(nested_quant_map, jnp.float32), absmax.astype(jnp.int32), axis=0)
    vals = _pad_rows(vals, nested_blocksize).reshape(-1, nested_blocksize)
    prod = (vals * nested_absmax[:, None]).reshape(-1)[:nblocks]
    prod = lax.optimization_barrier(prod)
    return prod + jnp.asarray(offset, jnp.float32)


def dequantize_nf4(
    packed_n2,
    absmax,
    quant_map=NF4_CODE,
    nested_absmax=None,
    nested_quant_map=None,
    offset=None,
    *,
    shape: Sequence[int],
    blocksize: int = 64,
    dtype: Any = jnp.float32,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> jax.Array:
    """Reference NF4 dequantization of one weight, bit-exact with bnb ``dequantize_4bit``.

    packed_n2: uint8 [ceil(n/2), 1] (high nibble first); absmax: float32 [blocks] or, nested,
    uint8 [blocks] with float32 nested_absmax [ceil(blocks/256)], nested_quant_map [256], offset [].
    Computes ``quant_map[code] * scale`` in float32 and rounds once to `dtype` (as bnb's C kernel).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    scale = dequantize_absmax(absmax, nested_absmax, nested_quant_map, offset, nested_blocksize=nested_blocksize)
    p = packed_n2.reshape(-1)
    codes = jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(-1).astype(jnp.int32)
    vals = jnp.take(jnp.asarray(quant_map, jnp.float32), codes, axis=0)[: nblocks * blocksize]
    vals = _pad_rows(vals, nblocks * blocksize).reshape(nblocks, blocksize)
    out = (vals * scale[:, None]).reshape(-1)[:n].reshape(shape)
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "blocksize", "dtype", "nested_blocksize", "stack_ndim"))
def _dequantize_jit(children, *, shape, blocksize, dtype, nested_blocksize, stack_ndim):
    fn = functools.partial(dequantize_nf4, shape=shape, blocksize=blocksize, dtype=dtype,
                           nested_blocksize=nested_blocksize)
    for _ in range(stack_ndim):
        fn = jax.vmap(fn)
    return fn(*children)


# ----------------------------------------------------------------------------------------------
# the pytree
# ----------------------------------------------------------------------------------------------

_CHILD_NAMES = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """numpy from a numpy array, jax array or torch tensor (torch is used only if already imported)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16) and key == "":  # packed bytes in bnb quant_storage
            t = t.view(torch.uint8)
        elif t.dtype == torch.bfloat16:  # numpy has no bf16
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"tensors[{key!r}] could not be converted to a numpy array: {e}") from e


@jax.tree_util.register_pytree_with_keys_class
class NF4Weight:
    """One NF4-quantized weight (or a stack of them) in bitsandbytes' storage layout.

    Children (arrays, leading stack axes allowed): ``packed`` uint8 [n/2, 1], ``absmax`` (uint8
    [blocks] with double quant, else float32), ``quant_map`` float32 [16], and with double quant
    ``nested_absmax`` float32 [ceil(blocks/256)], ``nested_quant_map`` float32 [256], ``offset``
    float32 [] (None otherwise).  Aux data (static): logical shape, dtype name, blocksize,
    nested blocksize, double_quant.
    """

    __slots__ = _CHILD_NAMES + ("_shape", "_dtype", "_blocksize", "_nested_blocksize", "_double_quant")

    def __init__(self, packed, absmax, quant_map, nested_absmax=None, nested_quant_map=None, offset=None, *,
                 shape, dtype, blocksize=64, nested_blocksize=NESTED_BLOCKSIZE, double_quant=None):
        # No validation of the children: transformations rebuild this with tracers or sentinels.
        self.packed = packed
        self.absmax = absmax
        self.quant_map = quant_map
        self.nested_absmax = nested_absmax
        self.nested_quant_map = nested_quant_map
        self.offset = offset
        self._shape = tuple(int(s) for s in shape)
        self._dtype = jnp.dtype(dtype).name
        self._blocksize = int(blocksize)
        self._nested_blocksize = int(nested_blocksize)
        self._double_quant = bool(nested_absmax is not None) if double_quant is None else bool(double_quant)

    # -- pytree protocol ------------------------------------------------------------------------
    def _aux(self):
        return (self._shape, self._dtype, self._blocksize, self._nested_blocksize, self._double_quant)

    def tree_flatten_with_keys(self):
        children = tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in _CHILD_NAMES)
        return children, self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, k) for k in _CHILD_NAMES), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, blocksize, nested_blocksize, double_quant = aux
        return cls(*children, shape=shape, dtype=dtype, blocksize=blocksize,
                   nested_blocksize=nested_blocksize, double_quant=double_quant)

    # -- metadata -------------------------------------------------------------------------------
    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes added by `stack` (empty for a single weight)."""
        return tuple(self.packed.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape: stack axes + the original weight's shape."""
        return self.stack_shape + self._shape

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The original (per-weight) shape, without stack axes."""
        return self._shape

    @property
    def dtype(self):
        """The original dtype (what `dequantize` returns by default)."""
        return jnp.dtype(self._dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def blocksize(self) -> int:
        return self._blocksize

    @property
    def nested_blocksize(self) -> int:
        return self._nested_blocksize

    @property
    def double_quant(self) -> bool:
        return self._double_quant

    @property
    def nbytes(self) -> int:
        """Bytes of storage held by the children."""
        return sum(int(getattr(self, k).nbytes) for k in _CHILD_NAMES if getattr(self, k) is not None)

    def __repr__(self) -> str:
        stack = f", stack={self.stack_shape}" if self.stack_shape else ""
        return (f"NF4Weight(shape={self._shape}, dtype={self._dtype}, blocksize={self._blocksize}, "
                f"double_quant={self._double_quant}{stack})")

    # -- quantize / dequantize ------------------------------------------------------------------
    @classmethod
    def quantize(cls, w, blocksize: int = 64, double_quant: bool = True, *, sum_lanes: int = 8,
                 sum_threads: int = 1) -> "NF4Weight":
        """Quantize `w` on its device, bit-exact with bnb ``quantize_4bit(..., quant_type="nf4")`` on the CPU.

        w: jax/numpy array, float32/bfloat16/float16, any shape; numpy inputs go to the default
        device.  double_quant is bnb's compress_statistics.  sum_lanes/sum_threads describe the torch
        whose ``absmax.mean()`` we reproduce (see `torch_cpu_sum`); they only affect the offset.
        Usable inside jax.jit (w may be a tracer).
        """
        blocksize = _check_blocksize(blocksize)
        # dtype first: jnp.asarray would silently turn float64 into float32.
        dname = _check_dtype(w.dtype if hasattr(w, "dtype") else np.asarray(w).dtype, "w.dtype")
        if not isinstance(w, jax.Array):
            w = jnp.asarray(w)
        if w.ndim == 0 or w.size == 0:
            raise ValueError(f"w.shape={tuple(w.shape)} is not supported; need at least one element and one axis")
        if sum_lanes not in (4, 8, 16, 32):
            raise ValueError(f"sum_lanes={sum_lanes!r} is not supported; accepted: 4, 8, 16, 32")
        if int(sum_threads) < 1:
            raise ValueError(f"sum_threads={sum_threads!r} must be >= 1")
        packed, absmax, nested_absmax, offset = _quantize_jit(
            w, blocksize=blocksize, double_quant=bool(double_quant), sum_lanes=int(sum_lanes),
            sum_threads=int(sum_threads))
        quant_map = jnp.asarray(NF4_CODE)
        nested_map = jnp.asarray(DYNAMIC_MAP) if double_quant else None
        return cls(packed, absmax, quant_map, nested_absmax, nested_map, offset, shape=tuple(w.shape),
                   dtype=dname, blocksize=blocksize, double_quant=bool(double_quant))

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight in `dtype` (default: the original dtype), equal to bnb ``dequantize_4bit``.

        Works on a stacked NF4Weight too (packed.ndim > 2): returns [*stack, *shape].
        """
        dname = self._dtype if dtype is None else _check_dtype(dtype, "dtype")
        children = tuple(getattr(self, k) for k in _CHILD_NAMES)
        return _dequantize_jit(children, shape=self._shape, blocksize=self._blocksize, dtype=dname,
                               nested_blocksize=self._nested_blocksize, stack_ndim=self.packed.ndim - 2)

    def absmax_f32(self) -> jax.Array:
        """Per-block float32 scales (nested absmax decoded), [*stack, blocks]."""
        fn = functools.partial(dequantize_absmax, nested_blocksize=self._nested_blocksize)
        for _ in range(self.packed.ndim - 2):
            fn = jax.vmap(fn)
        return fn(self.absmax, self.nested_absmax, self.nested_quant_map, self.offset)

    def rows(self, start: int, stop: int) -> "NF4Weight":
        """Rows `[start, stop)` of a single 2-D weight whose rows hold whole blocks, with its scales decoded
        (plain float32 absmax): the same values as `dequantize()[start:stop]`, for a gemm over row tiles."""
        if self.stack_shape or len(self._shape) != 2 or self._shape[1] % self._blocksize:
            raise ValueError(f"rows() needs one 2-D weight whose rows are whole blocks of {self._blocksize}; "
                             f"this is {self!r}")
        out_dim, in_dim = self._shape
        if not 0 <= start < stop <= out_dim:
            raise ValueError(f"rows({start}, {stop}) is outside the weight's {out_dim} rows")
        half, blocks = in_dim // 2, in_dim // self._blocksize
        return NF4Weight(self.packed[start * half:stop * half], self.absmax_f32()[start * blocks:stop * blocks],
                         self.quant_map, shape=(stop - start, in_dim), dtype=self._dtype, blocksize=self._blocksize)

    # -- stacking for lax.scan over layers ------------------------------------------------------
    @classmethod
    def stack(cls, weights: Sequence["NF4Weight"]) -> "NF4Weight":
        """Stack same-shaped weights along a new leading axis (children stacked, aux unchanged)."""
        weights = list(weights)
        if not weights:
            raise ValueError("weights is empty; NF4Weight.stack needs at least one NF4Weight")
        aux = weights[0]._aux()
        for i, wt in enumerate(weights):
            if not isinstance(wt, NF4Weight):
                raise ValueError(f"weights[{i}] is a {type(wt).__name__}, not an NF4Weight")
            if wt._aux() != aux:
                raise ValueError(f"weights[{i}] has metadata {wt._aux()} but weights[0] has {aux} "
                                 "(shape, dtype, blocksize, nested_blocksize, double_quant must match)")
        children = []
        for k in _CHILD_NAMES:
            vals = [getattr(wt, k) for wt in weights]
            children.append(None if vals[0] is None else jnp.stack(vals))
        return cls.tree_unflatten(aux, children)

    # -- bitsandbytes / transformers checkpoint interop -----------------------------------------
    def quant_state_json(self) -> dict:
        """The non-tensor quant-state items in bnb's key order (QuantState.as_dict)."""
        d = {"quant_type": "nf4", "blocksize": self._blocksize, "dtype": self._dtype, "shape": list(self._shape)}
        if self._double_quant:
            d.update({"nested_blocksize": self._nested_blocksize, "nested_dtype": "float32",
                      "nested_offset": float(np.asarray(self.offset, np.float32))})
        return d

    def to_bnb(self) -> dict[str, np.ndarray]:
        """The tensors a transformers bnb-4bit checkpoint stores for this Linear4bit weight.

        Keys are suffixes ("" is the packed weight); equal byte for byte to ``{"": weight,
        **QuantState.as_dict(packed=True)}``.
        """
        if self.stack_shape:
            raise ValueError(f"to_bnb needs a single weight, this one is stacked {self.stack_shape}; "
                             "slice it first (jax.tree_util.tree_map(lambda x: x[i], w))")
        out = {  # np.array: writable host copies (torch.from_numpy warns on read-only views)
            "": np.array(self.packed, np.uint8),
            "absmax": np.array(self.absmax),
            "quant_map": np.array(self.quant_map, np.float32),
        }
        if self._double_quant:
            out["nested_absmax"] = np.array(self.nested_absmax, np.float32)
            out["nested_quant_map"] = np.array(self.nested_quant_map, np.float32)
        out[_QS_KEY] = np.frombuffer(json.dumps(self.quant_state_json()).encode("utf-8"), np.uint8).copy()
        return out

    @classmethod
    def from_bnb(cls, tensors: Mapping[str, Any], *, host: bool = False) -> "NF4Weight":
        """Build from one Linear4bit weight's checkpoint tensors, keyed by suffix ("" = packed weight).

        Values may be numpy arrays, jax arrays or torch tensors.  Only NF4 is accepted.  `host=True` keeps
        the children as numpy arrays (nothing goes to a device): a loader then places each one itself, e.g.
        sharded over a mesh.
        """
        put = (lambda x: x) if host else jnp.asarray
        qs_keys = [k for k in tensors if k.startswith("quant_state.")]
        if _QS_KEY not in tensors:
            other = [k for k in qs_keys if k != _QS_KEY]
            if other:
                raise ValueError(f"tensors[{other[0]!r}] found: quant_type {other[0].rsplit('__', 1)[-1]!r} is not "
                                 f"supported, only NF4 (key {_QS_KEY!r})")
            raise ValueError(f"missing key {_QS_KEY!r} (the packed bnb quant-state JSON)")
        try:
            raw = _to_numpy(tensors[_QS_KEY], _QS_KEY).astype(np.uint8).reshape(-1)
            meta = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"tensors[{_QS_KEY!r}] is not UTF-8 JSON bytes: {e}") from e
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"tensors[{_QS_KEY!r}] has quant_type={meta.get('quant_type')!r}; "
                             "only 'nf4' is supported")
        for k in ("blocksize", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"tensors[{_QS_KEY!r}] lacks the item {k!r}")
        blocksize = _check_blocksize(meta["blocksize"], f"{_QS_KEY}.blocksize")
        dname = _check_dtype(meta["dtype"], f"{_QS_KEY}.dtype")
        shape = tuple(int(s) for s in meta["shape"])
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        double_quant = "nested_offset" in meta or "nested_absmax" in tensors
        need = ["", "absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if double_quant else [])
        for k in need:
            if k not in tensors:
                kind = "double-quantized " if double_quant else ""
                raise ValueError(f"missing key {k!r} (needed for a {kind}NF4 weight)")
        packed = _to_numpy(tensors[""], "")
        if packed.dtype != np.uint8:  # bnb quant_storage other than uint8: same bytes
            packed = np.ascontiguousarray(packed).view(np.uint8)
        packed = packed.reshape(-1, 1)
        if packed.shape[0] != (n + 1) // 2:
            raise ValueError(f"tensors['']: {packed.shape[0]} packed bytes, but shape {shape} needs {(n + 1) // 2}")
        quant_map = _to_numpy(tensors["quant_map"], "quant_map").astype(np.float32).reshape(-1)
        if quant_map.shape != (16,) or not np.array_equal(quant_map.view(np.uint32), NF4_CODE.view(np.uint32)):
            raise ValueError("tensors['quant_map'] is not bnb's NF4 code table (NF4_CODE); bnb dequantizes with "
                             "its built-in table regardless, so this checkpoint is not plain NF4")
        absmax = _to_numpy(tensors["absmax"], "absmax").reshape(-1)
        if absmax.shape[0] != nblocks:
            raise ValueError(f"tensors['absmax'] has {absmax.shape[0]} blocks, shape {shape} at blocksize "
                             f"{blocksize} needs {nblocks}")
        children = [put(packed), None, put(quant_map), None, None, None]
        nested_blocksize = NESTED_BLOCKSIZE
        if double_quant:
            for k in ("nested_blocksize", "nested_offset"):
                if k not in meta:
                    raise ValueError(f"tensors[{_QS_KEY!r}] lacks the item {k!r} (needed with 'nested_absmax')")
            if meta.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"tensors[{_QS_KEY!r}] has nested_dtype={meta['nested_dtype']!r}; "
                                 "only 'float32' is supported")
            nested_blocksize = int(meta["nested_blocksize"])
            if absmax.dtype != np.uint8:
                raise ValueError(f"tensors['absmax'] has dtype {absmax.dtype}; a double-quantized weight "
                                 "stores uint8")
            nested_absmax = _to_numpy(tensors["nested_absmax"], "nested_absmax").astype(np.float32).reshape(-1)
            if nested_absmax.shape[0] != -(-nblocks // nested_blocksize):
                raise ValueError(f"tensors['nested_absmax'] has {nested_absmax.shape[0]} values, expected "
                                 f"{-(-nblocks // nested_blocksize)}")
            nested_map = _to_numpy(tensors["nested_quant_map"], "nested_quant_map").astype(np.float32).reshape(-1)
            if nested_map.shape != (256,):
                raise ValueError(f"tensors['nested_quant_map'] has shape {nested_map.shape}, expected (256,)")
            children[1] = put(absmax)
            children[3] = put(nested_absmax)
            children[4] = put(nested_map)
            children[5] = put(np.asarray(np.float32(meta["nested_offset"])))
        else:
            children[1] = put(absmax.astype(np.float32))
        return cls(*children, shape=shape, dtype=dname, blocksize=blocksize, nested_blocksize=nested_blocksize,
                   double_quant=double_quant)
