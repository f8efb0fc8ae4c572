"""The fused NF4 matmul (kernels/nf4_matmul.py) against its jnp reference.

On the CPU: the kernel's register-level dequantization program, emulated on numpy for all 128 threads of
both warpgroups, equals `NF4Weight.dequantize(bfloat16)` bit for bit; the whole kernel runs in Pallas' GPU
interpret mode (with the jnp form of the dequantization) against the reference; the dispatch rules.
On the GPU (`pytest -m gpu`): the compiled kernel's in-SMEM tiles bit for bit, and the compiled matmuls
against the reference, up to Llama-3.1-8B shapes.
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
