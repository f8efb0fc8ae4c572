"""Llama (Llama 2, 3, 3.1, 3.2): the shared decoder's defaults; `attention_bias` covers q/k/v and o, `mlp_bias`
the MLP."""

from __future__ import annotations

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = ("llama",)  # config.json without `architectures`
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Config = DecoderConfig  # `llama.Config.from_hf(hf)`


def config(hf_config) -> DecoderConfig:
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    return DecoderConfig(**common_fields(hf_config), hidden_act=hf_config.hidden_act, qkv_bias=attention_bias,
                         o_bias=attention_bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))
