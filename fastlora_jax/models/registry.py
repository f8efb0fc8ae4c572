"""The registry: which family module implements which Hugging Face architecture, and the generic helpers
every family's name table feeds.

Adding a Llama-like family means one file (a `config(hf) -> DecoderConfig` over the shared decoder; see
mistral.py) and one entry in `FAMILY_MODULES`. A family module declares:
- `ARCHITECTURES`, `MODEL_TYPES` (for a config.json without `architectures`), `config(hf_config)` and
  `DEFAULT_TARGET_MODULES` (Unsloth's default `target_modules` for it);
- `layer_stacks(cfg) -> {stack key: (depth, {relative tensor name: (shape, kind)})}`: each stack of
  identical blocks (`model.layers` for the text families; `model.visual.blocks` and
  `model.language_model.layers` for Qwen-VL) is stored stacked on a leading axis of size `depth` and runs
  under `jax.lax.scan`; the key is the pytree path of the stacked leaves;
- optionally `stack_layers(cfg) -> {stack key: (HF module prefix, HF layer index of each position)}`, when a
  stack's layers are not the modules `f"{key}.0"`, `f"{key}.1"`, ... (Mllama: its self- and cross-attention
  layers are two stacks, two shapes of layer, in one HF ModuleList at interleaved indices). `StackMap` is
  what generic code uses to go between HF names and stack positions;
- `top_tensors(cfg)`: every other tensor, by full name; `module_list(cfg)`: torch's `named_modules()`;
- `EMBED_TOKENS` (the input embedding module, which a tied `lm_head` shares) and `OUTPUT_LAYER`;
- `CHECKPOINT_RENAMES` / `LOAD_RENAMES`: regex tables between module names (the pytree's, PEFT's) and the
  tensor names transformers writes in checkpoints (they differ for Qwen-VL: `visual.*`, `model.layers.*`);
- the forward pass and the KV cache (`decoder.FAMILY_API` for the text families, which re-export the
  decoder's; Qwen-VL and Mllama have their own, `VISION = True`, and `VISION_API`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import ModuleType

from fastlora_jax.models import decoder, gemma2, gemma3, gemma3_vl, llama, mistral, mllama, phi3, qwen2, qwen2_vl, qwen3

TEXT_FAMILIES = (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3)
VISION_FAMILIES = (qwen2_vl, mllama, gemma3_vl)
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


class StackMap(Mapping):
    """{stack key: depth} of a family's stacks of layers, and which HF module each stack position is.

    Position j of stack `key` is the HF module `f"{prefix}.{indices[j]}"`. For every family but Mllama the
    prefix is the key and the indices are 0..depth-1; Mllama's self- and cross-attention layers are two stacks
    sharing the ModuleList `model.language_model.layers` at interleaved indices. `indices=None` stands for the
    identity of an unknown depth (`lora.split_module`'s default). A plain `{key: depth}` dict compares equal to
    the StackMap of identity stacks."""

    def __init__(self, layers: dict[str, tuple[str, tuple[int, ...] | None]]):
        self.layers = {key: (prefix, None if indices is None else tuple(int(i) for i in indices))
                       for key, (prefix, indices) in layers.items()}
        self._at: dict[str, dict[int, tuple[str, int]]] = {}  # prefix -> {HF index: (key, position)}
        self._identity: dict[str, str] = {}  # prefix -> key, for stacks with indices None
        for key, (prefix, indices) in self.layers.items():
            if indices is None:
                self._identity[prefix] = key
                continue
            at = self._at.setdefault(prefix, {})
            for position, index in enumerate(indices):
                if index in at:
                    raise ValueError(f"HF layer {prefix}.{index} is in two stacks ({at[index][0]!r}, {key!r})")
                at[index] = (key, position)

    @classmethod
    def identity(cls, depths: Mapping) -> "StackMap":
        """Stacks whose key is their HF prefix and whose positions are the HF indices."""
        return cls({key: (key, None if depth is None else tuple(range(depth))) for key, depth in depths.items()})

    def __getitem__(self, key: str):
        indices = self.layers[key][1]
        return None if indices is None else len(indices)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"StackMap({self.layers})"

    @property
    def layer_count(self) -> int:
        """One more than the largest HF layer index of any stack (what `layers_to_transform` is checked against)."""
        return max((max(ix) + 1 for _, ix in self.layers.values() if ix), default=1)

    def locate(self, name: str) -> tuple[str, int, str] | None:
        """`f"{prefix}.{N}.{rest}"` -> (stack key, position, rest) for a name inside a stack; None outside."""
        for prefix in list(self._at) + list(self._identity):
            if not name.startswith(prefix + "."):
                continue
            head, _, rest = name[len(prefix) + 1:].partition(".")
            if not head.isdigit() or not rest:
                continue
            if prefix in self._identity:
                return self._identity[prefix], int(head), rest
            found = self._at[prefix].get(int(head))
            if found is not None:
                return found[0], found[1], rest
        return None

    def module_name(self, key: str, position: int, rest: str = "") -> str:
        """The HF name of `rest` in layer `position` of stack `key` (the module itself when `rest` is empty)."""
        prefix, indices = self.layers[key]
        index = position if indices is None else indices[position]
        return f"{prefix}.{index}" + (f".{rest}" if rest else "")


def stack_layers(family: ModuleType, cfg) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{stack key: (HF module prefix, HF layer index of each position)}: the family's own `stack_layers`, or
    the identity (the key is the prefix, position j is layer j)."""
    if hasattr(family, "stack_layers"):
        return family.stack_layers(cfg)
    return {key: (key, tuple(range(depth))) for key, (depth, _) in family.layer_stacks(cfg).items()}


def stack_depths(family: ModuleType, cfg) -> StackMap:
    """The family's stacks as a `StackMap` ({stack key: depth}, with their HF names): what `lora.split_module`
    needs to find the stack and the layer of a name."""
    return StackMap(stack_layers(family, cfg))


def checkpoint_tensors(family: ModuleType, cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(module-tree name, shape, kind) of every tensor the family's checkpoint holds: embeddings first, then
    each stack layer by layer, then the rest. Names are the modules' (`checkpoint_name` gives the file's)."""
    stacks = stack_depths(family, cfg)
    top = family.top_tensors(cfg)
    first = [(n, *top.pop(n)) for n in list(top) if top[n][1] == "embedding"]
    layers = [(stacks.module_name(key, i, rel), shape, kind)
              for key, (depth, table) in family.layer_stacks(cfg).items()
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
