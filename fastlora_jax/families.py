"""The HF-name table: which family file implements which Hugging Face architecture.

Adding a family means one file (see llama.py for what it provides) and one line here.
"""

from __future__ import annotations

from types import ModuleType

from fastlora_jax import llama

FAMILIES: dict[str, ModuleType] = {arch: llama for arch in llama.ARCHITECTURES}


def family_for(hf_config, where: str = "config.json") -> ModuleType:
    """The family module for an HF config; a clear error naming the supported architectures otherwise."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for arch in architectures:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not architectures and model_type == "llama":
        return llama
    raise ValueError(
        f"unsupported architecture {architectures or model_type!r} in {where}; "
        f"supported: {sorted(FAMILIES)}")


def checkpoint_tensors(family: ModuleType, cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every tensor the family's checkpoint holds, embeddings first, in order."""
    top = family.top_tensors(cfg)
    first = [(n, *top.pop(n)) for n in list(top) if top[n][1] == "embedding"]
    layers = [(f"model.layers.{i}.{rel}", shape, kind) for i in range(cfg.num_layers)
              for rel, (shape, kind) in family.layer_tensors(cfg).items()]
    return first + layers + [(name, shape, kind) for name, (shape, kind) in top.items()]
