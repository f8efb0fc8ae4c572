"""`CausalLM`: what `FastLanguageModel.from_pretrained` returns.

It carries the HF config, the family (a module of plain functions, fastlora_jax/models/), the family's frozen
config (a `DecoderConfig` for the text families), the frozen base pytree and the `KernelOptions` its traced
programs use. Calling it runs the jitted forward pass and returns an object with `.logits`, like the
HF model. LoRA (get_peft_model) adds a separate trainable pytree next to the base; the two never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.convert.hf_checkpoint import numpy_dtype
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions
from fastlora_jax.lora import combine, count_parameters, get_node, split_module
from fastlora_jax.models.registry import checkpoint_tensors, stack_depths
from fastlora_jax.quant import NF4Weight


@dataclass
class CausalLMOutput:
    logits: jax.Array
    loss: jax.Array | None = None


class CausalLM:
    def __init__(self, hf_config, family: ModuleType, cfg, base_params: dict, dtype, name_or_path: str,
                 weights_source: str = "16bit", max_seq_length: int = 2048, model_dir=None,
                 kernel_options: KernelOptions = DEFAULT_OPTIONS, mesh=None):
        self.config = hf_config
        self.family = family
        self.cfg = cfg
        self.base_params = base_params
        self.dtype = jnp.dtype(dtype)
        self.name_or_path = name_or_path
        self.weights_source = weights_source  # "16bit" or "bnb-4bit": what a merged export starts from
        self.max_seq_length = max_seq_length
        self.model_dir = model_dir  # where the base checkpoint was read (a merged export re-reads it)
        # The kernel choices of every traced program (forward, loss, generation); the loss adds the
        # checkpointing mode's memory_lean. Benchmarks set it from their flags.
        self.kernel_options = kernel_options
        # The jax.sharding.Mesh the base is sharded over (fastlora_jax.sharding), or None (one device). Every
        # traced program of the model runs under it (`sharding.use_mesh`).
        self.mesh = mesh
        # LoRA (get_peft_model): the trainable tree, its static arrays and its resolved PEFT layout.
        self.lora_params: dict | None = None
        self.lora_meta: dict | None = None
        self.lora_layout = None
        self.training = True
        self.loss_chunk_tokens: int | None = None  # tokens per loss chunk; None: the mode's default (training.output_layer_loss)
        self._loss = None  # jitted compute_loss, built on first use
        self._forward = self._make_forward()

    def _make_forward(self):
        family, cfg = self.family, self.cfg

        def forward(base, lora, meta, input_ids, cos, sin, attention_mask, dropout_key, *, compute_dtype,
                    dropout_rate, options):
            params = combine(base, lora, meta)
            return family.forward(cfg, params, input_ids, cos, sin, attention_mask, compute_dtype,
                                  dropout_key, dropout_rate, options=options)

        return jax.jit(forward, static_argnames=("compute_dtype", "dropout_rate", "options"))

    # ------------------------------------------------------------------ mesh
    def shard(self, mesh) -> "CausalLM":
        """Place the model on `mesh` (a `jax.sharding.Mesh` with axes ("data", "fsdp"), or a spec such as
        "data=2,fsdp=2"): the base by `sharding.base_shardings`' rules, LoRA replicated. Returns the model.
        `from_pretrained(..., mesh=)` loads straight into the shards instead (never whole on one device)."""
        from fastlora_jax import sharding
        mesh = sharding.resolve_mesh(mesh)
        if mesh is None:
            raise ValueError("shard(mesh=None): give a jax.sharding.Mesh or a spec such as 'data=2,fsdp=2'")
        self.base_params = sharding.place(self.base_params,
                                          sharding.base_shardings(self.family, self.cfg, self.base_params, mesh))
        if self.lora_params is not None:
            self.lora_params = sharding.place(self.lora_params, sharding.replicated(mesh))
            self.lora_meta = sharding.place(self.lora_meta, sharding.replicated(mesh))
        self.mesh = mesh
        self._loss = None
        return self

    def _on_mesh(self):
        from fastlora_jax import sharding
        return sharding.use_mesh(self.mesh)

    # ------------------------------------------------------------------ rope
    def rotary_cos_sin(self, position_ids_bs) -> tuple[jax.Array, jax.Array]:
        """cos/sin `[batch, seq, rotary_dim]` in fp32 (`[types, batch, seq, rotary_dim]` for a family with a
        table per layer type); the rope variant may depend on the longest position."""
        return self.family.rotary_cos_sin(self.config, self.cfg, position_ids_bs)

    @staticmethod
    def default_position_ids(input_ids_bs) -> np.ndarray:
        batch, seq = np.shape(input_ids_bs)
        return np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> CausalLMOutput:
        """Logits with the current adapter (if any), without dropout: the HF model in eval mode."""
        return CausalLMOutput(logits=self.apply(self.lora_params, input_ids, attention_mask, position_ids))

    def apply(self, lora_params, input_ids, attention_mask=None, position_ids=None, dropout_key=None):
        """Logits for a given LoRA pytree (None: the base alone). `dropout_key` turns on LoRA dropout."""
        input_ids = as_batch(input_ids, "input_ids")
        if attention_mask is not None:
            attention_mask = as_batch(attention_mask, "attention_mask")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {attention_mask.shape}; input_ids has {input_ids.shape}")
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        cos, sin = self.rotary_cos_sin(position_ids)
        dropout_rate = float(self.lora_layout.spec.lora_dropout) if self.lora_layout is not None else 0.0
        with self._on_mesh():
            return self._forward(self.base_params, lora_params, self.lora_meta if lora_params is not None else None,
                                 jnp.asarray(input_ids), cos, sin,
                                 None if attention_mask is None else jnp.asarray(attention_mask), dropout_key,
                                 compute_dtype=self.dtype,
                                 dropout_rate=dropout_rate if dropout_key is not None else 0.0,
                                 options=self.kernel_options)

    def __repr__(self) -> str:
        c = self.cfg
        quant = "nf4" if self.is_4bit else self.dtype.name
        return (f"CausalLM({self.family.__name__.rsplit('.', 1)[-1]}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"weights={quant}, compute={self.dtype.name}, from={self.name_or_path!r})")

    # ------------------------------------------------------------------ loss
    def loss_sum_fn(self, chunk_tokens: int | None = None):
        """`f(base_params, lora_params, input_ids, labels, attention_mask, dropout_key) -> (loss_sum, counted_tokens)`,
        traceable (no jit of its own) for jax.grad and train steps. Uses the model's checkpointing mode.

        The base is an argument, never a closure: a jitted function that closed over it would bake
        gigabytes of weights into the compiled program as constants."""
        from fastlora_jax import training
        remat = training.remat_policy(getattr(self, "use_gradient_checkpointing", False), self.kernel_options)
        chunk = chunk_tokens or self.loss_chunk_tokens  # None: training.output_layer_loss picks the mode's default
        dropout_rate = float(self.lora_layout.spec.lora_dropout) if self.lora_layout is not None else 0.0
        options = training.step_options(self.kernel_options, getattr(self, "use_gradient_checkpointing", False))
        family, cfg = self.family, self.cfg

        def loss_sum(base_params, lora_params, input_ids, labels, attention_mask=None, dropout_key=None):
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
            inv_freq, scaling = family.rope_tables(self.config, cfg, input_ids.shape[1])
            cos, sin = family.rope_cos_sin(inv_freq, position_ids, scaling)
            return training.loss_sum_and_count(
                self, base_params, lora_params, self.lora_meta if lora_params is not None else None,
                input_ids, labels, cos, sin, attention_mask, dropout_key, compute_dtype=self.dtype,
                dropout_rate=dropout_rate if dropout_key is not None else 0.0, remat=remat, chunk_tokens=chunk,
                options=options)

        return loss_sum

    def compute_loss(self, lora_params, input_ids, labels, attention_mask=None, dropout_key=None):
        """The HF model's `.loss` for these labels (shifted inside, -100 ignored, mean over counted tokens),
        computed in chunks so full fp32 logits never exist. Differentiable w.r.t. `lora_params`."""
        if self._loss is None:
            fn = self.loss_sum_fn()
            self._loss = jax.jit(lambda base, lp, ids, lab, mask, key: _mean(*fn(base, lp, ids, lab, mask, key)))
        input_ids = jnp.asarray(as_batch(input_ids, "input_ids"))
        labels = jnp.asarray(as_batch(labels, "labels"))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {labels.shape}; input_ids has {input_ids.shape}")
        mask = None if attention_mask is None else jnp.asarray(as_batch(attention_mask, "attention_mask"))
        with self._on_mesh():
            return self._loss(self.base_params, lora_params, input_ids, labels, mask, dropout_key)

    # ------------------------------------------------------------------ tensors by HF name
    def tensor_names(self) -> list[str]:
        return [name for name, _, _ in checkpoint_tensors(self.family, self.cfg)]

    @property
    def stacks(self) -> dict[str, int]:
        """{stack prefix: depth}: the family's stacks of layers (each one leading axis of the pytree)."""
        return stack_depths(self.family, self.cfg)

    def base_tensor(self, name: str) -> np.ndarray:
        """One base tensor by HF module name as numpy (NF4 dequantized to the model dtype, as float32)."""
        if name == f"{self.family.OUTPUT_LAYER}.weight" and self.cfg.tie_word_embeddings:
            name = f"{self.family.EMBED_TOKENS}.weight"
        path, index = split_module(name, self.stacks)
        value = get_node(self.base_params, path)
        if index is not None:
            value = jax.tree.map(lambda x: x[index], value)
        if isinstance(value, NF4Weight):
            value = value.dequantize(self.dtype)
        from fastlora_jax.sharding import to_host
        return np.asarray(to_host(value), dtype=np.float32)

    # ------------------------------------------------------------------ LoRA (PEFT's attributes and files)
    def _require_lora(self, what: str):
        if self.lora_layout is None:
            raise ValueError(f"{what} needs LoRA adapters: call FastLanguageModel.get_peft_model(model, ...) first")

    @property
    def targeted_module_names(self) -> list[str]:
        self._require_lora("targeted_module_names")
        return self.lora_layout.targeted_module_names

    @property
    def peft_config(self) -> dict:
        """PEFT's `adapter_config.json` content, under the adapter name "default" as PeftModel has it."""
        self._require_lora("peft_config")
        return {"default": self.adapter_config()}

    def adapter_config(self) -> dict:
        return self.lora_layout.spec.to_peft_config_dict(
            self.name_or_path, modules=self.family.module_list(self.cfg), output_layer_names=("lm_head",))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        self._require_lora("get_nb_trainable_parameters")
        return count_parameters(self.base_params, self.lora_layout, self.cfg)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def peft_state_dict(self, lora_params=None) -> dict:
        """PEFT's adapter state dict (`base_model.model.<module>.lora_A.weight`, ...) of `lora_params`
        (default: the model's), or of any pytree shaped like it, such as its gradients."""
        self._require_lora("peft_state_dict")
        from fastlora_jax.convert.peft import peft_state_dict
        return peft_state_dict(self.lora_layout, self.lora_params if lora_params is None else lora_params)

    def save_pretrained(self, save_directory, **kwargs):
        """`adapter_config.json` + `adapter_model.safetensors`, as PEFT writes them for the same config."""
        self._require_lora("save_pretrained")
        from fastlora_jax.convert.peft import embedding_base_layer_keys, save_adapter
        extra = {key: self.base_tensor(module + ".weight").astype(numpy_dtype(self.dtype.name))
                 for key, module in embedding_base_layer_keys(self.lora_layout).items()}
        return save_adapter(save_directory, self.lora_layout, self.lora_params, self.adapter_config(), extra)

    def load_adapter(self, adapter_dir) -> None:
        """Replace `lora_params` with a PEFT adapter's tensors (the adapter's config must be this one's)."""
        from fastlora_jax.convert.peft import load_peft_state_dict, read_adapter
        self._require_lora("load_adapter")
        _, tensors = read_adapter(adapter_dir)
        self.lora_params = load_peft_state_dict(self.lora_layout, self.lora_params, tensors, str(adapter_dir),
                                                base_tensor=self.base_tensor)

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
        """`merged_16bit`: a plain HF checkpoint with W + s·B·A merged, in the model's dtype (from the
        original 16-bit weights when the base came from them; from dequantized NF4 otherwise, with a
        warning). `lora`: the adapter alone, as save_pretrained."""
        if save_method == "lora":
            out = self.save_pretrained(save_directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(save_directory)
            return out
        if save_method not in ("merged_16bit",):
            raise ValueError(f"save_method={save_method!r} is not supported; use 'merged_16bit' or 'lora'")
        self._require_lora("save_pretrained_merged")
        from fastlora_jax.convert.peft import save_merged
        return save_merged(self, save_directory, tokenizer)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="fast_quantized",
                             save_method: str = "merged_16bit", **kwargs):
        """Unsloth's GGUF export for llama.cpp / Ollama (convert/gguf_export.py). `merged_16bit`: the merged
        model (from the original 16-bit weights, as save_pretrained_merged) as `model.<TYPE>.gguf` with the
        tokenizer and chat template embedded, plus an Ollama `Modelfile`. `quantization_method`: "f16", "bf16",
        "f32", "q8_0" (Unsloth's "fast_quantized", the default), "not_quantized" (f16); K-quants such as "q4_k_m"
        go through llama.cpp's quantizer (llama-cpp-python). A list writes several. `lora`: the adapter alone as
        a llama.cpp LoRA GGUF (`adapter.<TYPE>.gguf`). Returns the paths written."""
        self._require_lora("save_pretrained_gguf")
        from fastlora_jax.convert.gguf_export import save_pretrained_gguf
        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, save_method)

    @property
    def is_4bit(self) -> bool:
        leaves = jax.tree.leaves(self.base_params, is_leaf=lambda x: isinstance(x, NF4Weight))
        return any(isinstance(x, NF4Weight) for x in leaves)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids=None, **kwargs):
        """Token ids `[batch, prompt + new]` (numpy int32) with a KV cache, LoRA unmerged; the keyword arguments
        are `fastlora_jax.generation.generate`'s (attention_mask, max_new_tokens, do_sample, temperature, top_p,
        top_k, eos_token_id, pad_token_id, seed, return_dict). `input_ids` may also be what a tokenizer
        returns (a mapping with `input_ids` and `attention_mask`), as `apply_chat_template` gives it."""
        from fastlora_jax.generation import generate
        if hasattr(input_ids, "keys") and "input_ids" in input_ids:
            kwargs.setdefault("attention_mask", input_ids.get("attention_mask"))
            input_ids = input_ids["input_ids"]
        with self._on_mesh():
            return generate(self, input_ids, **kwargs)


def _mean(loss_sum, count):
    return loss_sum / jnp.maximum(count, 1).astype(loss_sum.dtype)


def as_batch(ids, name: str) -> np.ndarray:
    """Accept lists, numpy, jax or torch tensors of shape [seq] or [batch, seq]."""
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must be integer ids of shape [batch, seq]; got dtype {array.dtype}, "
                         f"shape {array.shape}")
    return array.astype(np.int32)


class VisionCausalLM(CausalLM):
    """What `FastVisionModel.from_pretrained` returns for an image-text family (Qwen2-VL, Qwen2.5-VL, Llama 3.2
    Vision).

    A CausalLM: LoRA (get_peft_model), counts, adapter files, `peft_state_dict` and merged export work
    unchanged, driven by the family's name table and its stacks. What differs is the forward pass, which takes
    the processor's image inputs, the family's `IMAGE_INPUTS` (Qwen-VL: `pixel_values`, `image_grid_thw`,
    `mm_token_type_ids`; Mllama: `pixel_values`, `aspect_ratio_ids`, `aspect_ratio_mask`, `cross_attention_mask`),
    by name or positionally after `attention_mask` in that order, and its rotary positions. `prepare_inputs` does
    the host-side part (index arrays, positions, checks); the jitted part takes arrays.
    """

    def _make_forward(self):
        family, cfg = self.family, self.cfg

        def forward(base, lora, meta, input_ids, position_ids, attention_mask, vision, inv_freq, scaling, dropout_key,
                    *, compute_dtype, dropout_rate, options):
            params = combine(base, lora, meta)
            cos, sin = family.position_cos_sin(cfg, inv_freq, scaling, position_ids)
            return family.forward(cfg, params, input_ids, cos, sin, attention_mask, compute_dtype, dropout_key,
                                  dropout_rate, vision=vision, options=options)

        return jax.jit(forward, static_argnames=("compute_dtype", "dropout_rate", "options"))

    # ------------------------------------------------------------------ inputs
    def image_inputs(self, args=(), kwargs=None, where: str = "the model") -> dict:
        """{name: value} of the family's image inputs given positionally (`args`, in `IMAGE_INPUTS` order) and by
        name (`kwargs`); an unknown or repeated name is a TypeError naming the accepted ones."""
        names = tuple(self.family.IMAGE_INPUTS)
        if len(args) > len(names):
            raise TypeError(f"{where} takes at most {len(names)} image inputs after attention_mask ({list(names)}); "
                            f"got {len(args)} positional ones")
        images = dict(zip(names, args))
        for key, value in (kwargs or {}).items():
            if key not in names:
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}; this model's image inputs are "
                                f"{list(names)}")
            if key in images:
                raise TypeError(f"{where} got multiple values for {key!r}")
            images[key] = value
        return images

    def prepare_inputs(self, input_ids, attention_mask=None, *images, position_ids=None, **named_images) -> dict:
        """The processor's outputs as the arrays the jitted forward and loss take (the family's `prepare_inputs`,
        e.g. qwen2_vl.prepare_inputs: `input_ids`, `attention_mask`, `position_ids` and `vision`)."""
        return self.family.prepare_inputs(self.cfg, input_ids, attention_mask, position_ids=position_ids,
                                          **self.image_inputs(images, named_images, "prepare_inputs()"))

    def _rope(self, position_ids):
        """The family's rotary tables for these positions (host side: the variant may depend on the longest)."""
        inv_freq, scaling = self.family.rope_tables(self.config, self.cfg, int(np.max(position_ids)) + 1)
        return jnp.asarray(inv_freq), jnp.asarray(scaling, jnp.float32)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, *images, position_ids=None, **named_images) -> CausalLMOutput:
        """Logits with the current adapter (if any), without dropout: the HF model in eval mode."""
        return CausalLMOutput(logits=self.apply(self.lora_params, input_ids, attention_mask, *images,
                                                position_ids=position_ids, **named_images))

    def apply(self, lora_params, input_ids, attention_mask=None, *images, position_ids=None, dropout_key=None,
              **named_images):
        """Logits for a given LoRA pytree (None: the base alone). `dropout_key` turns on LoRA dropout."""
        batch = self.prepare_inputs(input_ids, attention_mask, *images, position_ids=position_ids, **named_images)
        dropout_rate = float(self.lora_layout.spec.lora_dropout) if self.lora_layout is not None else 0.0
        mask = batch["attention_mask"]
        with self._on_mesh():
            return self._forward(self.base_params, lora_params, self.lora_meta if lora_params is not None else None,
                                 jnp.asarray(batch["input_ids"]), jnp.asarray(batch["position_ids"]),
                                 None if mask is None else jnp.asarray(mask), batch["vision"],
                                 *self._rope(batch["position_ids"]), dropout_key,
                                 compute_dtype=self.dtype,
                                 dropout_rate=dropout_rate if dropout_key is not None else 0.0,
                                 options=self.kernel_options)

    def rotary_cos_sin(self, position_ids) -> tuple[jax.Array, jax.Array]:
        """cos/sin `[batch, seq, head_dim]` in fp32 of the family's positions (Qwen-VL: `[3, batch, seq]`
        multimodal ones, or `[batch, seq]`)."""
        position_ids = np.asarray(position_ids)
        return self.family.position_cos_sin(self.cfg, *self._rope(position_ids), jnp.asarray(position_ids))

    def __repr__(self) -> str:
        c = self.cfg
        quant = "nf4" if self.is_4bit else self.dtype.name
        name = self.family.__name__.rsplit(".", 1)[-1]
        variant = getattr(c.vision, "variant", None)
        stacks = ", ".join(f"{key.removeprefix('model.')}={depth}" for key, depth in self.stacks.items())
        return (f"VisionCausalLM({name}{'/' + variant if variant and variant != name else ''}, {stacks}, "
                f"hidden={c.hidden_size}, weights={quant}, compute={self.dtype.name}, from={self.name_or_path!r})")

    # ------------------------------------------------------------------ loss
    def loss_sum_fn(self, chunk_tokens: int | None = None):
        """`f(base_params, lora_params, input_ids, labels, attention_mask=None, dropout_key=None, position_ids=None,
        vision=None) -> (loss_sum, counted_tokens)`, traceable, with the model's checkpointing mode.
        `position_ids` and `vision` are `prepare_inputs`' (None: text only, positions `arange(seq)`)."""
        from fastlora_jax import training
        family, cfg = self.family, self.cfg
        remat = training.remat_policy(getattr(self, "use_gradient_checkpointing", False), self.kernel_options)
        chunk = chunk_tokens or self.loss_chunk_tokens  # None: training.output_layer_loss picks the mode's default
        dropout_rate = float(self.lora_layout.spec.lora_dropout) if self.lora_layout is not None else 0.0
        compute_dtype = self.dtype
        options = training.step_options(self.kernel_options, getattr(self, "use_gradient_checkpointing", False))
        hf_config = self.config

        def loss_sum(base_params, lora_params, input_ids, labels, attention_mask=None, dropout_key=None,
                     position_ids=None, vision=None):
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
            # the tables of a static rope (every vision family's) do not depend on the length
            inv_freq, scaling = family.rope_tables(hf_config, cfg, input_ids.shape[1])
            cos, sin = family.position_cos_sin(cfg, jnp.asarray(inv_freq), jnp.asarray(scaling, jnp.float32),
                                               position_ids)
            meta = self.lora_meta if lora_params is not None else None
            params = combine(base_params, lora_params, meta)
            rate = dropout_rate if dropout_key is not None else 0.0
            hidden = family.hidden_states(cfg, params, input_ids, cos, sin, attention_mask, compute_dtype,
                                          dropout_key, rate, remat=remat, vision=vision, options=options)
            return training.output_layer_loss(family, cfg, params, lora_params, hidden, labels, dropout_key, rate,
                                              chunk, options)

        return loss_sum

    def compute_loss(self, lora_params, input_ids, labels, attention_mask=None, *images, dropout_key=None,
                     **named_images):
        """The HF model's `.loss` for these labels (shifted inside, -100 ignored, mean over counted tokens),
        computed in chunks so full fp32 logits never exist. Differentiable w.r.t. `lora_params`."""
        if self._loss is None:
            fn = self.loss_sum_fn()
            self._loss = jax.jit(lambda base, lp, ids, lab, mask, key, pos, vision:
                                 _mean(*fn(base, lp, ids, lab, mask, key, pos, vision)))
        batch = self.prepare_inputs(input_ids, attention_mask, *images, **named_images)
        labels = jnp.asarray(as_batch(labels, "labels"))
        if labels.shape != batch["input_ids"].shape:
            raise ValueError(f"labels has shape {labels.shape}; input_ids has {batch['input_ids'].shape}")
        mask = batch["attention_mask"]
        with self._on_mesh():
            return self._loss(self.base_params, lora_params, jnp.asarray(batch["input_ids"]), labels,
                              None if mask is None else jnp.asarray(mask), dropout_key,
                              jnp.asarray(batch["position_ids"]), batch["vision"])

    def prepare_training_batch(self, batch) -> dict:
        """A collator's batch (`UnslothVisionDataCollator`: `input_ids`, `attention_mask`, `labels` and the
        family's image inputs; numpy or torch) as one micro-batch of the train step and the loss:
        `prepare_inputs`' arrays plus `labels [B, S]` int32."""
        if batch.get("input_ids") is None or batch.get("labels") is None:
            raise ValueError(f"the batch needs input_ids and labels; got keys {sorted(batch)}")
        images = {k: batch[k] for k in self.family.IMAGE_INPUTS if batch.get(k) is not None}
        out = self.prepare_inputs(batch["input_ids"], batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), **images)
        labels = as_batch(batch["labels"], "labels")
        if labels.shape != out["input_ids"].shape:
            raise ValueError(f"labels has shape {labels.shape}; input_ids has {out['input_ids'].shape}")
        return {"input_ids": out["input_ids"], "labels": labels, "attention_mask": out["attention_mask"],
                "position_ids": out["position_ids"], "vision": out["vision"]}

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids=None, attention_mask=None, *images, **kwargs):
        """Token ids `[batch, prompt + new]` (numpy int32) with a KV cache, LoRA unmerged, the images entering
        once at prefill; the keyword arguments are the family's image inputs and
        `fastlora_jax.generation.generate`'s (max_new_tokens, do_sample, temperature, top_p, top_k, eos_token_id,
        pad_token_id, seed, return_dict). `input_ids` may be what the processor returns (a mapping with
        input_ids, attention_mask and the image inputs).

        As transformers' generate: left-padded prompts, the family's positions of the prompt (Qwen-VL's
        multimodal ones, `rope_deltas`), each new token at the prompt's largest position + 1, + 2, ...; Mllama's
        new tokens take the cross-attention mask row of the prompt's last token."""
        from fastlora_jax.generation import generate
        names = tuple(self.family.IMAGE_INPUTS)
        named = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if hasattr(input_ids, "keys") and "input_ids" in input_ids:
            inputs = input_ids
            input_ids = inputs["input_ids"]
            attention_mask = inputs.get("attention_mask") if attention_mask is None else attention_mask
            given = self.image_inputs(images, named, "generate()")
            named = {k: given.get(k, inputs.get(k)) for k in names}
            images = ()
        with self._on_mesh():
            return generate(self, input_ids, attention_mask=attention_mask,
                            **self.image_inputs(images, named, "generate()"), **kwargs)
