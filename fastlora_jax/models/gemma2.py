"""Gemma 2: (1 + w) RMSNorms, four per layer; embeddings times sqrt(hidden) in the compute dtype; GeGLU with
tanh gelu (`hidden_activation`); queries scaled by `query_pre_attn_scalar ** -0.5`; attention-logit and
final-logit soft-capping; a sliding window on the layers `layer_types` marks (every other one); a tied head.

Oracle note: transformers' sdpa attention silently drops the attention soft-cap; compare against
`attn_implementation="eager"`."""

from __future__ import annotations

import math

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)

ARCHITECTURES = ("Gemma2ForCausalLM",)
MODEL_TYPES = ("gemma2",)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(hf_config) -> DecoderConfig:
    bias = bool(getattr(hf_config, "attention_bias", False))
    return DecoderConfig(
        **common_fields(hf_config), hidden_act=hf_config.hidden_activation, qkv_bias=bias, o_bias=bias,
        norm_offset=1.0, sandwich_norms=True, embed_scale=math.sqrt(hf_config.hidden_size),
        query_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
        attn_logit_softcap=_cap(getattr(hf_config, "attn_logit_softcapping", None)),
        final_logit_softcap=_cap(getattr(hf_config, "final_logit_softcapping", None)),
        sliding_window=getattr(hf_config, "sliding_window", None))


def _cap(value):
    return None if value is None else float(value)
