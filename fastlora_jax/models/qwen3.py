"""Qwen3: Llama's layer with per-head RMSNorms of q and k before rotary, an explicit `head_dim`, and
`attention_bias` on q/k/v and o. Sliding windows as Qwen2's (only with `use_sliding_window=True`)."""

from __future__ import annotations

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)

ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(hf_config) -> DecoderConfig:
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", False) else None
    bias = bool(getattr(hf_config, "attention_bias", False))
    return DecoderConfig(**common_fields(hf_config), hidden_act=hf_config.hidden_act, qkv_bias=bias, o_bias=bias,
                         qk_norm=True, sliding_window=window)
