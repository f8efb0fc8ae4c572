"""Mistral: Llama's layer with an explicit `head_dim` and, where the config sets `sliding_window`, every layer
attending within it (transformers' `create_sliding_window_causal_mask`)."""

from __future__ import annotations

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)

ARCHITECTURES = ("MistralForCausalLM",)
MODEL_TYPES = ("mistral",)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(hf_config) -> DecoderConfig:
    window = getattr(hf_config, "sliding_window", None)
    fields = common_fields(hf_config)
    fields["layer_types"] = ("sliding_attention",) * fields["num_layers"] if window is not None else ()
    return DecoderConfig(**fields, hidden_act=hf_config.hidden_act, sliding_window=window)
