"""Phi-3 / Phi-3.5 / Phi-4: one fused `qkv_proj` and one fused `gate_up_proj` linear (what PEFT targets by those
names), partial rotary (`partial_rotary_factor`) and LongRoPE as transformers implements them (rope.py), and a
sliding window on every layer where the config sets `sliding_window`."""

from __future__ import annotations

from fastlora_jax.models.decoder import (  # noqa: F401  the shared decoder is this family's name table and forward
    CHECKPOINT_RENAMES, EMBED_TOKENS, LAYER_INPUT, LOAD_RENAMES, OUTPUT_LAYER, DecoderConfig, common_fields,
    forward, forward_cached, generation_inputs, hidden_states, init_cache, layer_stacks, lm_head_module, module_list,
    position_cos_sin, rope_cos_sin, rope_invalidates_cache, rope_is_dynamic, rope_tables, rotary_cos_sin,
    top_tensors)

ARCHITECTURES = ("Phi3ForCausalLM",)
MODEL_TYPES = ("phi3",)
DEFAULT_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Unsloth's for Phi-3


def config(hf_config) -> DecoderConfig:
    window = getattr(hf_config, "sliding_window", None)
    fields = common_fields(hf_config)
    fields["layer_types"] = ("sliding_attention",) * fields["num_layers"] if window is not None else ()
    return DecoderConfig(**fields, hidden_act=hf_config.hidden_act, fused_qkv=True, fused_gate_up=True,
                         sliding_window=window, act_module="activation_fn",
                         extra_layer_modules=("resid_attn_dropout", "resid_mlp_dropout"))
