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
