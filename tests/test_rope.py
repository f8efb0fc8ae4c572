"""RoPE parity with transformers 5.17 (the oracle): inv_freq / attention scaling for every rope type,
cos/sin against LlamaRotaryEmbedding.forward (incl. dynamic-NTK and LongRoPE switching past the
original context), apply_rotary against apply_rotary_pos_emb, and config parsing (v5 and legacy)."""

import json
import math
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from fastlora_jax.rope import SUPPORTED_ROPE_TYPES, apply_rotary, rope_cos_sin, rope_inv_freq, rope_parameters

EPS32 = float(np.finfo(np.float32).eps)
LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_rs = np.random.default_rng(1234)
SHORT16, LONG16 = [round(float(v), 4) for v in _rs.uniform(1, 2, 16)], [round(float(v), 4) for v in _rs.uniform(1, 9, 16)]

# id -> (rope_parameters, LlamaConfig overrides). hidden_size // num_attention_heads == 16 throughout,
# so head_dim=32/64/128 exercises an explicit head_dim that differs from it.
CASES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, {}),
    "default_head_dim_differs": ({"rope_type": "default", "rope_theta": 1e6}, {"head_dim": 32}),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}, {}),
    "linear_partial": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
                       {"head_dim": 32}),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.5}, {"head_dim": 32}),
    "dynamic_partial": ({"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 4.0,
                         "partial_rotary_factor": 0.5}, {"head_dim": 64}),
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
             {"head_dim": 32}),
    "yarn_mscale": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                     "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}, {"head_dim": 64}),
    "yarn_attention_factor_untruncated": (
        {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 3.3, "original_max_position_embeddings": 100,
         "attention_factor": 0.9, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, {"head_dim": 32}),
    "yarn_implicit_factor": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                              "original_max_position_embeddings": 64}, {}),
    "yarn_partial": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                      "partial_rotary_factor": 0.5}, {"head_dim": 64}),
    "llama31": (dict(LLAMA31), {"head_dim": 128, "max_position_embeddings": 131072}),
    "llama3_custom": ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 3.0, "low_freq_factor": 1.3,
                       "high_freq_factor": 3.7, "original_max_position_embeddings": 100}, {"head_dim": 64}),
    "longrope": ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT16, "long_factor": LONG16,
                  "original_max_position_embeddings": 64}, {"head_dim": 32}),
    "longrope_explicit": ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT16,
                           "long_factor": LONG16, "original_max_position_embeddings": 64, "factor": 2.0,
                           "attention_factor": 1.1}, {"head_dim": 32}),
    "proportional": ({"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                      "factor": 2.0}, {"head_dim": 32}),
}
# types whose frequencies depend on the positions being embedded
SEQ_DEPENDENT = {"dynamic", "longrope"}


def tiny_config(rope_params, **overrides):
    kw = dict(vocab_size=32, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    kw.update(overrides)
    return LlamaConfig(rope_parameters=dict(rope_params), **kw)


def case_config(name):
    rp, overrides = CASES[name]
    return tiny_config(rp, **overrides)


def reference_init(cfg, seq_len=None):
    """transformers' init function for this config, called as LlamaRotaryEmbedding would."""
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        if cfg.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:  # Llama ignores it, Phi3 honours it
            inv, att = Phi3RotaryEmbedding.compute_default_rope_parameters(cfg)
        else:
            inv, att = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, att = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
    return inv.numpy(), att


def position_batches(cfg, rng):
    """Random [2, 12] position ids: inside the original context, and (for every type) past it."""
    rope_type = cfg.rope_parameters["rope_type"]
    orig = cfg.rope_parameters.get("original_max_position_embeddings", cfg.max_position_embeddings)
    short = np.sort(rng.integers(0, min(orig, cfg.max_position_embeddings), size=(2, 12)), axis=-1)
    top = 4 * cfg.max_position_embeddings if rope_type in SEQ_DEPENDENT else 3 * orig
    long = np.sort(rng.integers(0, top, size=(2, 12)), axis=-1)
    long[:, -1] = top - 1  # make sure the batch really goes past the original length
    return {"short": short, "long": long}


def assert_cos_sin_close(ours, ref, position_ids, inv_freq, scale):
    """fp32 1e-5, widened by the angle error a 1-ulp inv_freq difference makes at large positions
    (torch's SLEEF powf is within 1 ulp of the correctly rounded power used here)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    angle = position_ids[..., None].astype(np.float64) * np.concatenate([inv_freq, inv_freq])
    tol = 1e-5 * (np.abs(ref) + abs(scale)) + 2 * EPS32 * angle * abs(scale)
    err = np.abs(ours - ref)
    assert np.all(err <= tol), f"max err {err.max()}, worst excess {(err - tol).max()}"


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_matches_transformers_init_functions(name):
    cfg = case_config(name)
    seq_lens = [None, cfg.max_position_embeddings, 5 * cfg.max_position_embeddings] if name.startswith(
        ("dynamic", "longrope")) else [None]
    for seq_len in seq_lens:
        ours, att = rope_inv_freq(cfg, seq_len=seq_len)
        if cfg.rope_parameters["rope_type"] == "longrope" and seq_len is not None:
            # transformers' forward update asks for original_max + 1 once past the original context
            orig = cfg.rope_parameters["original_max_position_embeddings"]
            ref_seq = orig + 1 if seq_len > orig else None
            ref, ref_att = reference_init(cfg, ref_seq)
        elif cfg.rope_parameters["rope_type"] == "dynamic" and seq_len is not None:
            # forward passes max(position_ids) + 1 as a 0-dim int64 tensor
            ref, ref_att = reference_init(cfg, torch.tensor(seq_len))
        else:
            ref, ref_att = reference_init(cfg, seq_len)
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=3e-7, atol=0)
        assert att == pytest.approx(ref_att, rel=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_match_llama_rotary_embedding(name):
    cfg = case_config(name)
    rng = np.random.default_rng(0)
    for label, pos in position_batches(cfg, rng).items():
        module = LlamaRotaryEmbedding(case_config(name))  # fresh: dynamic RoPE is stateful
        x = torch.zeros(1, dtype=torch.float32)
        ref_cos, ref_sin = module(x, torch.tensor(pos))
        inv_freq, scale = rope_inv_freq(cfg, seq_len=int(pos.max()) + 1)
        # frequencies the module actually used for this batch (after dynamic/longrope updates)
        np.testing.assert_allclose(inv_freq, module.inv_freq.numpy(), rtol=3e-7, atol=0, err_msg=label)
        assert scale == pytest.approx(module.attention_scaling, rel=1e-12)
        # the cos/sin computation alone, given identical frequencies, is tight
        cos, sin = rope_cos_sin(module.inv_freq.numpy(), pos, module.attention_scaling)
        assert cos.shape == ref_cos.shape and cos.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), rtol=1e-5, atol=1e-6, err_msg=label)
        np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), rtol=1e-5, atol=1e-6, err_msg=label)
        # end to end
        cos, sin = rope_cos_sin(inv_freq, pos, scale)
        assert_cos_sin_close(cos, ref_cos.numpy(), pos, inv_freq, scale)
        assert_cos_sin_close(sin, ref_sin.numpy(), pos, inv_freq, scale)


def test_dynamic_ntk_below_and_above_max_position_embeddings():
    cfg = case_config("dynamic")
    max_pos = cfg.max_position_embeddings
    init_inv, _ = rope_inv_freq(cfg)
    # at or below max_position_embeddings: the init frequencies (== plain RoPE, since the rescale is 1)
    for seq_len in (1, max_pos // 2, max_pos):
        np.testing.assert_array_equal(rope_inv_freq(cfg, seq_len=seq_len)[0], init_inv)
    plain = 1.0 / 10000.0 ** (np.arange(0, 32, 2) / 32)
    np.testing.assert_allclose(init_inv, plain, rtol=1e-6)
    # above: recomputed with a larger base (lower frequencies), growing with seq_len
    prev = init_inv
    for seq_len in (max_pos + 1, 2 * max_pos, 10 * max_pos):
        inv, scale = rope_inv_freq(cfg, seq_len=seq_len)
        assert scale == 1.0 and inv[0] == prev[0] == 1.0 and np.all(inv[1:] < prev[1:])
        module = LlamaRotaryEmbedding(case_config("dynamic"))
        module(torch.zeros(1), torch.arange(seq_len)[None])
        np.testing.assert_allclose(inv, module.inv_freq.numpy(), rtol=3e-7, atol=0)
        # the python-int call of the init function (float64 base) agrees to float32 rounding
        np.testing.assert_allclose(inv, reference_init(cfg, seq_len)[0], rtol=1e-6)
        prev = inv


def test_longrope_switches_factor_past_original_context():
    cfg = case_config("longrope")
    orig = 64
    base = 10000.0 ** (np.arange(0, 32, 2) / 32)
    short, s_att = rope_inv_freq(cfg, seq_len=orig)
    long, l_att = rope_inv_freq(cfg, seq_len=orig + 1)
    np.testing.assert_array_equal(short, rope_inv_freq(cfg)[0])
    np.testing.assert_allclose(short, 1.0 / (np.array(SHORT16) * base), rtol=1e-6)
    np.testing.assert_allclose(long, 1.0 / (np.array(LONG16) * base), rtol=1e-6)
    # factor implied by max_position_embeddings / original (256 / 64), independent of seq_len
    assert s_att == l_att == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))


def test_llama31_real_values():
    """Llama-3.1: high frequencies untouched, low ones divided by 8, a smooth band in between."""
    cfg = case_config("llama31")
    inv, scale = rope_inv_freq(cfg)
    # The plain frequencies in float64 from the float32 exponents (exact): numpy's own float32 power is
    # machine dependent (SVML under AVX512_SKX: within 1 ulp, not correctly rounded), so it is no oracle.
    # What is compared is float32 1 / theta**e: torch's powf (within 1 ulp) then a rounded division
    # (1/2 ulp), i.e. at most 1.5 ulp of the value, and one ulp is <= EPS32 relative.
    plain = 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.int64).astype(np.float32) / np.float32(128)).astype(
        np.float64))
    wavelen = 2 * np.pi / plain
    assert scale == 1.0
    np.testing.assert_allclose(inv[wavelen < 8192 / 4], plain[wavelen < 8192 / 4], rtol=1.5 * EPS32, atol=0)
    np.testing.assert_allclose(inv[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)
    medium = (wavelen >= 2048) & (wavelen <= 8192)
    assert medium.any() and np.all(inv[medium] < plain[medium]) and np.all(inv[medium] > plain[medium] / 8)
    np.testing.assert_array_equal(inv, LlamaRotaryEmbedding(cfg).inv_freq.numpy())


def test_rope_parameters_v5_config():
    cfg = tiny_config(LLAMA31, head_dim=32, max_position_embeddings=131072)
    p = rope_parameters(cfg)
    assert {k: p[k] for k in LLAMA31} == LLAMA31
    assert p["head_dim"] == 32 and p["rotary_dim"] == 32 and p["max_position_embeddings"] == 131072
    assert p["partial_rotary_factor"] == 1.0
    # yarn without original_max_position_embeddings: transformers defaults it to max_position_embeddings
    p = rope_parameters(tiny_config({"rope_type": "yarn", "factor": 2.0}))
    assert p["original_max_position_embeddings"] == 256 and p["rope_theta"] == 10000.0
    # no rope settings at all -> plain RoPE with the default theta
    p = rope_parameters(LlamaConfig(hidden_size=64, num_attention_heads=4))
    assert p["rope_type"] == "default" and p["rope_theta"] == 10000.0 and p["head_dim"] == p["rotary_dim"] == 16
    # the config itself is not modified
    before = json.dumps(cfg.rope_parameters, sort_keys=True)
    rope_inv_freq(cfg, seq_len=10**6)
    assert json.dumps(cfg.rope_parameters, sort_keys=True) == before


LEGACY_BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32, hidden_size=64,
                   intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
LEGACY = {
    # Llama-3.1's config.json (rope_scaling + top-level rope_theta, explicit head_dim)
    "llama31": (dict(LEGACY_BASE, head_dim=32, max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
                dict(LLAMA31)),
    # transformers-4.3x era: "type" instead of "rope_type"
    "dynamic_type_key": (dict(LEGACY_BASE, max_position_embeddings=256, rope_theta=20000.0,
                              rope_scaling={"type": "dynamic", "factor": 2.0}),
                         {"rope_type": "dynamic", "rope_theta": 20000.0, "factor": 2.0}),
    "linear_type_key_no_theta": (dict(LEGACY_BASE, max_position_embeddings=256,
                                      rope_scaling={"type": "linear", "factor": 4.0}),
                                 {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": (dict(LEGACY_BASE, max_position_embeddings=256, rope_theta=10000.0,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32.0, "beta_slow": 1.0}),
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    # Phi-3 style: original_max_position_embeddings at the top level, no factor. transformers'
    # __init__ leaves rope_parameters["original_max_position_embeddings"] = max_position_embeddings,
    # but the rope init functions re-standardize and the top-level value wins (64, not 256).
    "longrope_top_level_original": (dict(LEGACY_BASE, head_dim=32, max_position_embeddings=256, rope_theta=10000.0,
                                         original_max_position_embeddings=64,
                                         rope_scaling={"type": "longrope", "short_factor": SHORT16,
                                                       "long_factor": LONG16}),
                                    {"rope_type": "longrope", "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("loader", ["auto_config_dir", "from_dict"])
@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_rope_scaling_configs_parse(name, loader, tmp_path):
    raw, expected = LEGACY[name]

    def load():
        if loader == "from_dict":
            return LlamaConfig.from_dict(json.loads(json.dumps(raw)))
        (tmp_path / "config.json").write_text(json.dumps(raw))
        return AutoConfig.from_pretrained(tmp_path)

    cfg = load()
    assert isinstance(cfg, LlamaConfig)
    p = rope_parameters(cfg)
    assert {k: p[k] for k in expected} == expected
    assert "type" not in p
    if "head_dim" in raw:
        assert p["head_dim"] == raw["head_dim"]

    # the oracle: a rotary module built from the same (freshly loaded) config, before and past
    # the original context
    rng = np.random.default_rng(1)
    for pos in (np.sort(rng.integers(0, 60, size=(1, 8))), np.array([[0, 5, 70, 200, 255]])):
        ours_cfg = load()
        inv, scale = rope_inv_freq(ours_cfg, seq_len=int(pos.max()) + 1)
        module = LlamaRotaryEmbedding(load())
        ref_cos, ref_sin = module(torch.zeros(1), torch.tensor(pos))
        np.testing.assert_allclose(inv, module.inv_freq.numpy(), rtol=3e-7, atol=0)
        assert scale == pytest.approx(module.attention_scaling, rel=1e-12)
        cos, sin = rope_cos_sin(inv, pos, scale)
        assert_cos_sin_close(cos, ref_cos.numpy(), pos, inv, scale)
        assert_cos_sin_close(sin, ref_sin.numpy(), pos, inv, scale)
    if name == "longrope_top_level_original":
        assert module.config.rope_parameters["original_max_position_embeddings"] == 64  # the quirk above


def test_pre_v5_style_config_object():
    """An object that only has rope_scaling / rope_theta / partial_rotary_factor attributes (v4 style)."""
    cfg = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=None, max_position_embeddings=256,
                                rope_theta=20000.0, partial_rotary_factor=0.5,
                                rope_scaling={"type": "linear", "factor": 2.0})
    p = rope_parameters(cfg)
    assert p["rope_type"] == "linear" and p["rope_theta"] == 20000.0 and p["head_dim"] == 16 and p["rotary_dim"] == 8
    ref = tiny_config({"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0, "partial_rotary_factor": 0.5})
    np.testing.assert_array_equal(rope_inv_freq(cfg)[0], reference_init(ref)[0])
    # rope_inv_freq also accepts the dict rope_parameters returns
    np.testing.assert_array_equal(rope_inv_freq(p)[0], rope_inv_freq(cfg)[0])


def test_per_layer_rope_parameters_need_layer_type():
    cfg = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=256,
                                layer_types=["full_attention", "sliding_attention"],
                                rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                                    "factor": 8.0},
                                                 "sliding_attention": {"rope_type": "default",
                                                                       "rope_theta": 10000.0}})
    with pytest.raises(ValueError, match="layer_type"):
        rope_parameters(cfg)
    full, _ = rope_inv_freq(cfg, layer_type="full_attention")
    sliding, _ = rope_inv_freq(cfg, layer_type="sliding_attention")
    np.testing.assert_allclose(full, 1.0 / (1e6 ** (np.arange(0, 32, 2) / 32)) / 8, rtol=1e-6)
    np.testing.assert_allclose(sliding, 1.0 / (1e4 ** (np.arange(0, 32, 2) / 32)), rtol=1e-6)


def test_default_partial_rotary_matches_phi3():
    cfg = tiny_config({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, head_dim=32)
    inv, _ = rope_inv_freq(cfg)
    assert inv.shape == (8,)
    np.testing.assert_array_equal(inv, reference_init(cfg)[0])


def test_unknown_rope_type_raises():
    cfg = tiny_config({"rope_type": "su-perb", "rope_theta": 10000.0})
    with pytest.raises(ValueError) as err:
        rope_inv_freq(cfg)
    message = str(err.value)
    assert "su-perb" in message and all(t in message for t in SUPPORTED_ROPE_TYPES)


@pytest.mark.parametrize("name", ["default", "yarn_mscale", "llama31"])
def test_apply_rotary_matches_transformers(name):
    cfg = case_config(name)
    rng = np.random.default_rng(2)
    b, h, s, d = 2, 3, 7, cfg.head_dim
    q = torch.tensor(rng.standard_normal((b, h, s, d)), dtype=torch.float32)
    k = torch.tensor(rng.standard_normal((b, h, s, d)), dtype=torch.float32)
    pos = np.sort(rng.integers(0, 5000, size=(b, s)), axis=-1)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, torch.tensor(pos))
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    jcos, jsin = jnp.asarray(cos.numpy()), jnp.asarray(sin.numpy())
    for x, ref in ((q, ref_q), (k, ref_k)):
        out = apply_rotary(jnp.asarray(x.numpy()).transpose(0, 2, 1, 3), jcos, jsin)
        np.testing.assert_allclose(np.asarray(out).transpose(0, 2, 1, 3), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_apply_rotary_partial_matches_phi3():
    """rotary_dim < head_dim: first rotary_dim channels rotated, the rest passed through."""
    cfg = case_config("yarn_partial")  # head_dim 64, rotary_dim 32
    rng = np.random.default_rng(3)
    b, h, s, d = 2, 3, 5, 64
    q = torch.tensor(rng.standard_normal((b, h, s, d)), dtype=torch.float32)
    k = torch.tensor(rng.standard_normal((b, h, s, d)), dtype=torch.float32)
    pos = rng.integers(0, 300, size=(b, s))
    inv, scale = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv, pos, scale)
    assert cos.shape == (b, s, 32)
    ref_q, ref_k = phi3_apply_rotary_pos_emb(q, k, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    for x, ref in ((q, ref_q), (k, ref_k)):
        out = np.asarray(apply_rotary(jnp.asarray(x.numpy()).transpose(0, 2, 1, 3), cos, sin)).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[..., 32:], x.numpy()[..., 32:])


def test_bf16_cos_sin_and_apply():
    cfg = case_config("llama31")
    rng = np.random.default_rng(4)
    pos = rng.integers(0, 3000, size=(2, 9))
    x = torch.tensor(rng.standard_normal((2, 4, 9, 128)), dtype=torch.bfloat16)
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(x, torch.tensor(pos))
    inv, scale = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv, pos, scale, dtype=jnp.bfloat16)
    assert cos.dtype == jnp.bfloat16 and sin.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(cos, np.float32), ref_cos.float().numpy(), rtol=2**-8, atol=2**-9)
    np.testing.assert_allclose(np.asarray(sin, np.float32), ref_sin.float().numpy(), rtol=2**-8, atol=2**-9)
    ref, _ = apply_rotary_pos_emb(x, x, ref_cos, ref_sin)
    out = apply_rotary(jnp.asarray(x.float().numpy(), jnp.bfloat16).transpose(0, 2, 1, 3),
                       jnp.asarray(ref_cos.float().numpy(), jnp.bfloat16), jnp.asarray(ref_sin.float().numpy(),
                                                                                         jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    # XLA may keep the f32 intermediate of x*cos + rot(x)*sin where torch rounds each op to bf16
    np.testing.assert_allclose(np.asarray(out, np.float32).transpose(0, 2, 1, 3), ref.float().numpy(),
                               rtol=2**-7, atol=2**-6)


def test_module_does_not_import_torch():
    code = "import sys; sys.modules['torch'] = None; import fastlora_jax.rope; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
