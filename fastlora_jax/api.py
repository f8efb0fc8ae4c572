"""`FastLanguageModel` and `FastVisionModel`: the Unsloth-shaped entry points (argument names and defaults are
Unsloth's)."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.convert.hf_checkpoint import find_checkpoint_files, iter_tensors, read_config_dict
from fastlora_jax.convert.load import abstract_base_params, load_base_params
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions
from fastlora_jax.models.registry import family_for, stored_names
from fastlora_jax.lora import build_lora
from fastlora_jax.lora_config import LoraSpec, layer_index_of, vision_target_modules
from fastlora_jax.model import CausalLM, VisionCausalLM
from fastlora_jax.validate import check_bool, check_load_flags, check_optional_max_seq_length

DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
               "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
ADAPTER_CONFIG = "adapter_config.json"
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


def model_class(family) -> type:
    """VisionCausalLM for a family that takes images (its `VISION` flag), CausalLM otherwise."""
    return VisionCausalLM if getattr(family, "VISION", False) else CausalLM


def load_processor(directory: Path):
    """The HF processor saved with the model (AutoProcessor) when the directory has an image processor's
    config; otherwise its tokenizer, or None when it has neither."""
    if any((directory / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(directory)
    return load_tokenizer(directory)


def load_tokenizer(directory: Path):
    """The HF tokenizer saved with the model, or None when the directory has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)


GRADIENT_CHECKPOINTING = ("unsloth", True, False)
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_KWARGS = {"exclude_modules", "rank_pattern", "alpha_pattern", "use_dora"}
IGNORED_UNSLOTH_KWARGS = {"temporary_location", "use_cache", "qat_scheme", "ensure_weight_tying"}


def get_peft_model(model: CausalLM, r=16, target_modules=DEFAULT_TARGETS, lora_alpha=16, lora_dropout=0.0,
                   bias="none", layers_to_transform=None, layers_pattern=None,
                   use_gradient_checkpointing="unsloth", random_state=3407, max_seq_length=None,
                   use_rslora=False, modules_to_save=None, init_lora_weights=True, loftq_config={}, **kwargs):
    """Add LoRA adapters as a separate trainable pytree (`model.lora_params`); the base stays frozen.

    Argument names and defaults are Unsloth's; targeting, scaling, init, counting and files are PEFT
    0.21's (a list of names matches whole dotted suffixes, a string is a full-match regex,
    "all-linear" is every linear but lm_head). The default `target_modules` is the family's
    (`DEFAULT_TARGET_MODULES`: the seven projections; Phi-3's fused qkv_proj, o_proj, gate_up_proj,
    down_proj). Returns a new model object sharing the base pytree.
    `max_seq_length=None` keeps the model's (from_pretrained's); a value replaces it.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be what FastLanguageModel.from_pretrained returned; got {type(model).__name__}")
    unknown = set(kwargs) - PEFT_KWARGS - IGNORED_UNSLOTH_KWARGS
    if unknown:
        raise TypeError(f"get_peft_model() got unexpected keyword arguments {sorted(unknown)}; "
                        f"accepted extras: {sorted(PEFT_KWARGS)}")
    if target_modules is DEFAULT_TARGETS:  # not given: the family's default (Unsloth's per architecture)
        target_modules = list(getattr(model.family, "DEFAULT_TARGET_MODULES", DEFAULT_TARGETS))
    if use_gradient_checkpointing not in GRADIENT_CHECKPOINTING or isinstance(use_gradient_checkpointing, int) \
            and not isinstance(use_gradient_checkpointing, bool):
        raise ValueError(f"use_gradient_checkpointing={use_gradient_checkpointing!r} is not accepted; "
                         f"use 'unsloth', True or False")
    if isinstance(random_state, bool) or not isinstance(random_state, int):
        raise TypeError(f"random_state must be an int; got {random_state!r}")
    max_seq_length = check_optional_max_seq_length(max_seq_length)
    spec = LoraSpec.create(
        r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, use_rslora=use_rslora,
        modules_to_save=modules_to_save, init_lora_weights=init_lora_weights, loftq_config=loftq_config,
        exclude_modules=kwargs.get("exclude_modules"), rank_pattern=kwargs.get("rank_pattern"),
        alpha_pattern=kwargs.get("alpha_pattern"), use_dora=kwargs.get("use_dora", False))
    if model.lora_layout is not None:
        if model.lora_layout.spec == spec:
            warnings.warn("the model already has LoRA adapters with this config; returning it unchanged",
                          stacklevel=2)
            return model
        raise ValueError("the model already has LoRA adapters with a different config "
                         f"({model.lora_layout.spec} vs {spec}); load the base again to start over")
    original = None
    if spec.init_lora_weights == "loftq" and model.weights_source == "16bit" and model.model_dir is not None:
        files = find_checkpoint_files(model.model_dir)  # LoftQ starts from the original 16-bit weights
        in_file = stored_names(model.family, files.tensor_to_file)

        def original(name):
            if name not in in_file:
                return None
            return np.asarray(next(iter_tensors(files, [in_file[name]]))[1], np.float32)
    lora_params, lora_meta, layout, new_base = build_lora(model.family, model.cfg, model.base_params, spec,
                                                          random_state, original_weight=original, return_base=True)
    peft_model = copy.copy(model)
    if new_base is not None:  # LoftQ replaces the targeted base weights (as PEFT does)
        peft_model.base_params = new_base
        peft_model.weights_source = "loftq"
    peft_model.lora_params, peft_model.lora_meta, peft_model.lora_layout = lora_params, lora_meta, layout
    if model.mesh is not None:  # LoRA replicated on the mesh (and a LoftQ base back in its shards)
        peft_model.shard(model.mesh)
    peft_model.use_gradient_checkpointing = use_gradient_checkpointing
    peft_model._loss = None
    if max_seq_length is not None:
        peft_model.max_seq_length = max_seq_length
    return peft_model


class _ArchitectureView:
    """Just enough of a config for `family_for`, read from config.json before transformers parses it."""

    def __init__(self, config_dict: dict):
        self.architectures = config_dict.get("architectures")
        self.model_type = config_dict.get("model_type")


ADAPTER_ARGS = ("r", "init_lora_weights", "target_modules", "lora_alpha", "lora_dropout", "bias", "layers_to_transform", "layers_pattern",
                "use_rslora", "modules_to_save", "exclude_modules", "rank_pattern", "alpha_pattern", "use_dora")


def _load_with_adapter(adapter_dir: Path, processor: bool = False, **load_kwargs):
    """A PEFT adapter directory: load its base (adapter_config's base_model_name_or_path), then the adapter.
    Returns `(model, tokenizer)`, or `(model, processor)` with `processor=True`."""
    from fastlora_jax.convert.peft import read_adapter
    adapter_config, _ = read_adapter(adapter_dir)
    base_name = adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is not set; load the base with "
                         f"from_pretrained(base) and the adapter with model.load_adapter(dir)")
    model, tokenizer = FastLanguageModel.from_pretrained(base_name, **load_kwargs)
    kwargs = {k: adapter_config[k] for k in ADAPTER_ARGS if adapter_config.get(k) is not None}
    if isinstance(kwargs.get("target_modules"), list):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    if kwargs.get("init_lora_weights") not in (True, False, "gaussian"):
        kwargs["init_lora_weights"] = True  # the file's tensors replace the init; loftq/pissa need no rerun
    model = get_peft_model(model, **kwargs)
    model.load_adapter(adapter_dir)
    if processor:
        return model, load_processor(adapter_dir) or load_processor(Path(model.model_dir))
    return model, load_tokenizer(adapter_dir) or tokenizer


class FastLanguageModel:
    get_peft_model = staticmethod(get_peft_model)

    @staticmethod
    def from_config(hf_config, dtype=None, load_in_4bit: bool = True, max_seq_length: int = 2048) -> CausalLM:
        """A model whose base pytree is abstract (`jax.ShapeDtypeStruct` leaves, no weights): enough for
        `get_peft_model` and parameter counts of a large model on any machine."""
        check_bool("load_in_4bit", load_in_4bit)
        family = family_for(hf_config, where="hf_config")
        cfg = family.config(hf_config)
        compute_dtype = resolve_dtype(dtype)
        params = abstract_base_params(family, cfg, compute_dtype, load_in_4bit)
        return model_class(family)(hf_config, family, cfg, params, compute_dtype,
                                   name_or_path=getattr(hf_config, "_name_or_path", ""), max_seq_length=max_seq_length)

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True,
                        token=None, revision=None, cache_dir=None, double_quant: bool = True, mesh=None,
                        kernel_options: KernelOptions | None = None, **kwargs):
        """Load a Hugging Face causal LM as `(model, tokenizer)`.

        `load_in_4bit` quantizes every decoder-layer linear weight to NF4 on the device exactly as
        transformers + bitsandbytes would (double quantization on, as Unsloth asks for); a checkpoint
        that transformers saved in bnb 4-bit loads as stored. `dtype=None` is bfloat16 on a GPU and
        float32 elsewhere; embeddings, norms and lm_head are kept in it.

        `mesh`: None (one device, as always), a `jax.sharding.Mesh` with axes ("data", "fsdp")
        (`fastlora_jax.make_mesh(data=N, fsdp=M)`) or its spec string ("data=2,fsdp=2"; "auto": every device on
        data). The base is then loaded straight into its FSDP shards (fastlora_jax.sharding: each process reads
        only the slices its devices hold) and every program of the model runs over the mesh. A spec string
        initializes `jax.distributed` first when the multi-host environment variables are set.

        `kernel_options`: the `KernelOptions` of every traced program of the model (None: the defaults), e.g.
        `KernelOptions(mlp_tile_tokens=8192)` for the sequence-tiled MLP at long context.
        """
        from fastlora_jax import sharding
        if kernel_options is not None and not isinstance(kernel_options, KernelOptions):
            raise TypeError(f"kernel_options must be a fastlora_jax.kernels.KernelOptions or None; got "
                            f"{type(kernel_options).__name__}")
        mesh = sharding.resolve_mesh(mesh)  # before anything starts a JAX backend (jax.distributed comes first)
        unknown = set(kwargs) - {"device_map", "trust_remote_code", "use_gradient_checkpointing",
                                 "load_in_8bit", "full_finetuning", "local_files_only", "fast_inference"}
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {sorted(unknown)}")
        check_load_flags(load_in_4bit, double_quant, kwargs)
        if kwargs.get("load_in_8bit"):
            raise NotImplementedError("load_in_8bit=True is not supported; use load_in_4bit=True (NF4) or False")
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be a positive int; got {max_seq_length!r}")
        compute_dtype = resolve_dtype(dtype)
        directory = resolve_model_dir(model_name, token=token, revision=revision, cache_dir=cache_dir)
        if (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file():
            return _load_with_adapter(directory, max_seq_length=max_seq_length, dtype=compute_dtype,
                                      load_in_4bit=load_in_4bit, token=token, cache_dir=cache_dir,
                                      double_quant=double_quant, mesh=mesh, kernel_options=kernel_options)

        config_dict = read_config_dict(directory)
        from transformers import AutoConfig
        family = family_for(_ArchitectureView(config_dict), where=str(directory / "config.json"))
        hf_config = AutoConfig.from_pretrained(directory)
        cfg = family.config(hf_config)
        params, info = load_base_params(directory, family, cfg, config_dict, compute_dtype,
                                        load_in_4bit=load_in_4bit, double_quant=double_quant, mesh=mesh)
        model = model_class(family)(hf_config, family, cfg, params, compute_dtype, name_or_path=str(model_name),
                                    weights_source=info["source"], max_seq_length=max_seq_length, model_dir=directory,
                                    mesh=mesh, kernel_options=kernel_options or DEFAULT_OPTIONS)
        return model, load_tokenizer(directory)

    @staticmethod
    def for_inference(model: CausalLM) -> CausalLM:
        """Unsloth's switch to inference mode: `model.training = False`; returns the model."""
        model.training = False
        return model

    @staticmethod
    def for_training(model: CausalLM, use_gradient_checkpointing=True) -> CausalLM:
        """Unsloth's switch back to training mode: `model.training = True`; returns the model."""
        model.training = True
        return model


def vision_targets(model: CausalLM, target_modules=None, finetune_vision_layers: bool = True,
                   finetune_language_layers: bool = True, finetune_attention_modules: bool = True,
                   finetune_mlp_modules: bool = True):
    """`target_modules` as FastVisionModel.get_peft_model hands it to PEFT's rules: the finetune_* selection of
    `lora_config.vision_target_modules` over the model's module list (its docstring is the rule; a regex
    string other than "all-linear" is used as given)."""
    return vision_target_modules(model.family.module_list(model.cfg), target_modules,
                                 finetune_vision_layers=finetune_vision_layers,
                                 finetune_language_layers=finetune_language_layers,
                                 finetune_attention_modules=finetune_attention_modules,
                                 finetune_mlp_modules=finetune_mlp_modules)


def get_vision_peft_model(model: CausalLM, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
                          finetune_vision_layers=True, finetune_language_layers=True,
                          finetune_attention_modules=True, finetune_mlp_modules=True, layers_to_transform=None,
                          layers_pattern=None, use_gradient_checkpointing="unsloth", random_state=3407,
                          max_seq_length=None, use_rslora=False, modules_to_save=None, init_lora_weights=True,
                          loftq_config={}, **kwargs):
    """FastVisionModel.get_peft_model: `get_peft_model` with `target_modules` chosen by the finetune_* flags
    (`vision_targets`). Everything else (files, counts, merge, errors) is the text path's.

    The selection is one regex, and PEFT refuses `layers_to_transform` with a regex; so with
    `layers_to_transform` (and `layers_pattern`) the layer choice is applied here, by PEFT's rule (the layer
    index parsed from each selected name), and folded into the regex, which then selects exactly those
    modules. A regex you pass yourself is used as given (and PEFT's refusal stands).
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be what FastVisionModel.from_pretrained returned; got {type(model).__name__}")
    targets = vision_targets(model, target_modules, finetune_vision_layers, finetune_language_layers,
                             finetune_attention_modules, finetune_mlp_modules)
    chose = not isinstance(target_modules, str) or target_modules.lower() == "all-linear"
    if layers_to_transform is not None and chose and isinstance(targets, str):
        targets = _fold_layers(model.family.module_list(model.cfg), targets, layers_to_transform, layers_pattern)
        layers_to_transform = layers_pattern = None
    return get_peft_model(model, r=r, target_modules=targets, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          bias=bias, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                          use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                          max_seq_length=max_seq_length, use_rslora=use_rslora, modules_to_save=modules_to_save,
                          init_lora_weights=init_lora_weights, loftq_config=loftq_config, **kwargs)


def _fold_layers(modules, regex: str, layers_to_transform, layers_pattern) -> str:
    """The modules `regex` selects whose PEFT layer index is in `layers_to_transform`, as one regex."""
    import re

    from fastlora_jax.lora_config import _selection_regex
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    names = [name for name, _ in modules]
    kept = [n for n in names if re.fullmatch(regex, n) and layer_index_of(n, layers_pattern) in wanted]
    if not kept:
        raise ValueError(f"layers_to_transform={layers_to_transform!r} (layers_pattern={layers_pattern!r}) keeps none "
                         f"of the modules selected by {regex!r}")
    return _selection_regex(kept, names)


class FastVisionModel:
    """Unsloth's FastVisionModel: vision-language models (Qwen2-VL, Qwen2.5-VL, Llama 3.2 Vision, Gemma 3) and,
    like Unsloth's, text models."""

    get_peft_model = staticmethod(get_vision_peft_model)
    for_inference = staticmethod(FastLanguageModel.for_inference)
    for_training = staticmethod(FastLanguageModel.for_training)

    @staticmethod
    def from_config(hf_config, dtype=None, load_in_4bit: bool = True, max_seq_length: int = 2048) -> CausalLM:
        """A model with an abstract base pytree (no weights): for get_peft_model and counts from a config alone."""
        return FastLanguageModel.from_config(hf_config, dtype=dtype, load_in_4bit=load_in_4bit,
                                             max_seq_length=max_seq_length)

    @staticmethod
    def from_pretrained(model_name: str, load_in_4bit: bool = True, dtype=None, max_seq_length: int = 2048,
                        token=None, revision=None, cache_dir=None, double_quant: bool = True, mesh=None, **kwargs):
        """Load a Hugging Face vision-language model as `(model, processor)`.

        As FastLanguageModel.from_pretrained (4-bit quantizes every nn.Linear but lm_head, vision tower and
        merger or projector included, as transformers + bitsandbytes do; the patch embedding, norms and embeddings
        stay in `dtype`). `processor` is the directory's AutoProcessor (its tokenizer when it has no image
        processor, None when it has neither). `model(input_ids, attention_mask=None, *image_inputs)` returns an
        object with `.logits`; the image inputs are the processor's (the family's `IMAGE_INPUTS`: Qwen-VL's
        pixel_values, image_grid_thw, mm_token_type_ids; Mllama's pixel_values, aspect_ratio_ids,
        aspect_ratio_mask, cross_attention_mask), by name or in that order. `mesh`: as
        FastLanguageModel.from_pretrained's (the image inputs are replicated over the mesh, the text batch split).
        """
        from fastlora_jax import sharding
        mesh = sharding.resolve_mesh(mesh)
        check_load_flags(load_in_4bit, double_quant, kwargs)
        directory = resolve_model_dir(model_name, token=token, revision=revision, cache_dir=cache_dir)
        if (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file():
            return _load_with_adapter(directory, processor=True, max_seq_length=max_seq_length, dtype=dtype,
                                      load_in_4bit=load_in_4bit, token=token, cache_dir=cache_dir,
                                      double_quant=double_quant, mesh=mesh)
        model, _ = FastLanguageModel.from_pretrained(directory, max_seq_length=max_seq_length, dtype=dtype,
                                                     load_in_4bit=load_in_4bit, double_quant=double_quant, mesh=mesh,
                                                     **kwargs)
        model.name_or_path = str(model_name)
        return model, load_processor(directory)
