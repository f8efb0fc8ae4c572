"""Gemma 3 (text, `Gemma3ForCausalLM`): Gemma 2's layer with (1 + w) RMSNorms of q and k before rotary, local
(`sliding_attention`) and global (`full_attention`) layers by `layer_types`, each type with its own rotary
base and scaling (`rope_parameters[layer_type]` in transformers 5.17), and soft-caps only where the config
sets them (Gemma 3 normally sets none).

Not supported: `use_bidirectional_attention=True` (an encoder-style variant)."""

from __future__ import annotations

import math

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)
from fastlora_jax.models.gemma2 import _cap

ARCHITECTURES = ("Gemma3ForCausalLM",)
MODEL_TYPES = ("gemma3_text",)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(hf_config) -> DecoderConfig:
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise NotImplementedError("use_bidirectional_attention=True is not supported for Gemma3ForCausalLM; "
                                  "supported: False (causal)")
    bias = bool(getattr(hf_config, "attention_bias", False))
    fields = common_fields(hf_config)
    return DecoderConfig(
        **fields, hidden_act=hf_config.hidden_activation, qkv_bias=bias, o_bias=bias, norm_offset=1.0,
        qk_norm=True, sandwich_norms=True, embed_scale=math.sqrt(hf_config.hidden_size),
        query_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
        attn_logit_softcap=_cap(getattr(hf_config, "attn_logit_softcapping", None)),
        final_logit_softcap=_cap(getattr(hf_config, "final_logit_softcapping", None)),
        sliding_window=getattr(hf_config, "sliding_window", None),
        rope_layer_types=tuple(sorted(set(fields["layer_types"]))))
