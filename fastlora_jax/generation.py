"""Text generation with a KV cache, LoRA applied unmerged (the adapter's branch is computed at every step).

`generate` follows Hugging Face's `generate` for decoder-only models: left-padded batches, position ids from
the attention mask (`cumsum - 1`, 0 on padding, then +1 per new token), greedy or sampling with the
temperature -> top-k -> top-p logits warpers in that order, and per-row stopping at eos with `pad_token_id`
written afterwards; generation ends early once every row has finished.

One jitted prefill (the whole prompt in one call) and one jitted decode step (one token), compiled once per
model config, dtype and shape (sampling settings are traced values, not compile-time constants); the cache
length is `prompt_len + max_new_tokens` rounded up to `CACHE_MULTIPLE`, so the decode step compiles at most
once per call and later calls whose lengths fall in the same bucket reuse it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.lora import combine
from fastlora_jax.model import as_batch
from fastlora_jax.validate import check_generate_args, check_positions, check_prompt_not_empty, check_token_ids

CACHE_MULTIPLE = 64


@dataclass
class GenerateOutput:
    """`generate(..., return_dict=True)`: the ids and the raw logits (fp32, before any warper) that each
    new token was chosen from, `[batch, new_tokens, vocab]`, as HF's `output_logits`."""

    sequences: np.ndarray
    logits: np.ndarray


# ------------------------------------------------------------------------------------------- sampling


def process_logits(logits_bv, temperature=1.0, top_k=0, top_p=1.0):
    """HF's sampling warpers in HF's order: `TemperatureLogitsWarper`, `TopKLogitsWarper` (off when top_k == 0),
    `TopPLogitsWarper` (off when top_p >= 1), with min_tokens_to_keep=1; removed tokens get -inf.

    All three settings may be traced values, so one compiled step serves every sampling configuration.
    """
    logits = jnp.asarray(logits_bv, jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def keep_top_k(x):  # remove every token below the k-th largest (ties with it stay), as TopKLogitsWarper
        descending = -jnp.sort(-x, axis=-1)
        kth = jax.lax.dynamic_slice_in_dim(descending, jnp.clip(top_k, 1, vocab) - 1, 1, axis=-1)
        return jnp.where(x < kth, -jnp.inf, x)

    def keep_top_p(x):  # TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p
        order = jnp.argsort(x, axis=-1)  # ascending, as HF's torch.sort(descending=False)
        cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)  # keep at least one token
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        return jnp.where(remove, -jnp.inf, x)

    logits = jax.lax.cond(top_k > 0, keep_top_k, lambda x: x, logits)
    return jax.lax.cond(top_p < 1.0, keep_top_p, lambda x: x, logits)


def _choose(logits_bv, key, do_sample, temperature, top_k, top_p):
    """The next token per row: argmax, or a sample from the warped logits when `do_sample` (traced)."""
    logits_bv = logits_bv.astype(jnp.float32)

    def sample(x):
        return jax.random.categorical(key, process_logits(x, temperature, top_k, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(do_sample, sample, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits_bv)


def _finish(next_b, finished_b, eos_ids, pad_id):
    """HF: finished rows get the pad token; a row finishes when it emits an eos token."""
    next_b = jnp.where(finished_b, pad_id, next_b)
    hit = (next_b[:, None] == eos_ids[None, :]).any(axis=-1)
    return next_b, finished_b | hit


# ------------------------------------------------------------------------------------------- jitted steps

STATIC = ("family", "cfg", "compute_dtype", "options")


def _cos_sin(family, cfg, inv_freq, rope_scale, positions):
    """Rotary tables of positions `[batch, seq]` (or a vision family's `[3, batch, seq]` multimodal ones)."""
    return family.position_cos_sin(cfg, inv_freq, rope_scale, positions)


def _prefill(base, lora, meta, cache, ids_bs, positions_bs, mask_bL, inv_freq, rope_scale, key, sampling, eos_ids,
             pad_id, vision=None, step=0, finished_b=None, *, family, cfg, compute_dtype, options):
    """The whole prompt in one call; `vision` (a vision family's image inputs, `generation_inputs`') enters here.

    Also the recomputation of the whole cache at step `step` (the prompt and the tokens so far, `finished_b`
    the rows that had already finished) when the rotary tables changed (see `generate`)."""
    params = combine(base, lora, meta)
    cos, sin = _cos_sin(family, cfg, inv_freq, rope_scale, positions_bs)
    images = {} if vision is None else {"vision": vision}
    logits, cache = family.forward_cached(cfg, params, ids_bs, cos, sin, cache, 0, mask_bL, compute_dtype,
                                          last_only=True, options=options, **images)
    logits_bv = logits[:, -1].astype(jnp.float32)
    next_b = _choose(logits_bv, jax.random.fold_in(key, step), *sampling)
    if finished_b is None:
        finished_b = jnp.zeros(next_b.shape, bool)
    next_b, finished_b = _finish(next_b, finished_b, eos_ids, pad_id)
    return next_b, cache, finished_b, logits_bv


def _decode(base, lora, meta, cache, mask_bL, token_b, last_position_b, prompt_len, step, finished_b, inv_freq,
            rope_scale, key, sampling, eos_ids, pad_id, *, family, cfg, compute_dtype, options):
    """Step `step` (1, 2, ...): feed the token chosen at step - 1, at slot prompt_len + step - 1 and position
    (the prompt's last position) + step, and choose the next one."""
    params = combine(base, lora, meta)
    batch = token_b.shape[0]
    index = prompt_len + step - 1
    position_b = last_position_b + step
    mask_bL = jax.lax.dynamic_update_slice(mask_bL, jnp.ones((batch, 1), mask_bL.dtype),
                                           (jnp.zeros((), jnp.int32), index))
    cos, sin = _cos_sin(family, cfg, inv_freq, rope_scale, position_b[:, None])
    logits, cache = family.forward_cached(cfg, params, token_b[:, None], cos, sin, cache, index, mask_bL,
                                          compute_dtype, options=options)
    logits_bv = logits[:, -1].astype(jnp.float32)
    next_b = _choose(logits_bv, jax.random.fold_in(key, step), *sampling)
    next_b, finished_b = _finish(next_b, finished_b, eos_ids, pad_id)
    return next_b, cache, mask_bL, finished_b, logits_bv


@cache
def jitted_steps():
    """`(prefill, decode)`, jitted once per process; the cache buffers are donated where the backend can."""
    donate = jax.default_backend() != "cpu"
    prefill = jax.jit(_prefill, static_argnames=STATIC, donate_argnames=("cache",) if donate else ())
    decode = jax.jit(_decode, static_argnames=STATIC, donate_argnames=("cache", "mask_bL") if donate else ())
    return prefill, decode


# ------------------------------------------------------------------------------------------- generate


def _token_list(value) -> list[int]:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _config_token(config, name: str):
    """A special token id from the config, or from its `text_config` (vision-language configs keep them there)."""
    value = getattr(config, name, None)
    if value is None:
        value = getattr(getattr(config, "text_config", None), name, None)
    return value


def _rope_tables(model, seq_len: int):
    inv_freq, scaling = model.family.rope_tables(model.config, model.cfg, seq_len)
    return jnp.asarray(inv_freq), jnp.asarray(scaling, jnp.float32)


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool | None = None,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id=None,
             seed: int = 0, return_dict: bool = False, **image_inputs):
    """Generate up to `max_new_tokens` tokens after each (left-padded) prompt.

    Returns int32 numpy ids `[batch, prompt_len + new]` (new < max_new_tokens when every row stopped at eos
    earlier), or a `GenerateOutput` with the logits too when `return_dict=True`.

    - `attention_mask`: 1 on tokens, 0 on (left) padding. Missing: derived from `pad_token_id` as HF does
      (ids != pad when the pad token occurs and is not an eos token), else all ones.
    - Greedy when `do_sample` is False or `temperature == 0`. `do_sample=None` samples when a warper is set
      (temperature != 1, top_k > 0 or top_p < 1) and is greedy otherwise; `do_sample=True` samples.
    - `eos_token_id` (int or list; default: the model config's) ends a row; later tokens of that row are
      `pad_token_id` (default: the config's pad token, else the first eos, else 0).
    - `seed` makes sampling reproducible (the same seed, inputs and settings give the same ids).
    - `**image_inputs`: a vision-language model's image inputs as its processor makes them (the family's
      `IMAGE_INPUTS`: Qwen-VL's `pixel_values`, `image_grid_thw`, `mm_token_type_ids`; Mllama's `pixel_values`,
      `aspect_ratio_ids`, `aspect_ratio_mask`, `cross_attention_mask`): the images enter at prefill; the prompt's
      positions are the family's (`generation_inputs`: multimodal ones for Qwen-VL) and new tokens continue from
      the prompt's largest position (transformers' `rope_deltas`). Mllama's cross-attention keys and values of
      the images are computed at prefill and kept in the cache.
    """
    check_prompt_not_empty(input_ids)
    ids = as_batch(input_ids, "input_ids")
    batch, prompt_len = ids.shape
    if prompt_len == 0:
        raise ValueError("input_ids is empty: generate needs at least one prompt token per row")
    check_generate_args(max_new_tokens, do_sample, temperature, top_p, top_k, seed, return_dict)
    check_token_ids(eos_token_id, pad_token_id, model.cfg.vocab_size)
    check_positions(prompt_len, max_new_tokens, _config_token(model.config, "max_position_embeddings"))

    rows = getattr(model.cfg, "embedding_rows", model.cfg.vocab_size)  # Mllama's image token is row vocab_size
    if ids.min() < 0 or ids.max() >= rows:
        raise ValueError(f"input_ids must be in [0, {rows}); got values in [{ids.min()}, {ids.max()}]")

    config = model.config
    eos = _token_list(_config_token(config, "eos_token_id") if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = _config_token(config, "pad_token_id")
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    pad_token_id = int(pad_token_id)

    if attention_mask is None:
        mask = np.ones_like(ids)
        if pad_token_id not in eos and (ids == pad_token_id).any():
            mask = (ids != pad_token_id).astype(np.int32)
    else:
        mask = as_batch(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; input_ids has {ids.shape}")
        mask = (mask != 0).astype(np.int32)
    if not mask[:, -1].all():
        warnings.warn("a prompt ends in padding (attention_mask[:, -1] == 0): decoder-only generation needs "
                      "left padding (tokenizer.padding_side = 'left')", stacklevel=2)

    if max_new_tokens == 0:
        return GenerateOutput(ids, np.zeros((batch, 0, model.cfg.vocab_size), np.float32)) if return_dict else ids

    greedy = temperature == 0 or do_sample is False or (
        do_sample is None and temperature == 1.0 and top_k == 0 and top_p >= 1.0)
    statics = dict(family=model.family, cfg=model.cfg, compute_dtype=model.dtype, options=model.kernel_options)
    # (do_sample, temperature, top_k, top_p) are traced: no recompilation when they change
    sampling = (jnp.bool_(not greedy), jnp.float32(temperature if temperature > 0 else 1.0), jnp.int32(top_k),
                jnp.float32(top_p))
    # eos ids padded with -1 (never a token) to a multiple of 8 entries, so the eos list is no compile-time shape
    eos_a = np.full(max(8, -(-len(eos) // 8) * 8), -1, np.int32)
    eos_a[:len(eos)] = eos
    eos_a = jnp.asarray(eos_a)
    pad_a = jnp.int32(pad_token_id)
    key = jax.random.key(seed)

    # the family's positions of the prompt (HF's: cumsum of the mask - 1, 0 on padding; Qwen-VL's multimodal
    # [3, batch, seq]) and its images; each new token is a row's last position + 1, + 2, ...
    allowed = getattr(model.family, "IMAGE_INPUTS", ())
    unknown = sorted(set(image_inputs) - set(allowed))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}" + (
            f"; this model's image inputs are {list(allowed)}" if allowed else
            " (image inputs need a vision-language model: FastVisionModel.from_pretrained)"))
    positions, vision, last_position = model.family.generation_inputs(
        model.cfg, ids, mask, **{k: v for k, v in image_inputs.items() if v is not None})
    last_host = np.asarray(last_position)
    max_len = -(-(prompt_len + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    mask_full = np.zeros((batch, max_len), np.int32)
    mask_full[:, :prompt_len] = mask
    lora = model.lora_params
    meta = model.lora_meta if lora is not None else None
    kv = model.family.init_cache(model.cfg, batch, max_len, model.dtype)

    dynamic_rope = model.family.rope_is_dynamic(config, model.cfg)
    recompute_on_change = dynamic_rope and model.family.rope_invalidates_cache(config, model.cfg)
    inv_freq, rope_scale = _rope_tables(model, int(positions.max()) + 1)

    prefill, decode = jitted_steps()
    token, kv, finished, logits = prefill(
        model.base_params, lora, meta, kv, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask_full),
        inv_freq, rope_scale, key, sampling, eos_a, pad_a, vision, **statics)
    tokens, all_logits = [token], [logits] if return_dict else None
    last_position = jnp.asarray(last_position)
    prompt_len_a = jnp.int32(prompt_len)
    mask_full = jnp.asarray(mask_full)
    for step in range(1, max_new_tokens):
        changed = False
        if dynamic_rope:  # HF recomputes inv_freq from this step's longest position, as rotary_cos_sin does
            new_freq, new_scale = _rope_tables(model, int(last_host.max()) + step + 1)
            changed = not (np.array_equal(new_freq, inv_freq) and np.array_equal(new_scale, rope_scale))
            inv_freq, rope_scale = new_freq, new_scale
        if changed and recompute_on_change:
            # LongRoPE's switch to its long factors: the cached keys were rotated with the short ones, so the
            # whole cache is recomputed with the new tables (transformers' Phi-3 drops its cache there too)
            seq = np.concatenate([ids] + [np.asarray(t)[:, None] for t in tokens], axis=1)
            seq_positions = np.concatenate([positions, last_host[:, None] + np.arange(1, step + 1)], axis=1)
            mask_full = mask_full.at[:, prompt_len + step - 1].set(1)
            token, kv, next_finished, logits = prefill(
                model.base_params, lora, meta, kv, jnp.asarray(seq), jnp.asarray(seq_positions.astype(np.int32)),
                mask_full, inv_freq, rope_scale, key, sampling, eos_a, pad_a, None, jnp.int32(step), finished,
                **statics)
        else:
            token, kv, mask_full, next_finished, logits = decode(
                model.base_params, lora, meta, kv, mask_full, token, last_position, prompt_len_a, jnp.int32(step),
                finished, inv_freq, rope_scale, key, sampling, eos_a, pad_a, **statics)
        # the previous step's flags are read while this step runs; if every row had already finished, this
        # step's tokens (all padding) are dropped and generation ends, as HF's does
        if bool(finished.all()):
            break
        finished = next_finished
        tokens.append(token)
        if return_dict:
            all_logits.append(logits)

    new = np.stack([np.asarray(t) for t in tokens], axis=1).astype(np.int32)
    sequences = np.concatenate([ids, new], axis=1)
    if return_dict:
        return GenerateOutput(sequences, np.stack([np.asarray(x) for x in all_logits], axis=1))
    return sequences
