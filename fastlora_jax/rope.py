"""Rotary position embeddings (RoPE) computed exactly as transformers 5.17 does, without torch.

Fine-tuning a Hugging Face checkpoint in JAX only reproduces the reference model if the rotary
frequencies match bit-for-bit (or within an ulp): a scaled-RoPE model (Llama-3.1 "llama3", YaRN,
LongRoPE, dynamic NTK, ...) silently degrades when its frequencies are computed the textbook way
instead of the way transformers computes them. This module therefore mirrors
``transformers/modeling_rope_utils.py`` (``ROPE_INIT_FUNCTIONS``, ``dynamic_rope_update``) and
``LlamaRotaryEmbedding`` / ``apply_rotary_pos_emb`` from ``modeling_llama.py``, reproducing the
float32 rounding of each torch op in numpy.  torch is deliberately not imported.

Public API:

* :func:`rope_parameters` -- standardized rope settings read from a (parsed) HF config.
* :func:`rope_inv_freq` -- ``(inv_freq float32 [rotary_dim // 2], attention_scaling)``.
* :func:`rope_cos_sin` -- ``(cos, sin)`` of shape ``[batch, seq, rotary_dim]`` in jax.numpy.
* :func:`apply_rotary` -- rotate ``x`` laid out ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "apply_rotary",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_parameters",
]

#: rope types accepted by :func:`rope_inv_freq` (the keys of transformers' ``ROPE_INIT_FUNCTIONS``
#: plus "default").
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")

# transformers moves/defaults `original_max_position_embeddings` into the rope dict for these types.
_TYPES_WITH_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
# Keys added by `rope_parameters` on top of the HF rope dict; they are derived from the model config.
_DERIVED_KEYS = ("head_dim", "rotary_dim", "max_position_embeddings")

_F32 = np.float32
_ONE = np.float32(1.0)


# --------------------------------------------------------------------------------------------------
# Reading the config
# --------------------------------------------------------------------------------------------------


def _check_rope_type(rope_type: str) -> None:
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope_type {rope_type!r}; supported rope types are: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict:
    """Return the standardized rope settings of a transformers config as a plain dict.

    Replays transformers' ``RotaryEmbeddingConfigMixin.standardize_rope_params`` (which the rope
    init functions call again at model-construction time, so its result is what the model really
    uses) on a copy, without mutating ``hf_config``:

    * v5 configs hold ``config.rope_parameters``; legacy ``config.json`` files used ``rope_scaling``
      (+ top-level ``rope_theta``), which transformers folds into ``rope_parameters`` on load.
      Both are accepted, as is a pre-v5 config object that still has ``rope_scaling``/``rope_theta``.
    * legacy ``"type"`` key -> ``"rope_type"`` (default ``"default"``).
    * ``rope_theta`` falls back to ``config.rope_theta`` then ``config.default_theta`` (10000).
    * ``partial_rotary_factor`` falls back to ``config.partial_rotary_factor`` then 1.0.
    * for llama3/yarn/longrope, a top-level ``config.original_max_position_embeddings`` (Phi-3
      style) *overrides* the dict value; otherwise it defaults to ``max_position_embeddings``.

    Per-layer rope dicts (e.g. ``{"full_attention": {...}, "sliding_attention": {...}}``) need
    ``layer_type``.  The returned dict also carries the derived ``head_dim`` (``config.head_dim``
    when set, else ``hidden_size // num_attention_heads``), ``rotary_dim``
    (``int(head_dim * partial_rotary_factor)``) and ``max_position_embeddings``.
    """
    raw = getattr(hf_config, "rope_parameters", None)
    if not raw:
        raw = getattr(hf_config, "rope_scaling", None)
    raw = copy.deepcopy(dict(raw)) if raw else {}

    layer_types = getattr(hf_config, "_rope_type_labels", None) or getattr(hf_config, "layer_types", None)
    if layer_type is not None:
        if layer_type not in raw:
            raise ValueError(f"layer_type {layer_type!r} not found in rope parameters (keys: {sorted(raw)}).")
        raw = copy.deepcopy(dict(raw[layer_type] or {}))
    elif layer_types is not None and raw and not set(raw).isdisjoint(layer_types):
        raise ValueError(
            f"This config has per-layer rope parameters {sorted(raw)}; pass layer_type= to pick one."
        )

    params = dict(raw)
    legacy_type = params.pop("type", None)
    rope_type = params.get("rope_type") or legacy_type or "default"
    default_rope_type = getattr(hf_config, "default_rope_type", "default")
    if rope_type == "default" and default_rope_type != "default":
        rope_type = default_rope_type
    params["rope_type"] = rope_type

    if params.get("rope_theta") is None:
        theta = getattr(hf_config, "rope_theta", None)
        params["rope_theta"] = theta if theta is not None else getattr(hf_config, "default_theta", 10000.0)

    if params.get("partial_rotary_factor") is None:
        prf = getattr(hf_config, "partial_rotary_factor", None)
        params["partial_rotary_factor"] = 1.0 if prf is None else prf

    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if rope_type in _TYPES_WITH_ORIGINAL_MAX:
        top_level = getattr(hf_config, "original_max_position_embeddings", None)
        if top_level is not None:
            params["original_max_position_embeddings"] = top_level
        elif params.get("original_max_position_embeddings") is None:
            params["original_max_position_embeddings"] = max_pos

    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    params["head_dim"] = int(head_dim)
    params["rotary_dim"] = int(head_dim * params["partial_rotary_factor"])
    params["max_position_embeddings"] = max_pos
    if rope_type == "proportional":  # proportional RoPE always covers the whole head (nope part has freq 0)
        params["rotary_dim"] = int(head_dim) // 2 * 2
    return params


def _as_params(config_or_params: Any, layer_type: str | None) -> dict:
    if isinstance(config_or_params, Mapping) and all(k in config_or_params for k in ("rope_type", *_DERIVED_KEYS)):
        return dict(config_or_params)
    return rope_parameters(config_or_params, layer_type=layer_type)


# --------------------------------------------------------------------------------------------------
# float32 helpers reproducing torch's rounding
# --------------------------------------------------------------------------------------------------


def _pow(base, exponent) -> np.ndarray:
    """float32 ``base ** exponent`` as torch computes it for float32 tensors.

    torch casts a python-scalar base to float32; the power itself is evaluated in float64 and
    rounded once (correctly rounded; torch's SLEEF ``powf`` is within 1 ulp of this).
    """
    b = np.asarray(base, dtype=np.float32).astype(np.float64)
    e = np.asarray(exponent, dtype=np.float32).astype(np.float64)
    return np.power(b, e).astype(np.float32)


def _rdiv(scalar, x: np.ndarray) -> np.ndarray:
    """``scalar / tensor``: torch's ``Tensor.__rtruediv__`` is ``tensor.reciprocal() * scalar``
    (two roundings, not one division)."""
    return (_ONE / x) * _F32(scalar)


def _exponents(dim: int, denom: int | None = None, stop: int | None = None) -> np.ndarray:
    """``torch.arange(0, stop, 2).float() / denom`` in float32."""
    stop = dim if stop is None else stop
    denom = dim if denom is None else denom
    return np.arange(0, stop, 2, dtype=np.int64).astype(np.float32) / _F32(denom)


def _plain_inv_freq(base, dim: int) -> np.ndarray:
    return _ONE / _pow(base, _exponents(dim))


# --------------------------------------------------------------------------------------------------
# One function per rope type (each mirrors the transformers function named in its docstring)
# --------------------------------------------------------------------------------------------------


def _default(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``compute_default_rope_parameters`` (Phi3-style: honours partial_rotary_factor; Llama's own
    copy ignores it, see module notes in :func:`rope_inv_freq`)."""
    return _plain_inv_freq(p["rope_theta"], p["rotary_dim"]), 1.0


def _linear(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``_compute_linear_scaling_rope_parameters``: position interpolation == inv_freq / factor."""
    return _plain_inv_freq(p["rope_theta"], p["rotary_dim"]) / _F32(p["factor"]), 1.0


def _dynamic(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``_compute_dynamic_ntk_parameters`` as driven by ``dynamic_rope_update``.

    At construction (``seq_len`` None or <= ``max_position_embeddings``) transformers calls it with
    ``seq_len=None`` and the new base is computed with python floats.  During forward, when
    ``max(position_ids) + 1 > max_position_embeddings``, it is called with ``seq_len`` as a 0-dim
    int64 *tensor*, so the base rescaling is done in float32 (except the 0-dim ``**`` which torch
    evaluates in double) -- reproduced here.
    """
    base, dim, factor = p["rope_theta"], p["rotary_dim"], p["factor"]
    max_pos = p["max_position_embeddings"]
    if seq_len is None or seq_len <= max_pos:
        base = base * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _plain_inv_freq(base, dim), 1.0
    t = _F32(factor) * _F32(int(seq_len))
    t = t / _F32(max_pos)
    t = t - _F32(factor - 1)
    t = _F32(np.power(np.float64(t), dim / (dim - 2)))
    new_base = _F32(base) * t
    return _ONE / _pow(new_base, _exponents(dim)), 1.0


def _yarn(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``_compute_yarn_parameters`` (all options: factor, attention_factor, mscale, mscale_all_dim,
    beta_fast, beta_slow, truncate, original_max_position_embeddings)."""
    base, dim = p["rope_theta"], p["rotary_dim"]
    factor = p.get("factor")
    attention_factor = p.get("attention_factor")
    mscale = p.get("mscale")
    mscale_all_dim = p.get("mscale_all_dim")
    original_max = p["original_max_position_embeddings"]
    if factor is None:  # DeepSeek-V3 style: factor implied by the two context lengths
        factor = p["max_position_embeddings"] / original_max

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)

    # transformers uses `or`, so 0 / None both fall back to the paper's defaults
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def find_correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = find_correction_dim(beta_fast)
    high = find_correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' singularity guard
    ramp = (np.arange(dim // 2, dtype=np.float32) - _F32(low)) / _F32(high - low)
    ramp = np.clip(ramp, _F32(0), _F32(1))

    pos_freqs = _pow(base, _exponents(dim))
    inv_freq_extrapolation = _ONE / pos_freqs
    inv_freq_interpolation = _ONE / (_F32(factor) * pos_freqs)
    extrapolation_factor = _ONE - ramp
    inv_freq = (
        inv_freq_interpolation * (_ONE - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``_compute_longrope_parameters`` + ``longrope_frequency_update``: ``long_factor`` once
    ``seq_len`` (max position + 1) exceeds ``original_max_position_embeddings``, else
    ``short_factor``.  The attention factor never depends on seq_len."""
    base, dim = p["rope_theta"], p["rotary_dim"]
    original_max = p["original_max_position_embeddings"]
    factor = p.get("factor")
    attention_factor = p.get("attention_factor")
    if factor is None:  # Phi-3 style: factor implied by the two context lengths
        factor = p["max_position_embeddings"] / original_max
    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original_max))
    use_long = bool(seq_len) and seq_len > original_max
    ext = np.asarray(p["long_factor"] if use_long else p["short_factor"], dtype=np.float32)
    if ext.shape != (dim // 2,):
        raise ValueError(
            f"longrope {'long' if use_long else 'short'}_factor has {ext.size} entries, expected rotary_dim/2 = {dim // 2}."
        )
    inv_freq = _ONE / (ext * _pow(base, _exponents(dim)))
    return inv_freq, float(attention_factor)


def _llama3(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``_compute_llama3_parameters`` (Llama 3.1/3.2/3.3): low frequencies divided by ``factor``,
    high ones kept, a smooth blend in between."""
    inv_freq = _plain_inv_freq(p["rope_theta"], p["rotary_dim"])
    factor = p["factor"]
    low_freq_factor = p["low_freq_factor"]
    high_freq_factor = p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]

    low_freq_wavelen = _F32(old_context_len / low_freq_factor)
    high_freq_wavelen = _F32(old_context_len / high_freq_factor)
    wavelen = _rdiv(2 * math.pi, inv_freq)
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / _F32(factor), inv_freq)
    smooth = (_rdiv(old_context_len, wavelen) - _F32(low_freq_factor)) / _F32(high_freq_factor - low_freq_factor)
    smoothed = (_ONE - smooth) * inv_freq_llama / _F32(factor) + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32), 1.0


def _proportional(p: dict, seq_len) -> tuple[np.ndarray, float]:
    """``_compute_proportional_rope_parameters`` (Gemma-4 style): exponents over the full head_dim,
    zero frequency for the non-rotated tail, so inv_freq always has head_dim // 2 entries."""
    head_dim = p["head_dim"]
    rope_angles = int(p.get("partial_rotary_factor", 1.0) * head_dim // 2)
    rotated = _ONE / _pow(p["rope_theta"], _exponents(head_dim, denom=head_dim, stop=2 * rope_angles))
    inv_freq = np.concatenate([rotated, np.zeros(head_dim // 2 - rope_angles, dtype=np.float32)])
    return inv_freq / _F32(p.get("factor", 1.0)), 1.0


_INIT_FUNCTIONS = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
    "proportional": _proportional,
}


def rope_inv_freq(hf_config: Any, seq_len: int | None = None, *, layer_type: str | None = None):
    """Inverse frequencies and attention scaling exactly as transformers' rotary embedding uses them.

    ``hf_config`` is a transformers config (or a dict from :func:`rope_parameters`).  ``seq_len`` is
    ``max(position_ids) + 1`` of the batch being embedded, which is what transformers'
    ``dynamic_rope_update`` looks at: it selects LongRoPE's long/short factors and triggers the
    dynamic-NTK recomputation (only when it exceeds ``max_position_embeddings``).  Other types
    ignore it.

    Returns ``(inv_freq, attention_scaling)``: float32 ``[rotary_dim // 2]`` and a python float.

    Notes: transformers' ``LlamaRotaryEmbedding`` is stateful for "dynamic" (it keeps the largest
    frequencies grown so far until a batch falls back under the original length); this function is
    stateless and equals a freshly built module.  Llama's own default init ignores
    ``partial_rotary_factor`` while every other init function (and Phi3/NeoX-style models) honours
    it; here it is always honoured.
    """
    p = _as_params(hf_config, layer_type)
    rope_type = p["rope_type"]
    _check_rope_type(rope_type)
    inv_freq, attention_scaling = _INIT_FUNCTIONS[rope_type](p, seq_len)
    return np.ascontiguousarray(inv_freq, dtype=np.float32), float(attention_scaling)


# --------------------------------------------------------------------------------------------------
# cos/sin tables and application (jax)
# --------------------------------------------------------------------------------------------------


def rope_cos_sin(inv_freq, position_ids, attention_scaling: float = 1.0, dtype=jnp.float32):
    """``LlamaRotaryEmbedding.forward``: ``(cos, sin)`` of shape ``[batch, seq, rotary_dim]``.

    freqs = position * inv_freq in float32 (the torch matmul has K=1, i.e. one exact-order
    product), emb = concat(freqs, freqs), cos/sin scaled by ``attention_scaling`` in float32, then
    cast to ``dtype`` (transformers casts to the activations' dtype).  ``position_ids`` may also be
    1-D ``[seq]``, giving ``[1, seq, rotary_dim]``.
    """
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 1:
        position_ids = position_ids[None, :]
    inv_freq = jnp.asarray(inv_freq, dtype=jnp.float32)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = jnp.float32(attention_scaling)
    cos = jnp.cos(emb) * scale
    sin = jnp.sin(emb) * scale
    return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_bshd, cos, sin):
    """``apply_rotary_pos_emb`` for ``x`` laid out ``[batch, seq, heads, head_dim]``.

    ``cos``/``sin`` are ``[batch, seq, rotary_dim]`` (or ``[seq, rotary_dim]``) and are broadcast
    over heads.  When ``rotary_dim < head_dim`` (partial rotary), only the first ``rotary_dim``
    channels are rotated and the rest pass through, as in transformers' Phi3/NeoX-style models.
    Arithmetic follows normal dtype promotion, as in torch.
    """
    cos = jnp.asarray(cos)[..., None, :]
    sin = jnp.asarray(sin)[..., None, :]
    rotary_dim = cos.shape[-1]
    head_dim = x_bshd.shape[-1]
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} exceeds head_dim {head_dim}.")
    if rotary_dim == head_dim:
        return x_bshd * cos + _rotate_half(x_bshd) * sin
    x_rot, x_pass = x_bshd[..., :rotary_dim], x_bshd[..., rotary_dim:]
    rotated = x_rot * cos + _rotate_half(x_rot) * sin
    return jnp.concatenate([rotated, x_pass.astype(rotated.dtype)], axis=-1)
