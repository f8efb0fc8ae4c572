"""The registry: which family module implements which Hugging Face architecture, and the generic helpers
every family's name table feeds.

Adding a Llama-like family means one file (a `config(hf) -> DecoderConfig` over the shared decoder; see
mistral.py) and one entry in `FAMILY_MODULES`. A family module declares:
- `ARCHITECTURES`, `MODEL_TYPES` (for a config.json without `architectures`), `config(hf_config)` and
  `DEFAULT_TARGET_MODULES` (Unsloth's default `target_modules` for it);
- `layer_stacks(cfg) -> {stack prefix: (depth, {relative tensor name: (shape, kind)})}`: each stack of
  identical blocks (`model.layers` for the text families; `model.visual.blocks` and
  `model.language_model.layers` for Qwen-VL) is stored stacked on a leading axis of size `depth` and runs
  under `jax.lax.scan`;
- `top_tensors(cfg)`: every other tensor, by full name; `module_list(cfg)`: torch's `named_modules()`;
- `EMBED_TOKENS` (the input embedding module, which a tied `lm_head` shares) and `OUTPUT_LAYER`;
- `CHECKPOINT_RENAMES` / `LOAD_RENAMES`: regex tables between module names (the pytree's, PEFT's) and the
  tensor names transformers writes in checkpoints (they differ for Qwen-VL: `visual.*`, `model.layers.*`);
- the forward pass and the KV cache (`decoder.FAMILY_API` for the text families, which re-export the
  decoder's; Qwen-VL has its own, and `VISION = True`).
"""

from __future__ import annotations

import re
from types import ModuleType

from fastlora_jax.models import decoder, gemma2, gemma3, gemma3_vl, llama, mistral, phi3, qwen2, qwen2_vl, qwen3

TEXT_FAMILIES = (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3)
VISION_FAMILIES = (qwen2_vl, gemma3_vl)
FAMILY_MODULES = TEXT_FAMILIES + VISION_FAMILIES
FAMILIES: dict[str, ModuleType] = {arch: family for family in FAMILY_MODULES for arch in family.ARCHITECTURES}

# What a vision family provides beyond a text family's API: its processor's image inputs, in the order the
# model's methods take them positionally after attention_mask (model.VisionCausalLM), and their preparation.
# (CausalLM's text-only rope helpers, rope_cos_sin / rotary_cos_sin, are not needed: VisionCausalLM goes through
# rope_tables and position_cos_sin.)
VISION_API = ("VISION", "IMAGE_INPUTS", "prepare_inputs")

for _family in TEXT_FAMILIES:  # a text family is the shared decoder plus its config translation
    _missing = [n for n in decoder.FAMILY_API + ("ARCHITECTURES", "MODEL_TYPES", "DEFAULT_TARGET_MODULES", "config")
                if not hasattr(_family, n)]
    assert not _missing, f"{_family.__name__} lacks {_missing}"
for _family in VISION_FAMILIES:
    _missing = [n for n in decoder.FAMILY_API + VISION_API + ("ARCHITECTURES", "MODEL_TYPES", "config")
                if not hasattr(_family, n) and n not in ("rope_cos_sin", "rotary_cos_sin")]
    assert not _missing, f"{_family.__name__} lacks {_missing}"


def family_for(hf_config, where: str = "config.json") -> ModuleType:
    """The family module for an HF config; a clear error naming the supported architectures otherwise."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for arch in architectures:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not architectures:
        for family in FAMILY_MODULES:
            if model_type in family.MODEL_TYPES:
                return family
    raise ValueError(
        f"unsupported architecture {architectures or model_type!r} in {where}; "
        f"supported: {sorted(FAMILIES)}")


def layer_stacks(family: ModuleType, cfg) -> dict[str, tuple[int, dict]]:
    """{stack prefix: (depth, {relative tensor name: (shape, kind)})}, in the model's order."""
    return family.layer_stacks(cfg)


def stack_depths(family: ModuleType, cfg) -> dict[str, int]:
    """{stack prefix: depth}: what `lora.split_module` needs to find the layer index in a name."""
    return {prefix: depth for prefix, (depth, _) in family.layer_stacks(cfg).items()}


def checkpoint_tensors(family: ModuleType, cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(module-tree name, shape, kind) of every tensor the family's checkpoint holds: embeddings first, then
    each stack layer by layer, then the rest. Names are the pytree's (`checkpoint_name` gives the file's)."""
    top = family.top_tensors(cfg)
    first = [(n, *top.pop(n)) for n in list(top) if top[n][1] == "embedding"]
    layers = [(f"{prefix}.{i}.{rel}", shape, kind)
              for prefix, (depth, table) in family.layer_stacks(cfg).items()
              for i in range(depth) for rel, (shape, kind) in table.items()]
    return first + layers + [(name, shape, kind) for name, (shape, kind) in top.items()]


def _rename(table, name: str) -> str:
    for pattern, replacement in table:
        renamed, n = re.subn(pattern, replacement, name, count=1)
        if n:
            return renamed
    return name


def checkpoint_name(family: ModuleType, name: str) -> str:
    """A pytree/module tensor name as transformers' save_pretrained writes it (merged exports use this)."""
    return _rename(family.CHECKPOINT_RENAMES, name)


def module_tensor_name(family: ModuleType, stored: str) -> str:
    """A checkpoint tensor name (either convention transformers loads) as the pytree/module name."""
    return _rename(family.LOAD_RENAMES, stored)


def stored_names(family: ModuleType, stored) -> dict[str, str]:
    """{module-tree name: name in the file} for the tensor names of a checkpoint."""
    return {module_tensor_name(family, s): s for s in stored}
