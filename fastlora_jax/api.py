"""`FastLanguageModel`: the Unsloth-shaped entry points (argument names and defaults are Unsloth's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from fastlora_jax.convert.hf_checkpoint import read_config_dict
from fastlora_jax.convert.load import is_bnb_4bit, load_base_params
from fastlora_jax.families import family_for
from fastlora_jax.model import CausalLM

DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
               "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve_dtype(dtype):
    """None -> bfloat16 on a GPU, float32 elsewhere. Accepts names, jnp/numpy dtypes and torch dtypes."""
    if dtype is None:
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    name = str(dtype).removeprefix("torch.")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; use None, 'float32', 'bfloat16' or 'float16'")
    return DTYPE_NAMES[resolved.name]


def resolve_model_dir(model_name, token=None, revision=None, cache_dir=None) -> Path:
    """A local directory as given, or a hub id resolved through huggingface_hub's cache."""
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name):
        raise TypeError(f"model_name must be a local directory or a hub id (str); got {model_name!r}")
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path
    looks_local = str(model_name).startswith((".", "/", "~")) or str(model_name).count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model directory {str(model_name)!r} does not exist")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=str(model_name), revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated...: say what was tried
        raise FileNotFoundError(
            f"model_name={str(model_name)!r} is not a local directory and could not be resolved through the "
            f"Hugging Face hub or its cache ({type(err).__name__}: {err})") from err


def load_tokenizer(directory: Path):
    """The HF tokenizer saved with the model, or None when the directory has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True,
                        token=None, revision=None, cache_dir=None, double_quant: bool = True, **kwargs):
        """Load a Hugging Face causal LM as `(model, tokenizer)`.

        `load_in_4bit` quantizes every decoder-layer linear weight to NF4 on the device exactly as
        transformers + bitsandbytes would (double quantization on, as Unsloth asks for); a checkpoint
        that transformers saved in bnb 4-bit loads as stored. `dtype=None` is bfloat16 on a GPU and
        float32 elsewhere; embeddings, norms and lm_head are kept in it.
        """
        unknown = set(kwargs) - {"device_map", "trust_remote_code", "use_gradient_checkpointing",
                                 "load_in_8bit", "full_finetuning", "local_files_only", "fast_inference"}
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("load_in_8bit"):
            raise NotImplementedError("load_in_8bit=True is not supported; use load_in_4bit=True (NF4) or False")
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be a positive int; got {max_seq_length!r}")
        compute_dtype = resolve_dtype(dtype)
        directory = resolve_model_dir(model_name, token=token, revision=revision, cache_dir=cache_dir)

        config_dict = read_config_dict(directory)
        from transformers import AutoConfig
        family = family_for(_ArchitectureView(config_dict), where=str(directory / "config.json"))
        hf_config = AutoConfig.from_pretrained(directory)
        cfg = family.Config.from_hf(hf_config)
        params, info = load_base_params(directory, family, cfg, config_dict, compute_dtype,
                                        load_in_4bit=load_in_4bit, double_quant=double_quant)
        model = CausalLM(hf_config, family, cfg, params, compute_dtype, name_or_path=str(model_name),
                         weights_source=info["source"], max_seq_length=max_seq_length)
        model.model_dir = directory
        return model, load_tokenizer(directory)


class _ArchitectureView:
    """Just enough of a config for `family_for`, read from config.json before transformers parses it."""

    def __init__(self, config_dict: dict):
        self.architectures = config_dict.get("architectures")
        self.model_type = config_dict.get("model_type")


def _is_4bit_dir(directory: Path) -> bool:
    return is_bnb_4bit(json.loads((directory / "config.json").read_text()))
