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
