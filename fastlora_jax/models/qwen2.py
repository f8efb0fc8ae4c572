"""Qwen2 / Qwen2.5: Llama's layer with q/k/v biases (o_proj has none). A sliding window applies only with
`use_sliding_window=True`, on the layers `layer_types` marks (transformers 5.17 derives them from
`max_window_layers` and sets `sliding_window` to None otherwise)."""

from __future__ import annotations

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)

ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = ("qwen2",)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(hf_config) -> DecoderConfig:
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", False) else None
    return DecoderConfig(**common_fields(hf_config), hidden_act=hf_config.hidden_act, qkv_bias=True,
                         sliding_window=window)
