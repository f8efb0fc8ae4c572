"""The fused NF4 matmul (kernels/nf4_matmul.py) against its jnp reference.

On the CPU: the kernel's register-level dequantization program, emulated on numpy for all 128 threads of
both warpgroups, equals `NF4Weight.dequantize(bfloat16)` bit for bit; the whole kernel runs in Pallas' GPU
interpret mode (with the jnp form of the dequantization) against the reference; the dispatch rules.
On the GPU (`pytest -m gpu`): the compiled kernel's in-SMEM tiles bit for bit, and the compiled matmuls
against the reference, up to Llama-3.1-8B shapes.
The LoRA term (`lora=`) the same way: interpret mode (with the interpreter's race detector) on the CPU,
compiled on the GPU, against a float64 product of the same bf16 operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from fastlora_jax.kernels import nf4_matmul as nm
from fastlora_jax.quant import NF4Weight


def _weight(rng, n, k, *, double_quant=True, spread=False):
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    if spread:  # per-row scales over four decades, some rows and blocks exactly zero
        w *= np.float32(10.0) ** rng.uniform(-2, 2, size=(n, 1)).astype(np.float32)
        w[rng.integers(0, n)] = 0.0
        w[rng.integers(0, n), :64] = 0.0
    return NF4Weight.quantize(jnp.asarray(w, jnp.bfloat16), double_quant=double_quant)


def _bf16_bits(a):
    return np.asarray(a).view(np.uint16)


def _lora_case(rng, m, n, k, r, *, transposed):
    """Activation, weight and LoRA pair (left [m, r], right [n, r] or [r, k]) with the LoRA term about as large
    as the NF4 product, so a missing, doubled or misplaced LoRA tile cannot hide in the tolerance."""
    w = _weight(rng, n, k)
    a = jnp.asarray(rng.standard_normal((m, n if transposed else k)), jnp.bfloat16)
    left = jnp.asarray(rng.standard_normal((m, r)), jnp.bfloat16)
    sigma = 0.02 * np.sqrt((n if transposed else k) / r)   # |left @ right| ~ |a @ deq(W)| (W ~ 0.02)
    right = jnp.asarray(rng.standard_normal((r, k) if transposed else (n, r)) * sigma, jnp.bfloat16)
    return a, w, (left, right)


def _assert_lora_close(out, a, w, lora, *, transposed):
    """out against fp32 products of the same bf16 operands (on the device, full fp32 precision as conftest
    sets it): the whole result, and the LoRA part alone.

    Tolerance 1e-2 relative L2: the kernel sums both products in fp32 and rounds once to bf16 (relative
    error <= 2^-9 per element), so a correct kernel lands near 2e-3 on both; a wrong tile gives O(1)."""
    w32 = w.dequantize(jnp.bfloat16).astype(jnp.float32)
    a32, left, right = (v.astype(jnp.float32) for v in (a, *lora))
    base = a32 @ w32 if transposed else a32 @ w32.T
    lora32 = left @ right if transposed else left @ right.T
    out32 = out.astype(jnp.float32)
    assert not bool(jnp.any(jnp.isnan(out32)))
    assert rel_l2(out32, base + lora32) < 1e-2
    assert rel_l2(out32 - base, lora32) < 1e-2


# ----------------------------------------------------------------------------------------------
# CPU: the dequantization program (what runs on the GPU) bit for bit
# ----------------------------------------------------------------------------------------------


CONFIGS = {"shared": nm.TileConfig(shared_dequant=True), "split": nm.TileConfig(shared_dequant=False)}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("double_quant,spread", [(True, False), (False, True), (True, True)])
def test_dequant_program_is_bit_exact(rng, shared, transposed, double_quant, spread):
    n, k = 512, 512
    w = _weight(rng, n, k, double_quant=double_quant, spread=spread)
    ref = _bf16_bits(w.dequantize(jnp.bfloat16))
    packed = np.asarray(w.packed).reshape(n, k // 2)
    scales = np.asarray(nm.kernel_scales(w))
    g = nm._Geom(transposed, shared)
    rows, cols = g.p_rows, 2 * g.p_bytes  # the W region one pipeline step covers
    for r0 in range(0, n, rows):
        for c0 in range(0, k, cols):
            tile = nm._emulate_dequant(packed[r0:r0 + rows, c0 // 2:(c0 + cols) // 2],
                                       scales[c0 // 64:(c0 + cols) // 64, r0:r0 + rows],
                                       transposed=transposed, shared=shared)
            np.testing.assert_array_equal(tile, ref[r0:r0 + rows, c0:c0 + cols])


def test_dequant_program_covers_every_code_and_sign(rng):
    """All 16 codes in every position of a packed word, with negative and positive scales' extremes."""
    rows, cols = 128, nm.K_STEP
    codes = np.stack([rng.permutation(16) for _ in range(rows * cols // 16)]).reshape(rows, cols)
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8)
    scales = rng.uniform(1e-4, 3.0, size=(cols // 64, rows)).astype(np.float32)
    expect = (nm.NF4_CODE[codes] * np.repeat(scales.T, 64, axis=1)).astype(np.float32)
    expect = np.asarray(jnp.asarray(expect).astype(jnp.bfloat16)).view(np.uint16)
    np.testing.assert_array_equal(nm._emulate_dequant_tile(packed, scales), expect)


# ----------------------------------------------------------------------------------------------
# CPU: the whole kernel in Pallas GPU interpret mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,m,n,k", [
    ("shared", 256, 256, 256), ("shared", 512, 128, 192), ("shared", 512, 512, 128), ("shared", 256, 128, 64),
    ("split", 128, 256, 192), ("split", 512, 512, 128)])
def test_interpret_forward_matches_reference(rng, config, m, n, k):
    # K=192: not a multiple of 128 (3 pipeline steps); K=64: a single step; (512, 512, 128): 8 (shared) or
    # 16 (split) output tiles on the 4 simulated SMs, so dequantized-tile buffers and barriers carry across
    # output tiles
    w = _weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = nm.nf4_matmul(x, w, impl="interpret", config=CONFIGS[config])
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert rel_l2(out, nm.nf4_matmul_reference(x, w)) < 1e-2
    # against float64 on the same dequantized weight: only accumulation order and the output rounding
    ref64 = np.asarray(x, np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64).T
    assert rel_l2(out, ref64) < 1e-2


@pytest.mark.parametrize("config,m,n,k", [
    ("shared", 256, 192, 256), ("shared", 512, 64, 128), ("split", 128, 192, 512), ("split", 256, 64, 256)])
def test_interpret_transposed_matches_reference(rng, config, m, n, k):
    w = _weight(rng, n, k)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    out = nm.nf4_matmul_t(dy, w, impl="interpret", config=CONFIGS[config])
    assert out.shape == (m, k) and out.dtype == jnp.bfloat16
    assert rel_l2(out, nm.nf4_matmul_t_reference(dy, w)) < 1e-2
    ref64 = np.asarray(dy, np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64)
    assert rel_l2(out, ref64) < 1e-2


@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("transposed", [False, True])
def test_interpret_in_kernel_tiles_equal_dequantize(rng, config, transposed):
    w = _weight(rng, 256, 256)
    out = nm.dequantize_tiles(w, transposed=transposed, impl="interpret", config=CONFIGS[config])
    np.testing.assert_array_equal(_bf16_bits(out), _bf16_bits(w.dequantize(jnp.bfloat16)))


def test_interpret_leading_axes_and_jit(rng):
    w = _weight(rng, 128, 128)
    x = jnp.asarray(rng.standard_normal((2, 128, 128)), jnp.bfloat16)
    out = jax.jit(lambda x, w: nm.nf4_matmul(x, w, impl="interpret"))(x, w)
    assert out.shape == (2, 128, 128)
    assert rel_l2(out, nm.nf4_matmul_reference(x, w)) < 1e-2


# ----------------------------------------------------------------------------------------------
# CPU: dispatch and errors
# ----------------------------------------------------------------------------------------------


def test_auto_is_xla_off_gpu_and_for_unsupported_shapes(rng):
    w = _weight(rng, 128, 128)
    x = jnp.asarray(rng.standard_normal((100, 128)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(nm.nf4_matmul(x, w)), np.asarray(nm.nf4_matmul_reference(x, w)))
    assert nm.supported(256, 128, 64) and not nm.supported(100, 128, 64)
    assert nm.supported(256, 64, 128, transposed=True) and not nm.supported(256, 64, 64, transposed=True)
    split = CONFIGS["split"]
    assert nm.supported(128, 256, 64, config=split) and not nm.supported(128, 128, 64, config=split)
    assert nm.supported(128, 64, 256, transposed=True, config=split)
    if jax.default_backend() != "gpu":
        assert nm._resolve_impl("auto", m=256, n=128, k=128, transposed=False, w=w, dtype=jnp.bfloat16) == "xla"


def test_bad_inputs_raise_clear_errors(rng):
    w = _weight(rng, 128, 128)
    with pytest.raises(ValueError, match="impl='bogus'"):
        nm.nf4_matmul(jnp.zeros((256, 128), jnp.bfloat16), w, impl="bogus")
    with pytest.raises(ValueError, match="does not end in K=128"):
        nm.nf4_matmul(jnp.zeros((256, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="does not end in N=128"):
        nm.nf4_matmul_t(jnp.zeros((256, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="M=100"):
        nm.nf4_matmul(jnp.zeros((100, 128), jnp.bfloat16), w, impl="pallas")
    with pytest.raises(ValueError, match="float32"):
        nm.nf4_matmul(jnp.zeros((256, 128), jnp.float32), w, impl="interpret")
    with pytest.raises(ValueError, match="stack"):
        nm.nf4_matmul(jnp.zeros((256, 128), jnp.bfloat16), NF4Weight.stack([w, w]))
    w128 = NF4Weight.quantize(jnp.zeros((128, 128), jnp.bfloat16).at[0, 0].set(1), blocksize=128)
    with pytest.raises(ValueError, match="blocksize=128"):
        nm.nf4_matmul(jnp.zeros((256, 128), jnp.bfloat16), w128, impl="pallas")


# ----------------------------------------------------------------------------------------------
# CPU: the LoRA step (lora=) in interpret mode, the reference, dispatch and errors
# ----------------------------------------------------------------------------------------------

# config -> (M, N, K): at least two contraction steps, and more output tiles than the 4 simulated SMs, so
# the LoRA step's W buffer and barriers carry across output tiles
LORA_SHAPES = {
    (False, "shared"): (512, 512, 128), (False, "split"): (256, 512, 192),
    (True, "shared"): (512, 128, 512), (True, "split"): (256, 128, 1024),
}


@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("config", ["shared", "split"])
def test_interpret_lora_forward_matches_reference(rng, config, r):
    m, n, k = LORA_SHAPES[False, config]
    a, w, lora = _lora_case(rng, m, n, k, r, transposed=False)
    out = nm.nf4_matmul(a, w, lora=lora, impl="interpret", config=CONFIGS[config])
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    _assert_lora_close(out, a, w, lora, transposed=False)
    assert rel_l2(out, nm.nf4_matmul_reference(a, w, lora=lora)) < 1e-2


@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("config", ["shared", "split"])
def test_interpret_lora_transposed_matches_reference(rng, config, r):
    m, n, k = LORA_SHAPES[True, config]
    a, w, lora = _lora_case(rng, m, n, k, r, transposed=True)
    out = nm.nf4_matmul_t(a, w, lora=lora, impl="interpret", config=CONFIGS[config])
    assert out.shape == (m, k) and out.dtype == jnp.bfloat16
    _assert_lora_close(out, a, w, lora, transposed=True)
    assert rel_l2(out, nm.nf4_matmul_t_reference(a, w, lora=lora)) < 1e-2


@pytest.mark.parametrize("transposed", [False, True])
def test_interpret_lora_odd_rank_and_leading_axes_under_jit(rng, transposed):
    """R=3 (zero-padded to 64 like any R <= 64), a [2, 256, .] activation, fp32 LoRA operands, under jit."""
    m, n, k, r = 512, 256, 256, 3
    a, w, (left, right) = _lora_case(rng, m, n, k, r, transposed=transposed)
    lora = (left.astype(jnp.float32).reshape(2, m // 2, r), right.astype(jnp.float32))
    op = nm.nf4_matmul_t if transposed else nm.nf4_matmul
    out = jax.jit(lambda a, w, lora: op(a, w, lora=lora, impl="interpret"))(a.reshape(2, m // 2, -1), w, lora)
    assert out.shape == (2, m // 2, k if transposed else n)
    _assert_lora_close(out.reshape(m, -1), a, w, (left, right), transposed=transposed)


@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("transposed", [False, True])
def test_interpret_zero_lora_is_the_plain_kernel(rng, config, transposed):
    """A zero LoRA pair changes nothing: the extra step adds exact zeros and disturbs no W buffer."""
    m, n, k = LORA_SHAPES[transposed, config]
    a, w, (left, right) = _lora_case(rng, m, n, k, 16, transposed=transposed)
    op = nm.nf4_matmul_t if transposed else nm.nf4_matmul
    plain = op(a, w, impl="interpret", config=CONFIGS[config])
    zero = op(a, w, lora=(left, jnp.zeros_like(right)), impl="interpret", config=CONFIGS[config])
    np.testing.assert_array_equal(np.asarray(zero, np.float32), np.asarray(plain, np.float32))


@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("transposed", [False, True])
def test_interpret_lora_has_no_races(rng, monkeypatch, config, transposed):
    """The interpreter's happens-before race detector over the TMA loads of the LoRA tiles, the epilogue's
    TMA stores from the same SMEM and the W buffers. (It runs wgmma synchronously, so it cannot see a
    TMA write racing an in-flight wgmma: that part is argued in the kernel and checked on the GPU.)"""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    params = plgpu.InterpretGPUParams
    monkeypatch.setattr(plgpu, "InterpretGPUParams", lambda: params(detect_races=True))
    m, n, k = LORA_SHAPES[transposed, config]
    a, w, lora = _lora_case(rng, m, n, k, 8, transposed=transposed)
    op = nm.nf4_matmul_t if transposed else nm.nf4_matmul
    out = jax.block_until_ready(op(a, w, lora=lora, impl="interpret", config=CONFIGS[config]))
    assert not interpret_pallas_call.get_races().races_found
    _assert_lora_close(out, a, w, lora, transposed=transposed)


def test_lora_none_and_xla_path(rng):
    """lora=None is the old reference bit for bit; impl="xla" with lora= is the reference (any R, here 96 >
    the kernel's 64, which "auto" therefore sends to XLA)."""
    w = _weight(rng, 256, 128)
    x = jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16)
    old = jnp.einsum("mk,nk->mn", x, w.dequantize(jnp.bfloat16), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(_bf16_bits(nm.nf4_matmul_reference(x, w)), _bf16_bits(old.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(_bf16_bits(nm.nf4_matmul(x, w, lora=None, impl="xla")),
                                  _bf16_bits(old.astype(jnp.bfloat16)))
    for transposed in (False, True):
        a, w2, lora = _lora_case(rng, 256, 256, 128, 96, transposed=transposed)
        op, ref = (nm.nf4_matmul_t, nm.nf4_matmul_t_reference) if transposed else (nm.nf4_matmul, nm.nf4_matmul_reference)
        out = op(a, w2, lora=lora)  # auto: XLA off the GPU, and for R > 64 anywhere
        np.testing.assert_array_equal(_bf16_bits(out), _bf16_bits(ref(a, w2, lora=lora)))
        _assert_lora_close(out, a, w2, lora, transposed=transposed)
        assert nm._resolve_impl("auto", m=256, n=256, k=128, transposed=transposed, w=w2, dtype=jnp.bfloat16,
                                rank=96) == "xla"


def test_bad_lora_raises_clear_errors(rng):
    w = _weight(rng, 128, 256)                    # N=128, K=256
    x = jnp.zeros((256, 256), jnp.bfloat16)
    dy = jnp.zeros((256, 128), jnp.bfloat16)
    xa, b = jnp.zeros((256, 16), jnp.bfloat16), jnp.zeros((128, 16), jnp.bfloat16)
    gb, a = jnp.zeros((256, 16), jnp.bfloat16), jnp.zeros((16, 256), jnp.bfloat16)
    for impl in ("xla", "interpret"):
        with pytest.raises(ValueError, match=r"lora must be None or a pair \(xa_mr, b_nr\), got tuple of length 3"):
            nm.nf4_matmul(x, w, lora=(xa, b, b), impl=impl)
        with pytest.raises(ValueError, match=r"lora xa_mr.shape=\(128, 16\); expected \(256, 'R'\)"):
            nm.nf4_matmul(x, w, lora=(xa[:128], b), impl=impl)
        with pytest.raises(ValueError, match=r"lora b_nr.shape=\(16, 128\); expected \[N=128, R=16\]"):
            nm.nf4_matmul(x, w, lora=(xa, b.T), impl=impl)
        with pytest.raises(ValueError, match=r"lora b_nr.shape=\(128, 8\); expected \[N=128, R=16\]"):
            nm.nf4_matmul(x, w, lora=(xa, b[:, :8]), impl=impl)
        with pytest.raises(ValueError, match=r"nf4_matmul_t: lora a_rk.shape=\(256, 16\); expected \[R=16, K=256\]"):
            nm.nf4_matmul_t(dy, w, lora=(gb, a.T), impl=impl)
        with pytest.raises(ValueError, match=r"nf4_matmul_t: lora gb_mr.shape=\(256,\)"):
            nm.nf4_matmul_t(dy, w, lora=(gb[:, 0], a), impl=impl)
        with pytest.raises(ValueError, match="lora xa_mr has dtype int32; a floating dtype is accepted"):
            nm.nf4_matmul(x, w, lora=(xa.astype(jnp.int32), b), impl=impl)
    with pytest.raises(ValueError, match=r"lora must be None or a pair \(gb_mr, a_rk\), got Array"):
        nm.nf4_matmul_t(dy, w, lora=gb)
    with pytest.raises(ValueError, match=r"impl='interpret' cannot run this call: LoRA rank R=65 .* R <= 64"):
        nm.nf4_matmul(x, w, lora=(jnp.zeros((256, 65), jnp.bfloat16), jnp.zeros((128, 65), jnp.bfloat16)),
                      impl="interpret")


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernel
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_in_kernel_tiles_equal_dequantize(rng, config, transposed):
    w = _weight(rng, 1024, 2048, spread=True)
    out = nm.dequantize_tiles(w, transposed=transposed, impl="pallas", config=CONFIGS[config])
    np.testing.assert_array_equal(_bf16_bits(out), _bf16_bits(w.dequantize(jnp.bfloat16)))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("m,n,k", [(256, 256, 64), (512, 512, 320), (1024, 1024, 2048), (4096, 14336, 4096),
                                   (4096, 4096, 14336)])
def test_gpu_forward_matches_reference(rng, config, m, n, k):
    w = _weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = jax.block_until_ready(nm.nf4_matmul(x, w, impl="pallas", config=CONFIGS[config]))
    ref = nm.nf4_matmul_reference(x, w)
    assert not np.any(np.isnan(np.asarray(out, np.float32)))
    assert rel_l2(out, ref) < 1e-2
    # the same call again on fresh inputs: an error that moves between runs is a race
    x2 = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    assert rel_l2(nm.nf4_matmul(x2, w, impl="pallas", config=CONFIGS[config]), nm.nf4_matmul_reference(x2, w)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("m,n,k", [(256, 64, 256), (512, 320, 512), (1024, 1024, 2048), (4096, 14336, 4096),
                                   (4096, 4096, 14336)])
def test_gpu_transposed_matches_reference(rng, config, m, n, k):
    w = _weight(rng, n, k)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    out = jax.block_until_ready(nm.nf4_matmul_t(dy, w, impl="pallas", config=CONFIGS[config]))
    assert not np.any(np.isnan(np.asarray(out, np.float32)))
    assert rel_l2(out, nm.nf4_matmul_t_reference(dy, w)) < 1e-2


@pytest.mark.gpu
def test_gpu_auto_uses_the_kernel_when_supported(rng):
    w = _weight(rng, 256, 256)
    assert nm._resolve_impl("auto", m=512, n=256, k=256, transposed=False, w=w, dtype=jnp.bfloat16) == "pallas"
    assert nm._resolve_impl("auto", m=100, n=256, k=256, transposed=False, w=w, dtype=jnp.bfloat16) == "xla"
    x = jnp.asarray(rng.standard_normal((512, 256)), jnp.bfloat16)
    assert rel_l2(jax.jit(nm.nf4_matmul)(x, w), nm.nf4_matmul_reference(x, w)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("transposed,m,n,k,r", [
    # every rank on small and medium shapes (R only changes the zero padding: the compiled kernel is the same)
    *[(False, 256, 256, 128, r) for r in (8, 16, 64)], *[(False, 1024, 1024, 2048, r) for r in (8, 16, 64)],
    *[(True, 256, 128, 256, r) for r in (8, 16, 64)], *[(True, 1024, 1024, 2048, r) for r in (8, 16, 64)],
    # Llama-3.1-8B's MLP shapes
    (False, 4096, 14336, 4096, 16), (True, 4096, 4096, 14336, 16)])
def test_gpu_lora_matches_reference(rng, config, transposed, m, n, k, r):
    op = nm.nf4_matmul_t if transposed else nm.nf4_matmul
    a, w, lora = _lora_case(rng, m, n, k, r, transposed=transposed)
    out = jax.block_until_ready(op(a, w, lora=lora, impl="pallas", config=CONFIGS[config]))
    _assert_lora_close(out, a, w, lora, transposed=transposed)
    # fresh inputs through the same compiled kernel: an error that moves between runs is a race
    a2, _, lora2 = _lora_case(rng, m, n, k, r, transposed=transposed)
    _assert_lora_close(op(a2, w, lora=lora2, impl="pallas", config=CONFIGS[config]), a2, w, lora2,
                       transposed=transposed)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["shared", "split"])
@pytest.mark.parametrize("transposed,m,n,k", [(False, 2048, 4096, 4096), (True, 2048, 4096, 4096)])
def test_gpu_zero_lora_is_the_plain_kernel(rng, config, transposed, m, n, k):
    """Bit for bit: a LoRA tile landing in a W buffer still in use would change the NF4 product."""
    op = nm.nf4_matmul_t if transposed else nm.nf4_matmul
    a, w, (left, right) = _lora_case(rng, m, n, k, 16, transposed=transposed)
    plain = op(a, w, impl="pallas", config=CONFIGS[config])
    zero = op(a, w, lora=(left, jnp.zeros_like(right)), impl="pallas", config=CONFIGS[config])
    np.testing.assert_array_equal(np.asarray(zero, np.float32), np.asarray(plain, np.float32))


@pytest.mark.gpu
def test_gpu_auto_lora_uses_the_kernel(rng):
    a, w, lora = _lora_case(rng, 512, 256, 256, 16, transposed=False)
    assert nm._resolve_impl("auto", m=512, n=256, k=256, transposed=False, w=w, dtype=jnp.bfloat16, rank=16) == "pallas"
    out = jax.jit(lambda a, w, lora: nm.nf4_matmul(a, w, lora=lora))(a, w, lora)
    _assert_lora_close(out, a, w, lora, transposed=False)
