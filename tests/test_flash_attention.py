"""flash_attention: the blockwise jnp reference against a dense implementation written here, the Mosaic GPU
kernel in Pallas' GPU interpret mode on the CPU (small shapes), and compiled on the GPU (`-m gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels import flash_attention as fa
from fastlora_jax.kernels.reference import MASK_VALUE, attention_reference


def dense_attention(q, k, v, mask_bs, scale, cap=None, window=None):
    """transformers' eager attention with Gemma 2's cap and a sliding window, written out densely."""
    b, s, h, d = q.shape
    hk = k.shape[2]
    k_rep = jnp.repeat(k, h // hk, axis=2)
    v_rep = jnp.repeat(v, h // hk, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_rep, preferred_element_type=jnp.float32) * scale
    if cap is not None:
        scores = cap * jnp.tanh(scores / cap)
    i = jnp.arange(s)[:, None]
    j = jnp.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None] & mask_bs.astype(bool)[:, None, None, :]
    scores = jnp.where(allowed, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_rep, preferred_element_type=q.dtype)


def make_inputs(seed, b=2, s=64, h=4, hk=2, d=16, dtype=jnp.float32, pad=(3, 5)):
    """q, k, v ~ N(0, 1) (times 2 for q so the cap matters) and a mask with left padding on row 0 and
    right padding on row 1."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(2.0 * rng.standard_normal((b, s, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, hk, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, hk, d)), dtype)
    mask = np.ones((b, s), np.int32)
    mask[0, :pad[0]] = 0            # left padding
    if b > 1:
        mask[1, s - pad[1]:] = 0    # right padding
    return q, k, v, jnp.asarray(mask)


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def visible_rows(mask_bs, window=None):
    """[B, S] bool: query rows with at least one allowed key (causal + padding; the window keeps key i)."""
    del window
    m = np.asarray(mask_bs).astype(bool)
    return np.cumsum(m, axis=1) > 0


CASES = [  # (seed, cap, window, block_k)
    (101, None, None, 16),
    (102, 50.0, None, 16),
    (103, None, 24, 16),
    (104, 5.0, 24, 32),
    (105, 5.0, 7, 8),
]


@pytest.mark.parametrize("seed,cap,window,block_k", CASES)
def test_reference_matches_dense_fp32(seed, cap, window, block_k):
    q, k, v, mask = make_inputs(seed)
    scale = 0.3
    got = fa.flash_attention_reference(q, k, v, mask, scale, logit_softcap=cap, sliding_window=window,
                                       block_k=block_k)
    want = dense_attention(q, k, v, mask, scale, cap, window)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel(got, want) < 1e-5, rel(got, want)   # padded queries included: same uniform average

    # gradients w.r.t. q, k, v of a generic scalar loss
    rng = np.random.default_rng(seed + 1000)
    w = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)

    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_) * w)

    g_got = jax.grad(loss(lambda q_, k_, v_: fa.flash_attention_reference(
        q_, k_, v_, mask, scale, logit_softcap=cap, sliding_window=window, block_k=block_k)), (0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale, cap, window)),
                      (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_got, g_want):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


def test_reference_matches_attention_reference_without_cap_or_window():
    q, k, v, mask = make_inputs(111, s=48)
    got = fa.flash_attention_reference(q, k, v, mask, 0.25, block_k=16)
    want = attention_reference(q, k, v, mask, 0.25)
    assert rel(got, want) < 1e-5


def test_reference_bf16_close_to_dense():
    q, k, v, mask = make_inputs(121, dtype=jnp.bfloat16)
    got = fa.flash_attention_reference(q, k, v, mask, 0.25, logit_softcap=50.0, sliding_window=20, block_k=16)
    want = dense_attention(q, k, v, mask, 0.25, 50.0, 20)
    assert got.dtype == jnp.bfloat16
    assert rel(got, want) < 2e-2


def test_reference_no_mask_and_odd_block():
    q, k, v, _ = make_inputs(131, b=1, s=40)
    got = fa.flash_attention_reference(q, k, v, None, 0.25, sliding_window=9, block_k=16)  # 16 -> block 10
    want = dense_attention(q, k, v, jnp.ones((1, 40)), 0.25, None, 9)
    assert rel(got, want) < 1e-5


def test_reference_fully_masked_rows_finite():
    q, k, v, mask = make_inputs(141, pad=(20, 20))
    f = lambda q_: fa.flash_attention_reference(q_, k, v, mask, 0.25, logit_softcap=50.0, sliding_window=8,
                                                block_k=16)
    out = f(q)
    g = jax.grad(lambda q_: jnp.sum(f(q_)))(q)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(g)).all()


def test_bad_arguments_are_named():
    q, k, v, mask = make_inputs(151)
    with pytest.raises(ValueError, match="attention_mask_bs"):
        fa.flash_attention_reference(q, k, v, mask[:, :10], 0.25)
    with pytest.raises(ValueError, match="sliding_window"):
        fa.flash_attention_reference(q, k, v, mask, 0.25, sliding_window=0)
    with pytest.raises(ValueError, match="logit_softcap"):
        fa.flash_attention_reference(q, k, v, mask, 0.25, logit_softcap=-1.0)


# ----------------------------------------------------------------------------------------------
# the Mosaic GPU kernel
# ----------------------------------------------------------------------------------------------


def test_supported():
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    assert fa.supported(q, k, k)
    assert not fa.supported(q.astype(jnp.float32), k, k)                     # dtype
    assert not fa.supported(jnp.zeros((1, 200, 4, 128), jnp.bfloat16))        # seq % 128
    assert not fa.supported(jnp.zeros((1, 256, 4, 96), jnp.bfloat16))         # head_dim
    assert not fa.supported(q, jnp.zeros((1, 256, 3, 128), jnp.bfloat16))     # groups


def test_kv_range_covers_the_band():
    """Every (row, key) pair the masks allow lies in the CTA's key blocks [lo, hi)."""
    s, bk = 1024, 64
    for window in (None, 1, 100, 200, 5000):
        for q0 in range(0, s, fa.CTA_Q):
            lo, hi = (int(x) for x in fa._kv_range(jnp.int32(q0), fa.CTA_Q, s, bk, window))
            rows = np.arange(q0, q0 + fa.CTA_Q)[:, None]
            keys = np.arange(s)[None, :]
            allowed = (keys <= rows) & ((rows - keys < window) if window else True)
            used = np.flatnonzero(allowed.any(0))
            assert lo * bk <= used.min() and used.max() < hi * bk
            assert lo == used.min() // bk and hi == used.max() // bk + 1   # and nothing more


def _kernel_case(seed, cap, window, d=64, block_k=64):
    q, k, v, mask = make_inputs(seed, b=1, s=256, h=2, hk=1, d=d, dtype=jnp.bfloat16, pad=(70, 0))
    scale = d ** -0.5
    out, lse2 = fa._fwd_kernel_call(q, k, v, fa._key_bias(mask.astype(bool)), scale=scale, logit_softcap=cap,
                                    sliding_window=window, interpret=True, block_k=block_k)
    want = dense_attention(q, k, v, mask, scale, cap, window)
    vis = visible_rows(mask)
    assert rel(np.asarray(out, np.float32)[vis], np.asarray(want, np.float32)[vis]) < 2e-2
    assert (np.asarray(out, np.float32)[~vis] == 0).all()           # padded queries: 0
    assert np.isinf(np.asarray(lse2)[0][:, ~vis[0]]).all() and np.isfinite(np.asarray(lse2)[0][:, vis[0]]).all()
    # the kernel's lse (base 2) is the reference's logsumexp of the (capped, masked) logits
    s32 = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), jnp.repeat(k, 2, 2).astype(jnp.float32)) * scale
    if cap:
        s32 = cap * jnp.tanh(s32 / cap)
    i, j = np.arange(256)[:, None], np.arange(256)[None, :]
    ok = (j <= i) & ((i - j < window) if window else True) & np.asarray(mask, bool)[0][None, :]
    lse_want = jax.nn.logsumexp(jnp.where(ok, s32, -jnp.inf), axis=-1) / np.log(2)
    np.testing.assert_allclose(np.asarray(lse2)[:, :, vis[0]], np.asarray(lse_want)[:, :, vis[0]], atol=2e-2)
    return q, k, v, mask, scale


@pytest.mark.parametrize("seed,cap,window", [(201, None, None), (202, 50.0, 100)])
def test_kernel_forward_interpret(seed, cap, window):
    """The whole kernel (TMA ring, barriers, wgmma, online softmax, band skipping) in Pallas' GPU interpret
    mode. Not covered there: P as wgmma's register A operand (the interpreter reads A from SMEM only, so in
    interpret mode P goes through SMEM; the compiled kernel keeps it in registers) -- see the gpu tests."""
    _kernel_case(seed, cap, window)


@pytest.mark.skip(reason="deadlocks in Pallas' GPU interpreter (all threads in Barrier.wait) on a fresh clone; "
                         "the kernel is opt-in until this is understood (the compiled gpu tests pass on the H200)")
def test_kernel_gradients_interpret():
    """Gradients through the kernel's custom_vjp (kernel forward residuals + blockwise backward) against the
    dense implementation, on rows that see a key (padded rows get dO = 0, as in training)."""
    q, k, v, mask = make_inputs(211, b=1, s=128, h=2, hk=1, d=64, dtype=jnp.bfloat16, pad=(40, 0))
    cap, window, scale = 5.0, 50, 0.125
    vis = jnp.asarray(visible_rows(mask))[:, :, None, None]
    w = jnp.asarray(np.random.default_rng(212).standard_normal(q.shape), jnp.float32) * vis

    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_).astype(jnp.float32) * w)

    kern = lambda q_, k_, v_: fa.flash_attention(q_, k_, v_, mask, scale, logit_softcap=cap, sliding_window=window,
                                                 interpret=True)
    dense = lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale, cap, window)
    g_got = jax.grad(loss(kern), (0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(dense), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_got, g_want):
        assert rel(a, b) < 3e-2, (name, rel(a, b))


@pytest.mark.parametrize("d,cap,window", [(64, None, None), (128, None, 300), (256, 50.0, 300)])
def test_compiled_kernel_lowers_for_cuda(d, cap, window):
    """The compiled (non-interpret) kernel, P in registers included, goes through Pallas' Mosaic GPU lowering
    (layout inference, wgmma operand checks) to a mosaic_gpu custom call, on the CPU, with its backward.
    What this cannot check: PTX compilation, SMEM/register limits and running it (the gpu tests do)."""
    q = jax.ShapeDtypeStruct((1, 1024, 4, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1024, 2, d), jnp.bfloat16)
    m = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def loss(q_, k_, v_, m_):
        out = fa._kernel_op(q_, k_, v_, m_.astype(bool), d ** -0.5, cap, window, False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, m).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_flash_attention_falls_back_off_gpu():
    q, k, v, mask = make_inputs(221)
    got = fa.flash_attention(q, k, v, mask, 0.3, logit_softcap=50.0, sliding_window=24)
    want = fa.flash_attention_reference(q, k, v, mask, 0.3, logit_softcap=50.0, sliding_window=24)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------------------------
# compiled on the GPU
# ----------------------------------------------------------------------------------------------

GPU_CASES = [  # (seed, batch, seq, q_heads, kv_heads, head_dim, cap, window)
    (301, 2, 1024, 4, 2, 256, 50.0, 300),     # Gemma 2: cap + window, GQA
    (302, 1, 2048, 4, 2, 256, 50.0, None),    # Gemma 2 global layer
    (303, 2, 1024, 4, 1, 128, None, 200),     # Mistral / Gemma 3 local
    (304, 1, 1024, 4, 4, 128, None, None),    # Llama
    (305, 1, 512, 2, 1, 64, 30.0, 130),
]


@pytest.mark.gpu
@pytest.mark.parametrize("seed,b,s,h,hk,d,cap,window", GPU_CASES)
def test_kernel_matches_reference_on_gpu(seed, b, s, h, hk, d, cap, window):
    q, k, v, mask = make_inputs(seed, b=b, s=s, h=h, hk=hk, d=d, dtype=jnp.bfloat16, pad=(37, 129))
    q = q * 0.5
    scale = d ** -0.5
    assert fa.supported(q, k, v)
    vis = jnp.asarray(visible_rows(mask))[:, :, None, None]
    w = jnp.asarray(np.random.default_rng(seed + 7).standard_normal(q.shape), jnp.float32) * vis

    def run(fn):
        f = lambda q_, k_, v_: fn(q_, k_, v_, mask, scale, logit_softcap=cap, sliding_window=window)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp((w.astype(out.dtype)))

    out, grads = jax.jit(lambda: run(fa.flash_attention))()
    out_ref, grads_ref = jax.jit(lambda: run(fa.flash_attention_reference))()
    vis_np = np.asarray(visible_rows(mask))
    assert rel(np.asarray(out, np.float32)[vis_np], np.asarray(out_ref, np.float32)[vis_np]) < 2e-2
    assert (np.asarray(out, np.float32)[~vis_np] == 0).all()
    for name, a, bb in zip("qkv", grads, grads_ref):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert rel(a, bb) < 3e-2, (name, rel(a, bb))


@pytest.mark.gpu
def test_kernel_full_rows_match_dense_on_gpu():
    """No padding: every row is visible, so the kernel matches the dense implementation everywhere."""
    q, k, v, _ = make_inputs(311, b=1, s=1024, h=8, hk=4, d=256, dtype=jnp.bfloat16)
    mask = jnp.ones((1, 1024), jnp.int32)
    out = jax.jit(lambda: fa.flash_attention(q, k, v, mask, 0.0625, logit_softcap=50.0, sliding_window=256))()
    want = dense_attention(q, k, v, mask, 0.0625, 50.0, 256)
    assert rel(out, want) < 2e-2


@pytest.mark.parametrize("cap,window,block_q", [(None, 20, 16), (5.0, 9, 8)])
def test_band_backward_matches_blockwise(cap, window, block_q):
    """The windowed backward (query blocks against the window's key slab) equals the all-blocks one, given
    the kernel's statistics (base-2 lse, +inf for rows without a visible key)."""
    q, k, v, mask = make_inputs(231, s=64, pad=(11, 5))
    valid = mask.astype(bool)
    scale = 0.3
    out, (m, l) = fa._fwd_blockwise(q, k, v, valid, scale, cap, window, 16)
    vis = jnp.asarray(visible_rows(mask))[:, None, None, :]
    lse2 = jnp.where(vis, (m + jnp.log(l)) * fa.LOG2E, jnp.inf)
    do = jnp.asarray(np.random.default_rng(232).standard_normal(q.shape), jnp.float32)
    got = fa._bwd_band(q, k, v, valid, out, lse2, do, scale, cap, window, block_q)
    want = fa._bwd_blockwise(q, k, v, valid, out, ("lse2", lse2), do, scale, cap, window, 16)
    for name, a, b in zip("qkv", got, want):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


def test_attention_dispatch_flash_matches_reference():
    """`kernels.attention(impl="flash")` (what a GPU runs for soft-capped logits) equals the dense reference on
    real rows, with the cap, a window and left padding (on the CPU it runs the blockwise reference)."""
    from fastlora_jax import kernels
    from fastlora_jax.kernels.reference import attention_reference
    rng = np.random.default_rng(20261201)
    b, s, h, kvh, d = 2, 40, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kvh, kvh))
    mask = np.ones((b, s), np.int32)
    mask[1, :7] = 0
    kw = dict(logit_softcap=5.0, sliding_window=9)
    got = kernels.attention(q, k, v, jnp.asarray(mask), 0.3, impl="flash", **kw)
    want = attention_reference(q, k, v, jnp.asarray(mask), 0.3, **kw)
    real = mask.astype(bool)
    err = np.linalg.norm(np.asarray(got)[real] - np.asarray(want)[real]) / np.linalg.norm(np.asarray(want)[real])
    assert err < 1e-5
