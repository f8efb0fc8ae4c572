"""NF4Weight against bitsandbytes on the CPU, bit for bit.

bitsandbytes (CPU backend) is the oracle: quantize_4bit / dequantize_4bit / QuantState.as_dict and a
real Linear4bit state dict.  Tests that need it skip where it is not installed (the GPU test does
not need it: it checks the device against JAX's CPU backend, which these tests tie to bnb).
"""

from __future__ import annotations

import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import bnb_reference_path
from fastlora_jax import quant as Q
from fastlora_jax.quant import DYNAMIC_MAP, NF4_CODE, NF4Weight, dequantize_nf4, torch_cpu_sum

try:
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
except ImportError:  # pragma: no cover - the GPU image has no bitsandbytes
    torch = bnb = F = None

needs_bnb = pytest.mark.skipif(F is None, reason="torch + bitsandbytes (the CPU oracle) not installed")

# Width of torch's vectorized CPU sum (bnb's offset = absmax.mean()): 8 for torch 2.11 on x86, on
# AVX2 and on AVX512 CPUs alike (checked against torch.sum on both).
LANES = 8


@pytest.fixture(scope="module", autouse=True)
def _eager_bnb():
    """bnb's odd-shape dequantize fallback is wrapped in torch.compile; eager is the same math, faster."""
    if torch is None:
        yield
        return
    with torch._dynamo.config.patch(disable=True):
        yield


def _bits(a) -> np.ndarray:
    """Raw bits of an array (uint8 stays uint8), for byte-exact comparisons that see -0.0 and NaN."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _np(t) -> np.ndarray:
    """torch -> numpy, bf16 via its bits."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(jnp.bfloat16)
    return t.detach().numpy()


def _weight(shape, dtype: str, seed: int, scale: float):
    """Random normal weights with a few outliers, as a torch tensor and the same values in numpy."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    idx = rng.integers(0, x.size, max(1, x.size // 500))
    x.reshape(-1)[idx] *= rng.uniform(5, 60, idx.size).astype(np.float32)
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    return t, _np(t)


def _bnb_dequantize(q, st):
    """bnb's dequantize_4bit of (q, st), as the oracle.

    Oracle trap: bitsandbytes 0.50.2's CPU C kernel (cdequantize_blockwise_cpu_nf4_*) is wrong when the last
    dimension is even but not a multiple of the blocksize: (128, 96) comes back with ~2.4x relative error on
    this AVX512 machine, in every dtype, while its quantized bytes equal ours. bnb itself sends odd last
    dimensions to its generic torch implementation (backends/default `_dequantize_4bit_compute`, the format's
    definition, the same on every CPU); that one is the oracle for the shapes the kernel gets wrong. Where the
    kernel is used (the other shapes) the two agree bit for bit, which is checked here."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = st.absmax
    if st.nested:  # as F.dequantize_4bit does it
        absmax = F.dequantize_blockwise(st.absmax, st.state2)
        absmax += st.offset
    generic = _dequantize_4bit_compute(q.view(torch.uint8).reshape(-1), absmax.float(), st.code, st.blocksize,
                                       st.shape, st.dtype)
    last = st.shape[-1]
    if last % 2 == 0 and last % st.blocksize != 0:
        return generic
    ref = F.dequantize_4bit(q, st, quant_type="nf4")
    np.testing.assert_array_equal(_bits(_np(ref)), _bits(_np(generic)))
    return ref


def _assert_matches_bnb(w: NF4Weight, q, st):
    assert _bits(w.packed).tobytes() == q.numpy().tobytes()
    assert w.packed.shape == tuple(q.shape) and w.packed.dtype == jnp.uint8
    assert w.absmax.dtype == np.dtype(str(st.absmax.dtype).removeprefix("torch."))
    np.testing.assert_array_equal(_bits(w.absmax), _bits(st.absmax.numpy()))
    np.testing.assert_array_equal(_bits(w.quant_map), _bits(st.code.numpy()))
    if st.nested:
        np.testing.assert_array_equal(_bits(w.nested_absmax), _bits(st.state2.absmax.numpy()))
        np.testing.assert_array_equal(_bits(w.nested_quant_map), _bits(st.state2.code.numpy()))
        assert _bits(w.offset).tobytes() == _bits(st.offset.numpy()).tobytes()
    else:
        assert w.nested_absmax is None and w.nested_quant_map is None and w.offset is None


# shape, dtype, scale: 300 / 257 / 5204 blocks (not multiples of 256; 257 leaves a nested block of
# one), numel 333000 / 527 / 7 not multiples of 64, odd numel (527, 7), odd last dim (bnb's
# dequantize fallback path), 1-D.  Other tests reuse these shapes, so their compilations are cached.
CASES = [
    ((64, 64), "float32", 1.0),
    ((64, 64), "float16", 1.0),
    ((128, 96), "float32", 0.02),
    ((128, 96), "bfloat16", 3.0),
    ((300, 64), "float32", 30.0),
    ((1000, 333), "bfloat16", 0.05),
    ((17, 31), "float32", 1e-3),
    ((257, 64), "bfloat16", 1e-3),
    ((7,), "float32", 1.0),
]


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("shape,dtype,scale", CASES, ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}" for c in CASES])
def test_quantize_and_dequantize_match_bnb(shape, dtype, scale, double_quant):
    seed = zlib.crc32(repr((shape, dtype, double_quant)).encode())
    t, x = _weight(shape, dtype, seed, scale)
    q, st = F.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    w = NF4Weight.quantize(x, blocksize=64, double_quant=double_quant, sum_lanes=LANES)
    _assert_matches_bnb(w, q, st)
    assert w.shape == shape and w.dtype == jnp.dtype(dtype) and w.size == math.prod(shape)
    assert w.blocksize == 64 and w.double_quant is double_quant
    ref = _bnb_dequantize(q, st)
    out = w.dequantize()
    assert out.shape == shape and out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(_bits(out), _bits(_np(ref)))
    # float32 out of a bf16 weight equals bnb asked for float32 (one rounding, in float32)
    if dtype == "bfloat16":
        st.dtype = torch.float32
        ref32 = _bnb_dequantize(q, st)
        np.testing.assert_array_equal(_bits(w.dequantize(jnp.float32)), _bits(_np(ref32)))


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bnb(blocksize):
    t, x = _weight((96, 160), "float32", blocksize, 1.0)
    q, st = F.quantize_4bit(t, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    w = NF4Weight.quantize(x, blocksize=blocksize, sum_lanes=LANES)
    _assert_matches_bnb(w, q, st)
    np.testing.assert_array_equal(_bits(w.dequantize()), _bits(_np(_bnb_dequantize(q, st))))


@needs_bnb
def test_code_tables_are_bnbs():
    np.testing.assert_array_equal(_bits(NF4_CODE), _bits(F.get_4bit_type("nf4", device="cpu").numpy()))
    np.testing.assert_array_equal(_bits(DYNAMIC_MAP), _bits(F.create_dynamic_map(signed=True).numpy()))


@needs_bnb
def test_4bit_ties_go_to_the_lower_code():
    """torch.bucketize(right=False): a value exactly on a midpoint takes the lower NF4 code."""
    mid = Q._NF4_MIDPOINTS
    rows = []
    for k in (-7, 0, 3):  # power-of-two absmax: the reciprocal is exact, so scaled == mid exactly
        s = np.float32(2.0**k)
        for v in (mid, np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2))):
            r = np.concatenate([[s], v * s, -v * s]).astype(np.float32)
            rows.append(np.pad(r, (0, 64 - r.size)))
    x = np.concatenate(rows + [np.float32([0.75, -0.375, 0.1875])])  # + a short last block (divides)
    q, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, compress_statistics=False, quant_type="nf4")
    w = NF4Weight.quantize(x, blocksize=64, double_quant=False)
    _assert_matches_bnb(w, q, st)
    hi = np.asarray(w.packed).reshape(-1) >> 4
    lo = np.asarray(w.packed).reshape(-1) & 15
    codes = np.stack([hi, lo], -1).reshape(-1)
    np.testing.assert_array_equal(codes[1:16], np.arange(15))  # exactly on midpoint j -> code j, not j+1


@needs_bnb
def test_nested_8bit_quantizer_matches_bnb_c_kernel():
    """Values on and next to each of the 255 thresholds (block max 1, so v == x), plus zero blocks."""
    sig = Q._nested_code_thresholds()
    assert np.all(np.isfinite(sig)) and np.all(np.diff(sig) >= 0)
    vals = np.concatenate([sig, np.nextafter(sig, np.float32(-2)), np.nextafter(sig, np.float32(2)), DYNAMIC_MAP,
                           (DYNAMIC_MAP[1:] + DYNAMIC_MAP[:-1]) * np.float32(0.5)])
    vals = np.clip(vals, -1, 1).astype(np.float32)
    np.random.default_rng(0).shuffle(vals)
    blocks = [np.concatenate([[np.float32(1)], vals[i:i + 255]]) for i in range(0, vals.size, 255)]
    rng = np.random.default_rng(1)
    x = np.concatenate(blocks + [rng.standard_normal(256 * 8).astype(np.float32) * np.float32(7),
                                 np.zeros(256, np.float32), np.zeros(17, np.float32)]).astype(np.float32)
    qr, st = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    codes, absmax = jax.jit(Q._quantize_blockwise_dynamic, static_argnums=1)(jnp.asarray(x), 256)
    np.testing.assert_array_equal(np.asarray(codes), qr.numpy())
    np.testing.assert_array_equal(_bits(absmax), _bits(st.absmax.numpy()))
    # it is not plain nearest-value rounding: the C kernel goes through a 65536-step grid
    v = x[: vals.size] / np.repeat(np.asarray(absmax), 256)[: vals.size]
    nearest = np.abs(v[:, None] - DYNAMIC_MAP).argmin(1)
    assert np.any(nearest != qr.numpy()[: vals.size])


@needs_bnb
def test_torch_cpu_sum_matches_torch():
    rng = np.random.default_rng(2)
    threads = torch.get_num_threads()
    for n in [3, 9, 33, 127, 257, 4097, 40001]:  # scalar path, lanes + tail, chunk levels, per-thread
        x = (np.abs(rng.standard_normal(n)) * rng.uniform(1e-3, 10, n)).astype(np.float32)
        ref = torch.from_numpy(x).sum().numpy()
        got = jax.jit(torch_cpu_sum, static_argnums=(1, 2))(jnp.asarray(x), LANES, threads)
        assert _bits(got).tobytes() == _bits(ref).tobytes(), n


@needs_bnb
def test_large_matrix_offset_with_torch_threads():
    """>= 32768 absmax blocks: torch sums per thread, so sum_threads must be torch's thread count."""
    t, x = _weight((2048, 1040), "bfloat16", 7, 0.02)
    q, st = F.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = NF4Weight.quantize(x, sum_lanes=LANES, sum_threads=torch.get_num_threads())
    _assert_matches_bnb(w, q, st)


def _division_cases():
    rng = np.random.default_rng(5)
    n = 200_000
    a = (rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    b = (rng.uniform(0.5, 1, n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    a[:64] = np.float32(1)  # reciprocals
    a[64:80] = [0, -0.0, 3, 5, 7, 9, 1e-30, -1e-30] * 2
    b[64:72] = [1, 1, 3, 3, 3, 3, 1e10, 1e10]
    a[80:96], b[80:96] = (np.arange(1, 17) * np.float32(3)), np.float32(3)  # exact quotients
    return a, b


def test_div_rn_is_correctly_rounded():
    """XLA's own division is off by 1 ulp on the GPU and rewritten to a*(1/b) on broadcasts."""
    a, b = _division_cases()
    ref = a / b
    ref = np.where(np.abs(ref) < np.finfo(np.float32).tiny, np.float32(0) * ref, ref)  # we flush subnormals
    got = jax.jit(Q._div_rn)(a, b)
    np.testing.assert_array_equal(_bits(got), _bits(ref))
    got_bcast = jax.jit(lambda a: Q._div_rn(a, np.float32(3.7)))(a)  # broadcast divisor
    np.testing.assert_array_equal(_bits(got_bcast), _bits(a / np.float32(3.7)))


# ------------------------------------------------------------------------------------------------
# checkpoint interop
# ------------------------------------------------------------------------------------------------


def _bnb_dict(q, st) -> dict:
    return {"": q, **st.as_dict(packed=True)}


def _assert_same_dict(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        v = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert ours[k].tobytes() == v.tobytes(), k


@needs_bnb
@pytest.mark.parametrize("shape,dtype,double_quant", [((300, 64), "float32", True), ((128, 96), "bfloat16", True),
                                                      ((128, 96), "bfloat16", False)])
def test_to_bnb_equals_quant_state_as_dict(shape, dtype, double_quant):
    t, x = _weight(shape, dtype, 11, 0.5)
    q, st = F.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    w = NF4Weight.quantize(x, double_quant=double_quant, sum_lanes=LANES)
    _assert_same_dict(w.to_bnb(), _bnb_dict(q, st))
    # from_bnb on bnb's own torch tensors, then back: same weight, same dict, same dequantization
    w2 = NF4Weight.from_bnb(_bnb_dict(q, st))
    assert w2.shape == w.shape and w2.dtype == w.dtype and w2.double_quant is double_quant
    _assert_same_dict(w2.to_bnb(), _bnb_dict(q, st))
    np.testing.assert_array_equal(_bits(w2.dequantize()), _bits(_np(_bnb_dequantize(q, st))))
    # and from numpy values
    w3 = NF4Weight.from_bnb(w.to_bnb())
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), w3, w)
    # bnb reads our dict back
    st_back = F.QuantState.from_dict({k: torch.from_numpy(v) for k, v in w.to_bnb().items() if k}, device="cpu")
    back = _bnb_dequantize(torch.from_numpy(w.to_bnb()[""]), st_back)
    np.testing.assert_array_equal(_bits(_np(back)), _bits(w.dequantize()))


@needs_bnb
def test_linear4bit_state_dict():
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 128, bias=False)
    lin = bnb_reference_path(bnb.nn.Linear4bit(96, 128, bias=False, quant_type="nf4", compress_statistics=True,
                                               compute_dtype=torch.float32))  # no repack if a forward is added
    lin.load_state_dict(dense.state_dict())
    lin = lin.to("cpu")  # quantizes
    sd = lin.state_dict()
    tensors = {k.removeprefix("weight").removeprefix("."): v for k, v in sd.items() if k.startswith("weight")}
    w = NF4Weight.from_bnb(tensors)
    assert w.shape == (128, 96) and w.dtype == jnp.float32
    ours = NF4Weight.quantize(dense.weight.detach().numpy(), sum_lanes=LANES)
    _assert_same_dict(ours.to_bnb(), tensors)
    ref = _bnb_dequantize(lin.weight.data, lin.weight.quant_state)
    np.testing.assert_array_equal(_bits(w.dequantize()), _bits(_np(ref)))


# ------------------------------------------------------------------------------------------------
# pytree behaviour (no bnb needed)
# ------------------------------------------------------------------------------------------------


def _rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def test_pytree_jit_tree_map_eval_shape_device_put():
    w = NF4Weight.quantize(_rand((128, 96), 0, jnp.bfloat16))
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 6
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(w)[0]]
    assert paths == [".packed", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".offset"]
    ref = w.dequantize()
    assert ref.dtype == jnp.bfloat16 and ref.shape == (128, 96)
    np.testing.assert_array_equal(_bits(jax.jit(lambda a: a.dequantize())(w)), _bits(ref))
    as_f32 = jax.jit(lambda a: a.dequantize(jnp.float32))(w)
    np.testing.assert_array_equal(_bits(as_f32.astype(jnp.bfloat16)), _bits(ref))
    w2 = jax.tree_util.tree_map(lambda a: a, w)
    assert isinstance(w2, NF4Weight) and w2.shape == w.shape and w2.dtype == w.dtype
    shapes = jax.eval_shape(lambda a: a, w)
    assert isinstance(shapes, NF4Weight) and shapes.packed.shape == (128 * 96 // 2, 1)
    assert jax.eval_shape(lambda a: a.dequantize(), w).shape == (128, 96)
    w3 = jax.device_put(w, jax.devices("cpu")[0])
    np.testing.assert_array_equal(_bits(w3.dequantize()), _bits(ref))
    assert w.nbytes == sum(a.nbytes for a in leaves)
    nodq = NF4Weight.quantize(_rand((128, 96), 0), double_quant=False)
    assert len(jax.tree_util.tree_leaves(nodq)) == 3 and nodq.absmax.dtype == jnp.float32
    assert nodq.nbytes == 128 * 96 // 2 + 192 * 4 + 16 * 4


def test_quantize_under_jit_and_vmap_equals_eager():
    xs = jnp.stack([_rand((17, 31), s) * (s + 1) for s in range(3)])  # short last block: true divisions
    eager = [NF4Weight.quantize(x) for x in xs]
    jitted = jax.jit(lambda x: NF4Weight.quantize(x))(xs[0])
    vmapped = jax.vmap(lambda x: NF4Weight.quantize(x))(xs)
    stacked = NF4Weight.stack(eager)
    for a, b in ((jitted, eager[0]), (vmapped, stacked)):
        jax.tree_util.tree_map(lambda u, v: np.testing.assert_array_equal(_bits(u), _bits(v)), a, b)


def test_stack_scan_vmap_dequantize():
    ws = [NF4Weight.quantize(_rand((64, 64), s) * (s + 1)) for s in range(3)]
    st = NF4Weight.stack(ws)
    assert st.stack_shape == (3,) and st.shape == (3, 64, 64) and st.weight_shape == (64, 64)
    per = jnp.stack([w.dequantize() for w in ws])
    np.testing.assert_array_equal(_bits(st.dequantize()), _bits(per))
    np.testing.assert_array_equal(_bits(jax.vmap(lambda w: w.dequantize())(st)), _bits(per))
    np.testing.assert_array_equal(_bits(st.absmax_f32()), _bits(jnp.stack([w.absmax_f32() for w in ws])))

    def body(count, w):  # lax.scan hands the body one layer's NF4Weight (packed.ndim == 2)
        assert w.stack_shape == () and w.shape == (64, 64)
        return count + 1, w.dequantize()

    count, ys = jax.jit(lambda w: jax.lax.scan(body, 0, w))(st)
    assert int(count) == 3
    np.testing.assert_array_equal(_bits(ys), _bits(per))
    # two stack axes (e.g. [layers, experts])
    st2 = NF4Weight.stack([st, st])
    assert st2.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(_bits(st2.dequantize()), _bits(jnp.stack([per, per])))


def test_dequantize_nf4_reference_function():
    w = NF4Weight.quantize(_rand((17, 31), 4))
    out = dequantize_nf4(w.packed, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset,
                         shape=(17, 31), blocksize=64, dtype=jnp.float32)
    np.testing.assert_array_equal(_bits(out), _bits(w.dequantize()))
    # decoding by hand: high nibble first, code * per-block scale
    p = np.asarray(w.packed).reshape(-1)
    codes = np.stack([p >> 4, p & 15], -1).reshape(-1)[: 17 * 31]
    scale = np.repeat(np.asarray(w.absmax_f32()), 64)[: 17 * 31]
    np.testing.assert_array_equal(_bits(out).reshape(-1), _bits((NF4_CODE[codes] * scale).astype(np.float32)))


def test_zero_blocks():
    x = np.zeros((8, 64), np.float32)
    x[1, 3] = 0.5  # other blocks all zero (-> absmax 0, code 7), deterministic not random
    w = NF4Weight.quantize(x, double_quant=False)
    p = np.asarray(w.packed).reshape(8, 32)
    assert np.all(p[0] == 0x77) and np.all(p[2:] == 0x77)
    np.testing.assert_array_equal(np.asarray(w.dequantize()), x)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bs", [16, 63, 8192, "64", 64.0, True])
def test_bad_blocksize(bs):
    with pytest.raises(ValueError, match=r"blocksize=.*accepts \(32, 64"):
        NF4Weight.quantize(np.ones((4, 64), np.float32), blocksize=bs)


@pytest.mark.parametrize("dt", [np.float64, np.int32, np.uint8])
def test_bad_dtype(dt):
    with pytest.raises(ValueError, match=r"w\.dtype=.*float32"):
        NF4Weight.quantize(np.ones((4, 64), dt))
    w = NF4Weight.quantize(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match=r"^dtype="):
        w.dequantize(dt)


def test_bad_shape_and_stack():
    with pytest.raises(ValueError, match="w.shape"):
        NF4Weight.quantize(np.ones((0, 64), np.float32))
    a = NF4Weight.quantize(np.ones((4, 64), np.float32))
    b = NF4Weight.quantize(np.ones((64, 4), np.float32))
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        NF4Weight.stack([a, b])
    with pytest.raises(ValueError, match="stacked"):
        NF4Weight.stack([a, a]).to_bnb()


def _fake_dict(meta_update=None, drop=()):
    w = NF4Weight.quantize(np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64) + np.float32(0.01))
    d = w.to_bnb()
    if meta_update:
        meta = json.loads(bytes(d["quant_state.bitsandbytes__nf4"]))
        meta.update(meta_update)
        d["quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    for k in drop:
        del d[k]
    return d


def test_from_bnb_errors():
    with pytest.raises(ValueError, match=r"quant_state\.bitsandbytes__nf4.*quant_type='fp4'"):
        NF4Weight.from_bnb(_fake_dict({"quant_type": "fp4"}))
    d = _fake_dict()
    d["quant_state.bitsandbytes__fp4"] = d.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match=r"quant_state\.bitsandbytes__fp4.*'fp4'"):
        NF4Weight.from_bnb(d)
    for key in ["quant_state.bitsandbytes__nf4", "", "absmax", "nested_absmax"]:
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            NF4Weight.from_bnb(_fake_dict(drop=[key]))
    with pytest.raises(ValueError, match="blocksize=48"):
        NF4Weight.from_bnb(_fake_dict({"blocksize": 48}))
    with pytest.raises(ValueError, match="dtype='float64'"):
        NF4Weight.from_bnb(_fake_dict({"dtype": "float64"}))
    with pytest.raises(ValueError, match="packed bytes"):
        NF4Weight.from_bnb(_fake_dict({"shape": [4, 66]}))


@needs_bnb
def test_from_bnb_rejects_real_fp4():
    q, st = F.quantize_4bit(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), blocksize=64,
                            quant_type="fp4")
    with pytest.raises(ValueError, match=r"quant_state\.bitsandbytes__fp4"):
        NF4Weight.from_bnb({"": q, **st.as_dict(packed=True)})


# ------------------------------------------------------------------------------------------------
# GPU: quantizing on the device gives the same bits as on the CPU backend
# ------------------------------------------------------------------------------------------------


def _gpu_or_skip():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("no GPU visible to JAX")


@pytest.mark.gpu
def test_gpu_division_and_fma_fences():
    """The integer division and the dequantize barrier hold on the GPU's compiler too."""
    gpu = _gpu_or_skip()
    a, b = _division_cases()
    got = jax.jit(Q._div_rn)(jax.device_put(a, gpu), jax.device_put(b, gpu))
    want = jax.jit(Q._div_rn)(jax.device_put(a, jax.devices("cpu")[0]), b)
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((4096, 1024), "bfloat16"), ((1000, 333), "float32"),
                                         ((2048, 1040), "bfloat16"), ((17, 31), "float32")])
def test_gpu_quantize_equals_cpu(shape, dtype):
    gpu, cpu = _gpu_or_skip(), jax.devices("cpu")[0]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, 50)] *= 40
    x = x.astype(jnp.dtype(dtype))
    for dq in (True, False):
        w_gpu = NF4Weight.quantize(jax.device_put(x, gpu), double_quant=dq, sum_lanes=LANES, sum_threads=2)
        w_cpu = NF4Weight.quantize(jax.device_put(x, cpu), double_quant=dq, sum_lanes=LANES, sum_threads=2)
        assert w_gpu.packed.devices() == {gpu} and w_cpu.packed.devices() == {cpu}
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), w_gpu, w_cpu)
        for dt in (None, jnp.float32):
            np.testing.assert_array_equal(_bits(w_gpu.dequantize(dt)), _bits(w_cpu.dequantize(dt)))
        if F is not None:
            t = torch.from_numpy(np.asarray(x, np.float32)).to(getattr(torch, dtype))
            q, st = F.quantize_4bit(t, blocksize=64, compress_statistics=dq, quant_type="nf4")
            if math.prod(shape) // 64 < 32768:  # else the offset depends on torch's thread count
                _assert_matches_bnb(w_gpu, q, st)
