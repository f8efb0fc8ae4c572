"""The shared decoder: every Llama-like family (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3) is one
`DecoderConfig` over the functions here; a family file is a config translation (`config(hf) -> DecoderConfig`).

The pytree mirrors Hugging Face's module names (`model.layers.N.self_attn.q_proj.weight`) with one
difference: the N decoder layers are stacked along a leading axis, `params["model"]["layers"][...]` has
shape `[num_layers, ...]`, so that the layers run under one `jax.lax.scan` and compile time stays flat in
depth. What differs between layers (a sliding window or not, which rotary table) is scanned per-layer data
(`layer_data`), not a second scan. Linear weights keep torch's `[out, in]` layout (bitsandbytes' for NF4).

What a family module provides (families are modules; `registry.py` maps HF architectures to them):
`ARCHITECTURES`, `MODEL_TYPES`, `config(hf_config)`, `DEFAULT_TARGET_MODULES`, and this module's
functions and constants, re-exported by name (`FAMILY_API`): the name table (`layer_stacks`, `top_tensors`,
`module_list`), the forward pass, the KV cache and the rotary tables. Generic code (loading, quantizing, LoRA
targeting, export) is driven by those tables (registry.py says what each entry means).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import Offloadable, Recompute, checkpoint_name

from fastlora_jax import kernels, rope
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions

EMBED_TOKENS = "model.embed_tokens"  # the input embedding module (a tied lm_head reads its weight)
OUTPUT_LAYER = "lm_head"
CHECKPOINT_RENAMES = ()  # module names are the checkpoint's tensor names
LOAD_RENAMES = ()
LAYER_INPUT = "decoder_layer_input"  # the name checkpointing policies save or offload
# What use_gradient_checkpointing=False keeps (training.remat_policy): the outputs of matmuls and of
# attention; norms, rope and the gated activation are recomputed from them in the backward pass. q/k are
# kept rotated, or as the projections wrote them where q/k norms follow (Qwen3, Gemma 3: the norm's backward
# reads its input, so a rotated q/k alone made the backward run q_proj and k_proj again); likewise the residual
# after attention, or o_proj's output where a norm follows it (Gemma's sandwich norms). Gemma's post-feedforward
# norm reads down_proj's output, which is not kept: False recomputes down_proj there (keeping it would add a
# hidden-sized tensor per token and layer to False's peak).
SAVED_ATTENTION_INPUTS = "attention_qkv"
SAVED_MID_RESIDUAL = "attention_residual"
SAVED_MLP_INPUTS = "mlp_gate_up"
# The RMS-normed inputs of q/k/v and of gate/up: kept only where KernelOptions.false_mode_saves has "normed_inputs"
# (the norms are cheap to recompute, but each recompute is a pass over the hidden states).
SAVED_NORMED_INPUTS = "normed_inputs"
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types
# What use_gradient_checkpointing="unsloth" also offloads with `KernelOptions.lean_offload="attention"`
# (besides the layer input and the fused attention's forward outputs): the backward then recomputes only the
# MLP half of the layer's forward.
ATTENTION_OFFLOAD_NAMES = (SAVED_ATTENTION_INPUTS, SAVED_MID_RESIDUAL)


@cache
def name_primitive():
    """The primitive `checkpoint_name` binds (found by tracing it, not by importing a private module; traced on
    first use, not at import, which must not start a backend)."""
    probe = jax.ShapeDtypeStruct((), jnp.float32)
    return jax.make_jaxpr(lambda x: checkpoint_name(x, "probe"))(probe).eqns[0].primitive


@dataclass(frozen=True)
class HostOffload:
    """The `jax.checkpoint` policy of use_gradient_checkpointing="unsloth": the layer input goes to pinned host
    memory and the layer is recomputed in the backward pass (Unsloth's scheme). With `attention`, q/k/v and the
    residual after attention (the names `use_gradient_checkpointing=False` keeps: ATTENTION_OFFLOAD_NAMES) go to
    the host too, and with `attention_outputs` (`offloads_attention_outputs`) cuDNN attention's output and softmax
    statistics (the `dot_product_attention_fwd` primitive's results): the backward then recomputes only the MLP
    half (without `attention_outputs`, also the attention core from q/k/v; never the q/k/v/o projections).
    `run_layers` decides both for the whole model (`lean_offload_attention`); other stacks (vision towers,
    Mllama's cross-attention layers) use the policy as given."""
    attention: bool = False
    attention_outputs: bool = False  # with `attention`: cuDNN's outputs too (`offloads_attention_outputs`)

    def __call__(self, prim, *_, **params):
        if prim is name_primitive():
            names = (LAYER_INPUT,) + (ATTENTION_OFFLOAD_NAMES if self.attention else ())
            return Offloadable(src="device", dst="pinned_host") if params["name"] in names else Recompute
        if self.attention and self.attention_outputs and prim.name.startswith("dot_product_attention_fwd"):
            return Offloadable(src="device", dst="pinned_host")
        return Recompute


class LanguageModelFields:
    """What generic code reads from a vision-language family's config (counts, loss chunking, repr): the fields
    of its language model, `self.text` (a DecoderConfig)."""

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def num_layers(self) -> int:
        return self.text.num_layers


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the Llama-like families differ in, as data. Defaults are Llama's."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False  # q/k/v projections (or the fused qkv_proj) have biases
    o_bias: bool = False
    mlp_bias: bool = False
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w) RMSNorm, scaled in fp32 (kernels.rms_norm)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # Gemma 2/3: post-attention and pre/post-feedforward norms, four per layer
    fused_qkv: bool = False  # Phi-3: one qkv_proj linear (q, then k, then v rows)
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj linear (gate rows, then up rows)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden), in the compute dtype
    query_scale: float | None = None  # attention scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () means every layer FULL
    sliding_window: int | None = None  # the window of SLIDING layers
    rope_layer_types: tuple[str, ...] = ()  # layer types with their own rotary table (Gemma 3), in table order
    act_module: str = "act_fn"  # the MLP's activation module name (named_modules)
    extra_layer_modules: tuple[str, ...] = ()  # modules without weights at the end of a layer (Phi-3's dropouts)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.hidden_act not in kernels.ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; supported: {sorted(kernels.ACTIVATIONS)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for num_hidden_layers={self.num_layers}")
        unknown = set(self.layer_types) - {FULL, SLIDING}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported; supported: {[FULL, SLIDING]}")

    @classmethod
    def from_hf(cls, hf_config) -> "DecoderConfig":
        """The config of `hf_config`'s family (by its `architectures`; registry.family_for)."""
        from fastlora_jax.models.registry import family_for
        return family_for(hf_config, where="hf_config").config(hf_config)

    @property
    def attention_scale(self) -> float:
        return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within `sliding_window` (transformers: SLIDING and a window set)."""
        types = self.layer_types or (FULL,) * self.num_layers
        return tuple(t == SLIDING and self.sliding_window is not None for t in types)

    @property
    def rope_indices(self) -> tuple[int, ...]:
        """Per layer: which rotary table it reads (0 when the family has one)."""
        if not self.rope_layer_types:
            return (0,) * self.num_layers
        return tuple(self.rope_layer_types.index(t) for t in self.layer_types)


def common_fields(hf_config) -> dict:
    """The DecoderConfig fields every family reads the same way from its HF config."""
    num_heads = hf_config.num_attention_heads
    return dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        layer_types=tuple(getattr(hf_config, "layer_types", None) or ()),
    )


# ---------------------------------------------------------------------------------------------
# The name table. Kinds: "linear" (a weight [out, in] that 4-bit loading quantizes), "linear_bias",
# "norm", "embedding", "lm_head" (the output layer: a linear that stays in `dtype`).


def layer_tensors(cfg: DecoderConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors of one decoder layer, by HF name relative to `model.layers.N.`: (shape, kind)."""
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    t: dict[str, tuple[tuple[int, ...], str]] = {"input_layernorm.weight": ((d,), "norm")}
    if cfg.fused_qkv:
        t["self_attn.qkv_proj.weight"] = ((q_out + 2 * kv_out, d), "linear")
    else:
        t["self_attn.q_proj.weight"] = ((q_out, d), "linear")
        t["self_attn.k_proj.weight"] = ((kv_out, d), "linear")
        t["self_attn.v_proj.weight"] = ((kv_out, d), "linear")
    t["self_attn.o_proj.weight"] = ((d, q_out), "linear")
    if cfg.qk_norm:
        t["self_attn.q_norm.weight"] = ((hd,), "norm")
        t["self_attn.k_norm.weight"] = ((hd,), "norm")
    t["post_attention_layernorm.weight"] = ((d,), "norm")
    if cfg.sandwich_norms:
        t["pre_feedforward_layernorm.weight"] = ((d,), "norm")
        t["post_feedforward_layernorm.weight"] = ((d,), "norm")
    if cfg.fused_gate_up:
        t["mlp.gate_up_proj.weight"] = ((2 * inter, d), "linear")
    else:
        t["mlp.gate_proj.weight"] = ((inter, d), "linear")
        t["mlp.up_proj.weight"] = ((inter, d), "linear")
    t["mlp.down_proj.weight"] = ((d, inter), "linear")
    if cfg.qkv_bias:
        if cfg.fused_qkv:
            t["self_attn.qkv_proj.bias"] = ((q_out + 2 * kv_out,), "linear_bias")
        else:
            t["self_attn.q_proj.bias"] = ((q_out,), "linear_bias")
            t["self_attn.k_proj.bias"] = ((kv_out,), "linear_bias")
            t["self_attn.v_proj.bias"] = ((kv_out,), "linear_bias")
    if cfg.o_bias:
        t["self_attn.o_proj.bias"] = ((d,), "linear_bias")
    if cfg.mlp_bias:
        ups = (("gate_up_proj", 2 * inter),) if cfg.fused_gate_up else (("gate_proj", inter), ("up_proj", inter))
        for name, out in ups + (("down_proj", d),):
            t[f"mlp.{name}.bias"] = ((out,), "linear_bias")
    return t


def layer_stacks(cfg: DecoderConfig) -> dict[str, tuple[int, dict]]:
    """One stack: the decoder layers, `model.layers`."""
    return {"model.layers": (cfg.num_layers, layer_tensors(cfg))}


def top_tensors(cfg: DecoderConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors outside the decoder layers, by full HF name. A tied lm_head is not stored."""
    tensors = {
        "model.embed_tokens.weight": ((cfg.vocab_size, cfg.hidden_size), "embedding"),
        "model.norm.weight": ((cfg.hidden_size,), "norm"),
    }
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), "lm_head")
    return tensors


def module_list(cfg: DecoderConfig) -> list[tuple[str, str]]:
    """(dotted module name, kind) in the order torch's `named_modules()` lists them on the HF model.

    kind is "linear", "embedding" or "other": what PEFT's target matching needs to know.
    """
    modules = [("model", "other"), ("model.embed_tokens", "embedding"), ("model.layers", "other")]
    for i in range(cfg.num_layers):
        modules += decoder_layer_modules(cfg, f"model.layers.{i}")
    modules += [("model.norm", "other"), ("model.rotary_emb", "other"), ("lm_head", "linear")]
    return modules


def decoder_layer_modules(cfg: DecoderConfig, p: str) -> list[tuple[str, str]]:
    """One decoder layer's modules under the prefix `p`, in `named_modules()` order (the order each HF
    module registers its children: Phi-3's attention registers o_proj before qkv_proj)."""
    attn = ("o_proj", "qkv_proj") if cfg.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_up_proj", "down_proj") if cfg.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
    modules = [(p, "other"), (f"{p}.self_attn", "other")]
    modules += [(f"{p}.self_attn.{n}", "linear") for n in attn]
    if cfg.qk_norm:
        modules += [(f"{p}.self_attn.q_norm", "other"), (f"{p}.self_attn.k_norm", "other")]
    modules += [(f"{p}.mlp", "other")]
    modules += [(f"{p}.mlp.{n}", "linear") for n in mlp]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    return modules + [(f"{p}.mlp.{cfg.act_module}", "other")] + [(f"{p}.{n}", "other") for n in norms] + \
        [(f"{p}.{n}", "other") for n in cfg.extra_layer_modules]


# ---------------------------------------------------------------------------------------------
# Rotary tables (host side: their variant may depend on the longest position, as transformers' dynamic
# rope update does). One table `[rotary_dim / 2]`, or one per rope layer type `[types, rotary_dim / 2]`.


def rope_tables(hf_config, cfg: DecoderConfig, seq_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`(inv_freq, attention_scaling)`: float32 `[rotary_dim / 2]` and `[]`, or `[types, rotary_dim / 2]` and
    `[types]` for a family with a rotary table per layer type (`cfg.rope_layer_types`)."""
    if not cfg.rope_layer_types:
        inv_freq, scaling = rope.rope_inv_freq(hf_config, seq_len=seq_len)
        return inv_freq, np.float32(scaling)
    tables = [rope.rope_inv_freq(hf_config, seq_len=seq_len, layer_type=t) for t in cfg.rope_layer_types]
    return np.stack([f for f, _ in tables]), np.asarray([s for _, s in tables], np.float32)


def rope_is_dynamic(hf_config, cfg: DecoderConfig) -> bool:
    """Whether the tables depend on the longest position (dynamic NTK, LongRoPE): generation recomputes them."""
    types = cfg.rope_layer_types or (None,)
    return any(rope.rope_parameters(hf_config, layer_type=t)["rope_type"] in ("dynamic", "longrope") for t in types)


def rope_invalidates_cache(hf_config, cfg: DecoderConfig) -> bool:
    """Whether a change of the tables makes the cached keys stale, so generation recomputes the cache:
    LongRoPE's switch from short to long factors (transformers' Phi-3 drops its cache at the switch). Dynamic
    NTK keeps its cache, as transformers' generate does."""
    types = cfg.rope_layer_types or (None,)
    return any(rope.rope_parameters(hf_config, layer_type=t)["rope_type"] == "longrope" for t in types)


def rope_cos_sin(inv_freq, position_ids_bs, attention_scaling, dtype=jnp.float32):
    """cos/sin `[batch, seq, rotary_dim]` of one table, or `[types, batch, seq, rotary_dim]` of stacked ones."""
    inv_freq = jnp.asarray(inv_freq)
    if inv_freq.ndim == 1:
        return rope.rope_cos_sin(inv_freq, position_ids_bs, attention_scaling, dtype)
    return jax.vmap(lambda f, s: rope.rope_cos_sin(f, position_ids_bs, s, dtype))(inv_freq,
                                                                                  jnp.asarray(attention_scaling))


def rotary_cos_sin(hf_config, cfg: DecoderConfig, position_ids_bs) -> tuple[jax.Array, jax.Array]:
    """cos/sin in fp32 for these positions, the tables chosen by the longest one (host-side positions)."""
    seq_len = int(np.max(np.asarray(position_ids_bs))) + 1
    inv_freq, scaling = rope_tables(hf_config, cfg, seq_len)
    return rope_cos_sin(inv_freq, jnp.asarray(position_ids_bs), scaling)


def position_cos_sin(cfg: DecoderConfig, inv_freq, scaling, positions_bs):
    """cos/sin of `positions_bs` from `rope_tables`' arrays (traced: generation's jitted steps take them)."""
    return rope_cos_sin(inv_freq, positions_bs, scaling)


def generation_inputs(cfg: DecoderConfig, ids_bs, mask_bs, pixel_values=None, image_grid_thw=None,
                      mm_token_type_ids=None):
    """`(positions [B, S], None, last_position [B])` of a left-padded prompt as HF's generate makes them: the
    cumsum of the mask - 1, 0 on padding; each new token is the row's last position + 1."""
    if pixel_values is not None or image_grid_thw is not None:
        raise ValueError("pixel_values / image_grid_thw were given to a text model; load a vision-language model "
                         "with FastVisionModel.from_pretrained")
    positions = np.where(mask_bs == 1, np.cumsum(mask_bs, axis=-1) - 1, 0).astype(np.int32)
    return positions, None, positions[:, -1]


def layer_data(cfg: DecoderConfig) -> dict[str, jax.Array]:
    """What varies from layer to layer, scanned with the layers: `sliding [L]` bool, `rope [L]` int32."""
    return {"sliding": jnp.asarray(cfg.sliding_layers, bool), "rope": jnp.asarray(cfg.rope_indices, jnp.int32)}


def _layer_rope(cos, sin, rope_l):
    """The layer's table: cos/sin are `[b, s, r]` (one table) or `[types, b, s, r]`."""
    if cos.ndim == 4:
        return cos[rope_l], sin[rope_l]
    return cos, sin


def by_window(cfg: DecoderConfig, sliding_l, fn):
    """`fn(window)` with this layer's window (None: full attention). Windows are static arguments of the
    attention kernels, so a family with both kinds picks one of two calls per layer (`lax.cond` on the
    scanned flag); a family with one kind makes one call."""
    kinds = set(cfg.sliding_layers)
    if kinds == {False}:
        return fn(None)
    if kinds == {True}:
        return fn(cfg.sliding_window)
    return jax.lax.cond(sliding_l, lambda: fn(cfg.sliding_window), lambda: fn(None))


# ---------------------------------------------------------------------------------------------
# Forward.


def linear_module(x, module: dict, key=None, dropout_rate: float = 0.0, options: KernelOptions = DEFAULT_OPTIONS):
    """A linear module of the combined tree: base weight (+ bias), plus a LoRA branch when it has one."""
    if "lora_A" in module:
        return kernels.lora_linear(x, module, key, dropout_rate, options=options)
    return kernels.linear(x, module["weight"], module.get("bias"))


_linear = linear_module  # the name generic code (training's output layer) reads from a family


def linears(x, modules: list[dict], keys: list, dropout_rate: float = 0.0,
            options: KernelOptions = DEFAULT_OPTIONS) -> list:
    """`[linear_module(x, m, k) for ...]` for modules that read the same x; their LoRA branches share one pass
    over x (kernels.lora_linear_group) when no dropout or DoRA makes them differ."""
    grouped = [i for i, m in enumerate(modules) if "lora_A" in m and "lora_magnitude_vector" not in m]
    no_dropout = dropout_rate == 0.0 or all(k is None for k in keys)
    if len(grouped) < 2 or not no_dropout:
        return [linear_module(x, m, k, dropout_rate, options) for m, k in zip(modules, keys)]
    outs = dict(zip(grouped, kernels.lora_linear_group(x, [modules[i] for i in grouped], options=options)))
    return [outs[i] if i in outs else linear_module(x, m, k, dropout_rate, options)
            for i, (m, k) in enumerate(zip(modules, keys))]


def host_array(x) -> np.ndarray:
    """A processor output (numpy, jax or torch, without importing torch) as numpy; torch's bfloat16, which numpy
    has no dtype for, as float32."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)

def keys_for(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _norm(cfg: DecoderConfig, x, module: dict):
    return kernels.rms_norm(x, module["weight"], cfg.rms_norm_eps, offset=cfg.norm_offset)


def embed(cfg: DecoderConfig, params: dict, input_ids_bs, compute_dtype):
    """The input embeddings in the compute dtype (Gemma: times sqrt(hidden) rounded to that dtype, as HF)."""
    x = kernels.embedding(input_ids_bs, params["model"]["embed_tokens"], compute_dtype)
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(np.float32(cfg.embed_scale)).astype(compute_dtype)  # torch: a float32 buffer, cast
    return x


def decoder_layer_with_attention(cfg: DecoderConfig, layer: dict, x_bsd, cos_bsr, sin_bsr, attend, key=None,
                                 dropout_rate: float = 0.0, options: KernelOptions = DEFAULT_OPTIONS):
    """One decoder layer with the attention core as a callback: `attend(q_bshd, k_bskd, v_bskd) -> (o_bshd, aux)`
    gets the rotated queries/keys and the values of this call's tokens; returns `(x_bsd, aux)`.

    The uncached forward passes plain causal attention; the KV-cache path an attention that writes the cache.
    `cos_bsr`/`sin_bsr` are this layer's rotary table.
    """
    batch, seq, _ = x_bsd.shape
    attn = layer["self_attn"]
    kq, kk, kv, ko, kg, ku, kd = keys_for(key, 7)
    lin = partial(linear_module, dropout_rate=dropout_rate, options=options)
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    h = checkpoint_name(_norm(cfg, x_bsd, layer["input_layernorm"]), SAVED_NORMED_INPUTS)
    if cfg.fused_qkv:
        qkv = lin(h, attn["qkv_proj"], kq)
        q, k, v = qkv[..., :q_out], qkv[..., q_out:q_out + kv_out], qkv[..., q_out + kv_out:]
    else:
        q, k, v = linears(h, [attn["q_proj"], attn["k_proj"], attn["v_proj"]], [kq, kk, kv], dropout_rate, options)
    q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = checkpoint_name(v, SAVED_ATTENTION_INPUTS)
    if cfg.qk_norm:  # the norms' backward reads their input: keep the projections' q/k, recompute norm and rope
        q, k = checkpoint_name(q, SAVED_ATTENTION_INPUTS), checkpoint_name(k, SAVED_ATTENTION_INPUTS)
        q, k = _norm(cfg, q, attn["q_norm"]), _norm(cfg, k, attn["k_norm"])
    q, k = rope.apply_rotary(q, cos_bsr, sin_bsr), rope.apply_rotary(k, cos_bsr, sin_bsr)
    if not cfg.qk_norm:
        q, k = checkpoint_name(q, SAVED_ATTENTION_INPUTS), checkpoint_name(k, SAVED_ATTENTION_INPUTS)
    o, aux = attend(q, k, v)
    attn_out = lin(o.reshape(batch, seq, q_out), attn["o_proj"], ko)
    if cfg.sandwich_norms:  # the norm's backward reads o_proj's output: keep that, recompute x + norm(it)
        x_bsd = x_bsd + _norm(cfg, checkpoint_name(attn_out, SAVED_MID_RESIDUAL), layer["post_attention_layernorm"])
    else:
        x_bsd = checkpoint_name(x_bsd + attn_out, SAVED_MID_RESIDUAL)
    return x_bsd + mlp_block(cfg, layer, x_bsd, (kg, ku, kd), dropout_rate, options), aux


def mlp_block(cfg: DecoderConfig, layer: dict, x_bsd, keys, dropout_rate: float = 0.0,
              options: KernelOptions = DEFAULT_OPTIONS):
    """The feed-forward half of a layer without its residual add: the (pre-feedforward) norm, gate/up, the
    gated activation, down_proj and Gemma's post-feedforward norm. `keys`: the dropout keys of gate, up, down.

    With `options.mlp_tile_tokens` > 0 and more tokens than that (batch x seq), it runs over sequence tiles
    (`tiled_mlp_block`); otherwise over the whole sequence at once."""
    batch, seq, _ = x_bsd.shape
    if options.mlp_tile_tokens and batch * seq > options.mlp_tile_tokens:
        return tiled_mlp_block(cfg, layer, x_bsd, keys, dropout_rate, options)
    return _mlp(cfg, layer, x_bsd, keys, dropout_rate, options, SAVED_MLP_INPUTS)


def mlp_tiles(batch: int, seq: int, tile_tokens: int) -> tuple[int, int]:
    """`(tiles, tile_len)`: the sequence split into equal tiles of at most `tile_tokens` tokens (batch x
    tile_len; at least one position each), as few as that allows, each as short as their count allows; the
    sequence is padded to `tiles * tile_len` (less than `tiles` positions, none when the length divides)."""
    max_len = max(1, tile_tokens // batch)
    tiles = -(-seq // max_len)
    return tiles, -(-seq // tiles)


def tiled_mlp_block(cfg: DecoderConfig, layer: dict, x_bsd, keys, dropout_rate: float = 0.0,
                    options: KernelOptions = DEFAULT_OPTIONS):
    """`mlp_block` over sequence tiles, each tile's MLP under `jax.checkpoint` inside a `lax.map`.

    Why: at long context a layer's `[tokens, intermediate]` gate, up, act(gate) * up and their gradients
    (Llama-3.1-8B at 32768 tokens: 0.9 GiB each in bf16) set the working set of its recompute and backward.
    Here the backward pass recomputes one tile's MLP from the tile's input at a time, so only one tile's
    intermediates are alive; the map keeps compile time flat in the number of tiles. The tiles split the
    sequence axis, not batch x seq, so a batch sharded over a mesh stays sharded; positions padded onto the last
    tile are zeros whose outputs are dropped (they add nothing to any gradient: their cotangent is zero).

    Checkpoint names: none inside a tile. A policy of an enclosing `jax.checkpoint` reaches into the tile's
    (JAX partial-evaluates nested checkpoints with the outer policy), so SAVED_MLP_INPUTS there would make
    use_gradient_checkpointing=False keep every tile's gate/up and undo the point of tiling. A tiled MLP is
    therefore recomputed in the backward pass in every mode, as Unsloth's tiled MLP is; False keeps the tile
    inputs (the SAVED_MID_RESIDUAL it keeps anyway; with sandwich norms that is o_proj's output, from which the
    tile inputs are recomputed elementwise).

    LoRA dropout: each tile draws its masks from the module's key folded with the tile index, so the masks
    differ from the untiled ones (same rate, independent per tile); without dropout tiled equals untiled up
    to the order of the gradient sums over tokens.
    """
    batch, seq, d = x_bsd.shape
    tiles, tile_len = mlp_tiles(batch, seq, options.mlp_tile_tokens)
    pad = tiles * tile_len - seq
    x_pad = jnp.pad(x_bsd, ((0, 0), (0, pad), (0, 0))) if pad else x_bsd
    x_nbtd = jnp.swapaxes(x_pad.reshape(batch, tiles, tile_len, d), 0, 1)
    ffn = {name: module for name, module in layer.items() if name != "self_attn"}  # what _mlp reads

    @partial(jax.checkpoint, prevent_cse=False)
    def one_tile(ffn, keys, x_btd, index):
        tile_keys = [None if k is None else jax.random.fold_in(k, index) for k in keys]
        return _mlp(cfg, ffn, x_btd, tile_keys, dropout_rate, options, None)

    out_nbtd = jax.lax.map(lambda xs: one_tile(ffn, list(keys), *xs), (x_nbtd, jnp.arange(tiles, dtype=jnp.int32)))
    out_bsd = jnp.swapaxes(out_nbtd, 0, 1).reshape(batch, tiles * tile_len, d)
    return out_bsd[:, :seq] if pad else out_bsd


def _mlp(cfg: DecoderConfig, layer: dict, x_bsd, keys, dropout_rate: float, options: KernelOptions,
         saved_name: str | None):
    """`mlp_block`'s math on whatever tokens `x_bsd` holds; `saved_name` tags gate/up for checkpoint policies."""
    mlp = layer["mlp"]
    kg, ku, kd = keys
    lin = partial(linear_module, dropout_rate=dropout_rate, options=options)
    h = _norm(cfg, x_bsd, layer["pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"])
    if saved_name is not None:  # not in sequence tiles, whose checkpoint recomputes the tile anyway
        h = checkpoint_name(h, SAVED_NORMED_INPUTS)
    act = kernels.ACTIVATIONS[cfg.hidden_act]
    gate, up = gate_up_projections(h, mlp, (kg, ku), cfg.intermediate_size, dropout_rate, options, saved_name)
    mlp_out = lin(act(gate) * up, mlp["down_proj"], kd)
    if cfg.sandwich_norms:
        mlp_out = _norm(cfg, mlp_out, layer["post_feedforward_layernorm"])
    return mlp_out


def gate_up_projections(h, mlp: dict, keys, intermediate_size: int, dropout_rate: float, options: KernelOptions,
                        saved_name: str | None):
    """`(gate, up)` of a gated MLP (`mlp` holds gate_proj and up_proj, or Phi's fused gate_up_proj), each tagged
    `saved_name` for checkpoint policies (None: untagged).

    Each half is tagged, not a fused gemm's whole output: kept whole (one stacked residual instead of two copies
    of column halves), the backward's cotangent of the two halves became a pad-and-add fusion at 1.7 TB/s, and the
    Llama-8B 2 x 2048 False step was no faster (H200, session 10); with that cotangent written as one concatenation
    instead, keeping gate/up whole was slower (8B -0.4%, 1B -3.2%, +0.23 GiB peak; session 11, benchmarks/README.md)."""
    kg, ku = keys
    tag = (lambda y: y) if saved_name is None else (lambda y: checkpoint_name(y, saved_name))
    if "gate_up_proj" in mlp:
        gate_up = linear_module(h, mlp["gate_up_proj"], kg, dropout_rate, options)
        gate, up = gate_up[..., :intermediate_size], gate_up[..., intermediate_size:]
    else:
        gate, up = linears(h, [mlp["gate_proj"], mlp["up_proj"]], [kg, ku], dropout_rate, options)
    return tag(gate), tag(up)


def causal_attention(cfg: DecoderConfig, attention_mask_bs, sliding_l, options: KernelOptions = DEFAULT_OPTIONS,
                     block_ids_bs=None):
    """The `attend` callback of the uncached forward: causal attention with this layer's window and the cap;
    `block_ids_bs` (`[batch, seq]`, -1 for text) makes each block bidirectional (Gemma 3's image tokens)."""
    def attend(q, k, v):
        def call(window):
            return kernels.attention(q, k, v, attention_mask_bs, cfg.attention_scale,
                                     logit_softcap=cfg.attn_logit_softcap, sliding_window=window,
                                     impl=options.attention, block_ids_bs=block_ids_bs)
        return by_window(cfg, sliding_l, call), None
    return attend


def decoder_layer(cfg: DecoderConfig, layer: dict, x_bsd, cos_bsr, sin_bsr, attention_mask_bs, key=None,
                  dropout_rate: float = 0.0, options: KernelOptions = DEFAULT_OPTIONS, sliding_l=False,
                  block_ids_bs=None):
    """One decoder layer over a whole sequence (training and uncached forward)."""
    attend = causal_attention(cfg, attention_mask_bs, sliding_l, options, block_ids_bs)
    return decoder_layer_with_attention(cfg, layer, x_bsd, cos_bsr, sin_bsr, attend, key, dropout_rate, options)[0]


def run_layers(cfg: DecoderConfig, layers: dict, x_bsd, cos, sin, attention_mask_bs=None, dropout_key=None,
               dropout_rate: float = 0.0, remat=None, options: KernelOptions = DEFAULT_OPTIONS,
               indices: tuple[int, ...] | None = None, *, block_ids_bs=None):
    """The decoder layers under one scan (also the Qwen-VL language model's); `remat` is a jax.checkpoint policy
    (training.remat_policy). cos/sin: `[b, s, r]` or `[types, b, s, r]` (already in the compute dtype).

    `indices`: which of the config's layers `layers` stacks (their HF layer indices, default all of them), for a
    model whose decoder layers are interleaved with layers of another kind (Mllama's cross-attention layers):
    each layer gets the window, rotary table and dropout key of its own index.
    `block_ids_bs`: bidirectional blocks in every layer's mask (`causal_attention`; Gemma 3's images)."""
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
    data = layer_data(cfg)
    if indices is not None:
        where = jnp.asarray(indices, jnp.int32)
        data = jax.tree.map(lambda a: a[where], data)
        layer_keys = None if layer_keys is None else layer_keys[where]

    def step(x_bsd, xs):
        layer, data, key = xs
        x_bsd = checkpoint_name(x_bsd, LAYER_INPUT)
        cos_l, sin_l = _layer_rope(cos, sin, data["rope"])
        return decoder_layer(cfg, layer, x_bsd, cos_l, sin_l, attention_mask_bs, key, dropout_rate, options,
                             data["sliding"], block_ids_bs), None

    count = jax.tree.leaves(data)[0].shape[0]
    layer_indices = indices or range(cfg.num_layers)
    if isinstance(remat, HostOffload):  # one choice for the model (Mllama runs its decoder layers in parts)
        attention = lean_offload_attention(cfg, x_bsd, range(cfg.num_layers), options)
        remat = replace(remat, attention=attention,
                        attention_outputs=attention and offloads_attention_outputs(cfg, x_bsd, options))
    offloaded = count
    if remat is not None and options.host_offload_bytes is not None:
        per_layer = _host_bytes_per_layer(x_bsd, offload_features(cfg, getattr(remat, "attention", False),
                                                                  getattr(remat, "attention_outputs", False)))
        offloaded = offloaded_layers(layer_indices, per_layer, options.host_offload_bytes)
        if offloaded < count:
            warnings.warn(f"host_offload_bytes={options.host_offload_bytes} holds the inputs of {offloaded} of these "
                          f"{count} decoder layers ({per_layer} bytes each); the other layers keep theirs on the "
                          "device", stacklevel=2)
    if options.unroll_layers:  # one traced copy per layer (KernelOptions.unroll_layers): no stacked residuals.
        # prevent_cse: outside a scan, XLA merged each layer's backward recompute (norms, the gated product) with
        # the forward's own ops, so every recomputed value stayed alive (Llama-3.2-1B 4 x 2048 False on the
        # H200: 10.8 against 8.0 GiB scanned, 3 GiB of it the products silu(gate) * up)
        for i in range(count):
            def layer_step(x_bsd, i=i):  # the layer is read inside the checkpoint, as in the parts below
                return step(x_bsd, jax.tree.map(lambda a: a[i], (layers, data, layer_keys)))[0]
            x_bsd = (layer_step if remat is None else jax.checkpoint(layer_step, policy=remat, prevent_cse=True))(x_bsd)
        return x_bsd
    if offloaded == count:
        if remat is not None:
            step = jax.checkpoint(step, policy=remat, prevent_cse=False)
        x, _ = jax.lax.scan(step, x_bsd, (layers, data, layer_keys))
        return x
    # Host memory holds the inputs of the first `offloaded` layers only: those run under `remat` (which offloads),
    # the rest keep their input on the device. Each part scans over layer numbers and reads its layer from the
    # whole stack (a slice of the stack outside the scan would be a copy of its weights).
    for start, stop, policy in ((0, offloaded, remat), (offloaded, count, jax.checkpoint_policies.nothing_saveable)):
        if start == stop:
            continue

        def indexed_step(x_bsd, i):  # the layer is read INSIDE the checkpoint: a read outside would be an
            xs = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),  # input it saves,
                              (layers, data, layer_keys))  # and the scan would stack every layer's weights
            return step(x_bsd, xs)

        x_bsd, _ = jax.lax.scan(jax.checkpoint(indexed_step, policy=policy, prevent_cse=False), x_bsd,
                                jnp.arange(start, stop))
    return x_bsd


def offloaded_layers(layer_indices, bytes_per_layer: int, host_bytes: int) -> int:
    """How many of these decoder layers (their model-wide indices, ascending) offload their input: those whose
    index is below `host_bytes // bytes_per_layer`, so that across the parts a model runs its decoder layers in
    (Mllama: between its cross-attention layers) the decoder layers' inputs fit in `host_bytes`
    (`KernelOptions.host_offload_bytes`). Only these layers are counted: Mllama's cross-attention layers and the
    vision towers offload under their own checkpoints as before."""
    fit = host_bytes // max(bytes_per_layer, 1)
    return sum(1 for i in layer_indices if i < fit)


def offload_features(cfg: DecoderConfig, attention: bool, cudnn: bool = True) -> int:
    """Per token, how many compute-dtype values one decoder layer offloads under `HostOffload(attention)`: the
    layer input; with `attention` also q, k, v, the residual after attention (or o_proj's output) and, where cuDNN
    runs the attention (`cudnn`), its output and softmax statistics (one fp32 per head: two values)."""
    if not attention:
        return cfg.hidden_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.hidden_size + (q_out + 2 * kv_out) + cfg.hidden_size + (q_out + 2 * cfg.num_heads if cudnn else 0)


def offloads_attention_outputs(cfg: DecoderConfig, x_bsd, options: KernelOptions) -> bool:
    """Whether `HostOffload(attention=True)` can take the attention's own outputs too: where cuDNN runs it, and
    not inside `by_window`'s `lax.cond` (a family with both window kinds): XLA (JAX 0.11.2, H200) fails to compile
    a host offload of a value made inside a cond ("Expected instruction to have shape ... S(5)", Gemma-3-1B).
    Elsewhere the backward recomputes the attention core from the offloaded q/k/v."""
    q = jax.ShapeDtypeStruct((*x_bsd.shape[:2], cfg.num_heads, cfg.head_dim), x_bsd.dtype)
    return len(set(cfg.sliding_layers)) <= 1 and kernels.attention_runs_cudnn(q, cfg.attn_logit_softcap,
                                                                              options.attention)


def layer_forward_flops(cfg: DecoderConfig, batch: int, seq: int) -> float:
    """FLOPs of one decoder layer's forward pass on `batch x seq` tokens: its projections and causal attention
    (each query attends to about half the sequence; to its window where the model has sliding layers: the
    cheaper layer, so that the estimate errs towards not offloading)."""
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = cfg.hidden_size * (2 * q_out + 2 * kv_out) + 3 * cfg.hidden_size * cfg.intermediate_size
    window = cfg.sliding_window if any(cfg.sliding_layers) else None
    attended = seq / 2 if window is None or window >= seq else window
    return 2.0 * batch * seq * weights + 4.0 * batch * seq * attended * q_out


def layer_flops_per_offloaded_byte(cfg: DecoderConfig, x_bsd, options: KernelOptions) -> float:
    """A layer's forward FLOPs per byte it offloads with its attention half (what "auto" compares with
    `options.flops_per_host_byte`)."""
    batch, seq, _ = x_bsd.shape
    features = offload_features(cfg, True, offloads_attention_outputs(cfg, x_bsd, options))
    return layer_forward_flops(cfg, batch, seq) / (batch * seq * features * x_bsd.dtype.itemsize)


def lean_offload_attention(cfg: DecoderConfig, x_bsd, layer_indices, options: KernelOptions) -> bool:
    """Whether these layers (model-wide indices; `run_layers` passes all of the model's, so that Mllama's parts
    choose alike and their inputs stay within one budget) offload their attention half too
    (`HostOffload.attention`), by `options.lean_offload`: never for "layer_input"; for "attention" and "auto" only
    where the host budget (`host_offload_bytes`) holds every one of them with it, counted as `offloaded_layers`
    counts; "auto" then only where `layer_flops_per_offloaded_byte` reaches `options.flops_per_host_byte` (the
    device's matmul rate over its host link: the copy then hides behind the layer's forward compute), and never
    when that is unknown."""
    if options.lean_offload == "layer_input":
        return False
    features = offload_features(cfg, True, offloads_attention_outputs(cfg, x_bsd, options))
    per_layer = _host_bytes_per_layer(x_bsd, features)
    layer_indices = tuple(layer_indices)
    if (options.host_offload_bytes is not None
            and offloaded_layers(layer_indices, per_layer, options.host_offload_bytes) < len(layer_indices)):
        if options.lean_offload == "attention":
            warnings.warn(f"lean_offload='attention': host_offload_bytes={options.host_offload_bytes} does not hold "
                          f"layers {layer_indices} at {per_layer} bytes each; offloading the layer inputs only",
                          stacklevel=3)
        return False
    if options.lean_offload == "attention":
        return True
    return (options.flops_per_host_byte is not None
            and layer_flops_per_offloaded_byte(cfg, x_bsd, options) >= options.flops_per_host_byte)


def _host_bytes_per_layer(x_bsd, features: int) -> int:
    """Host bytes one offloaded layer takes in this process (`features` values per token, `offload_features`):
    each of its devices offloads its share of the batch, the whole batch where it is replicated (a batch that the
    mesh does not divide: `sharding.put_batch`)."""
    nbytes = int(np.prod(x_bsd.shape[:-1])) * features * x_bsd.dtype.itemsize
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else mesh.size
    if devices == 1:
        return nbytes
    local = max(1, devices // jax.process_count())
    return (nbytes // devices if x_bsd.shape[0] % devices == 0 else nbytes) * local


def hidden_states(cfg: DecoderConfig, params: dict, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs=None,
                  compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, remat=None,
                  options: KernelOptions = DEFAULT_OPTIONS):
    """Final normed hidden states `[batch, seq, hidden]` (the loss takes these, never full logits).

    `params` is the combined tree (lora.combine): base weights with LoRA branches and trainable copies
    laid over them. `dropout_key=None` means no LoRA dropout (evaluation).
    """
    x = embed(cfg, params, input_ids_bs, compute_dtype)
    cos, sin = cos_bsr.astype(compute_dtype), sin_bsr.astype(compute_dtype)
    x = run_layers(cfg, params["model"]["layers"], x, cos, sin, attention_mask_bs, dropout_key, dropout_rate, remat,
                   options)
    return _norm(cfg, x, params["model"]["norm"])


def lm_head_module(cfg: DecoderConfig, params: dict) -> dict:
    """The output layer's module dict; a tied head reads the embedding matrix (LoRA on it stays its own)."""
    head = dict(params.get("lm_head", {}))
    if cfg.tie_word_embeddings and "weight" not in head:
        head["weight"] = params["model"]["embed_tokens"]["weight"]
    return head


def logits_of(cfg, params: dict, h_bsd, key=None, dropout_rate: float = 0.0, options: KernelOptions = DEFAULT_OPTIONS):
    """The output layer and the final soft-cap (Gemma 2), in the compute dtype as HF computes `.logits`."""
    logits = linear_module(h_bsd, lm_head_module(cfg, params), key, dropout_rate, options)
    return kernels.reference.softcap(logits, getattr(cfg, "final_logit_softcap", None))


def forward(cfg: DecoderConfig, params: dict, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs=None,
            compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0,
            options: KernelOptions = DEFAULT_OPTIONS):
    """Logits `[batch, seq, vocab]` in the compute dtype, as the HF model's `.logits`."""
    h = hidden_states(cfg, params, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs, compute_dtype,
                      dropout_key, dropout_rate, options=options)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers)
    return logits_of(cfg, params, h, head_key, dropout_rate, options)


# ---------------------------------------------------------------------------------------------
# Inference with a KV cache (generation.py drives these). The cache holds, per layer, the rotated keys
# and the values of every slot written so far: `{"k", "v"}` of shape [num_layers, batch, max_len,
# kv_heads, head_dim], stacked like the layers so that the layer scan carries its own slice.


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache: `{"k", "v"}` zeros of shape [num_layers, batch, max_len, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_attention_allowed(seq: int, max_len: int, cache_index, attention_mask_b_maxlen=None,
                            sliding_window: int | None = None, block_ids_bs=None):
    """Which cache slots each of this call's queries may attend to: `[batch|1, seq, max_len]` bool.

    Query i sits in slot `cache_index + i`; it sees slot j when `j <= cache_index + i` (everything cached
    before this call plus the causal part of the call itself), `cache_index + i - j < sliding_window` with a
    window, and the slot is not padding (`attention_mask_b_maxlen[b, j] == 1`; the mask must already cover
    this call's slots). `block_ids_bs` (this call's tokens, -1 for text): a query also sees the slots of this
    call that share its block (Gemma 3's prefill, images bidirectional).
    """
    query_slot = cache_index + jnp.arange(seq, dtype=jnp.int32)
    key_slot = jnp.arange(max_len, dtype=jnp.int32)
    if block_ids_bs is None:
        allowed = kernels.reference.causal_allowed(query_slot, key_slot, sliding_window)[None]
    else:
        block_ids_bs = jnp.asarray(block_ids_bs, jnp.int32)
        keys = jax.lax.dynamic_update_slice(jnp.full((block_ids_bs.shape[0], max_len), -1, jnp.int32), block_ids_bs,
                                            (jnp.zeros((), jnp.int32), jnp.asarray(cache_index, jnp.int32)))
        allowed = kernels.reference.causal_allowed(query_slot, key_slot, sliding_window, block_ids_bs, keys)
    if attention_mask_b_maxlen is not None:
        allowed = allowed & attention_mask_b_maxlen.astype(bool)[:, None, :]
    return allowed


def cache_writing_attention(k_cache, v_cache, cache_index, allowed_bsL, scale: float,
                            logit_softcap: float | None = None):
    """The `attend` callback of a KV-cache step (one layer's cache slices): write this call's keys and values at
    `cache_index`, attend over the whole cache, and return the updated slices as the aux output."""
    zero = jnp.zeros((), jnp.int32)

    def attend(q, k, v):
        k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (zero, cache_index, zero, zero))
        v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (zero, cache_index, zero, zero))
        o = kernels.cached_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), allowed_bsL, scale,
                                     logit_softcap=logit_softcap)
        return o, (k_all, v_all)

    return attend


def run_layers_cached(cfg: DecoderConfig, layers: dict, x_bsd, cos, sin, cache: dict, cache_index,
                      attention_mask_b_maxlen=None, options: KernelOptions = DEFAULT_OPTIONS,
                      indices: tuple[int, ...] | None = None, *, block_ids_bs=None):
    """`run_layers` writing and reading the KV cache (stacked like `layers`: `indices` as in run_layers;
    `block_ids_bs` as in `cache_attention_allowed`); returns `(x, new_cache)`."""
    seq, max_len = x_bsd.shape[1], cache["k"].shape[2]
    cache_index = jnp.asarray(cache_index, jnp.int32)
    allowed_full = cache_attention_allowed(seq, max_len, cache_index, attention_mask_b_maxlen,
                                           block_ids_bs=block_ids_bs)
    allowed_window = None
    if any(cfg.sliding_layers):
        allowed_window = cache_attention_allowed(seq, max_len, cache_index, attention_mask_b_maxlen,
                                                 cfg.sliding_window, block_ids_bs)
    data = layer_data(cfg)
    if indices is not None:
        data = jax.tree.map(lambda a: a[jnp.asarray(indices, jnp.int32)], data)

    def step(x_bsd, xs):
        layer, data, k_cache, v_cache = xs
        allowed = allowed_full if allowed_window is None else jnp.where(data["sliding"], allowed_window, allowed_full)
        attend = cache_writing_attention(k_cache, v_cache, cache_index, allowed, cfg.attention_scale,
                                         cfg.attn_logit_softcap)
        cos_l, sin_l = _layer_rope(cos, sin, data["rope"])
        return decoder_layer_with_attention(cfg, layer, x_bsd, cos_l, sin_l, attend, options=options)

    x, (k, v) = jax.lax.scan(step, x_bsd, (layers, data, cache["k"], cache["v"]))
    return x, {"k": k, "v": v}


def hidden_states_cached(cfg: DecoderConfig, params: dict, input_ids_bs, cos_bsr, sin_bsr, cache: dict, cache_index,
                         attention_mask_b_maxlen=None, compute_dtype=jnp.float32,
                         options: KernelOptions = DEFAULT_OPTIONS):
    """Final normed hidden states of `input_ids_bs` written at slots `cache_index ...` of `cache`.

    Returns `(hidden [batch, seq, hidden], new_cache)`. `cos_bsr`/`sin_bsr` are for the tokens' own
    positions (which, with left padding, are not their slots). Prefill is a call with the whole prompt
    at `cache_index=0`, a decode step a call with one token.
    """
    x = embed(cfg, params, input_ids_bs, compute_dtype)
    cos, sin = cos_bsr.astype(compute_dtype), sin_bsr.astype(compute_dtype)
    x, cache = run_layers_cached(cfg, params["model"]["layers"], x, cos, sin, cache, cache_index,
                                 attention_mask_b_maxlen, options)
    return _norm(cfg, x, params["model"]["norm"]), cache


def forward_cached(cfg: DecoderConfig, params: dict, input_ids_bs, cos_bsr, sin_bsr, cache: dict, cache_index,
                   attention_mask_b_maxlen=None, compute_dtype=jnp.float32, last_only: bool = False,
                   options: KernelOptions = DEFAULT_OPTIONS):
    """`(logits, new_cache)`: logits `[batch, seq, vocab]` (`[batch, 1, vocab]` with `last_only`) of the tokens
    written at slots `cache_index ...`, LoRA branches computed unmerged as in `forward` (no dropout)."""
    h, cache = hidden_states_cached(cfg, params, input_ids_bs, cos_bsr, sin_bsr, cache, cache_index,
                                    attention_mask_b_maxlen, compute_dtype, options)
    if last_only:
        h = h[:, -1:]
    return logits_of(cfg, params, h, options=options), cache


# What a text family re-exports from here, by name (registry.py checks that each family has them).
FAMILY_API = ("EMBED_TOKENS", "OUTPUT_LAYER", "CHECKPOINT_RENAMES", "LOAD_RENAMES", "LAYER_INPUT", "layer_stacks",
              "top_tensors", "module_list", "hidden_states", "forward", "forward_cached", "init_cache",
              "lm_head_module", "rope_tables", "rope_is_dynamic", "rope_cos_sin", "rotary_cos_sin", "position_cos_sin",
              "generation_inputs", "rope_invalidates_cache")
