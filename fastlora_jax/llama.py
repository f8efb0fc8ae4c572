"""The Llama family (Llama 2, 3, 3.1, 3.2) as plain functions over a nested-dict pytree.

The pytree mirrors Hugging Face's module names (`model.layers.N.self_attn.q_proj.weight`) with one
difference: the N decoder layers are stacked along a leading axis, `params["model"]["layers"][...]` has
shape `[num_layers, ...]`, so that the layers run under `jax.lax.scan` and compile time stays flat in depth.
Linear weights keep torch's `[out, in]` layout, which is also bitsandbytes' layout for NF4.

A family file provides: `Config.from_hf`, the name table (`layer_stacks`, `top_tensors`, `module_list`,
the constants below) and `forward`. Everything generic (loading, quantizing, LoRA targeting) is driven by
those tables (families.py says what each entry means).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax import kernels, rope

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = ("llama",)  # config.json without `architectures`
EMBED_TOKENS = "model.embed_tokens"  # the input embedding module (a tied lm_head reads its weight)
OUTPUT_LAYER = "lm_head"
CHECKPOINT_RENAMES = ()  # module names are the checkpoint's tensor names
LOAD_RENAMES = ()
LAYER_INPUT = "decoder_layer_input"  # the name checkpointing policies save or offload
# What use_gradient_checkpointing=False keeps (training.remat_policy): the outputs of matmuls and of
# attention; norms, rope and the gated activation are recomputed from them in the backward pass.
SAVED_ATTENTION_INPUTS = "attention_qkv"
SAVED_MID_RESIDUAL = "attention_residual"
SAVED_MLP_INPUTS = "mlp_gate_up"


@dataclass(frozen=True)
class Config:
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
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, hf_config) -> "Config":
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        if hf_config.hidden_act not in kernels.ACTIVATIONS:
            raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported; supported: {sorted(kernels.ACTIVATIONS)}")
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            hidden_act=hf_config.hidden_act,
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        )


# ---------------------------------------------------------------------------------------------
# The name table. Kinds: "linear" (a weight [out, in] that 4-bit loading quantizes), "linear_bias",
# "norm", "embedding", "lm_head" (the output layer: a linear that stays in `dtype`).


def layer_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors of one decoder layer, by HF name relative to `model.layers.N.`: (shape, kind)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    tensors: dict[str, tuple[tuple[int, ...], str]] = {
        "input_layernorm.weight": ((d,), "norm"),
        "self_attn.q_proj.weight": ((q_out, d), "linear"),
        "self_attn.k_proj.weight": ((kv_out, d), "linear"),
        "self_attn.v_proj.weight": ((kv_out, d), "linear"),
        "self_attn.o_proj.weight": ((d, q_out), "linear"),
        "post_attention_layernorm.weight": ((d,), "norm"),
        "mlp.gate_proj.weight": ((cfg.intermediate_size, d), "linear"),
        "mlp.up_proj.weight": ((cfg.intermediate_size, d), "linear"),
        "mlp.down_proj.weight": ((d, cfg.intermediate_size), "linear"),
    }
    if cfg.attention_bias:
        tensors["self_attn.q_proj.bias"] = ((q_out,), "linear_bias")
        tensors["self_attn.k_proj.bias"] = ((kv_out,), "linear_bias")
        tensors["self_attn.v_proj.bias"] = ((kv_out,), "linear_bias")
        tensors["self_attn.o_proj.bias"] = ((d,), "linear_bias")
    if cfg.mlp_bias:
        for name, out in (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size), ("down_proj", d)):
            tensors[f"mlp.{name}.bias"] = ((out,), "linear_bias")
    return tensors


def layer_stacks(cfg: Config) -> dict[str, tuple[int, dict]]:
    """One stack: the decoder layers, `model.layers.N`."""
    return {"model.layers": (cfg.num_layers, layer_tensors(cfg))}


def top_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors outside the decoder layers, by full HF name. A tied lm_head is not stored."""
    tensors = {
        "model.embed_tokens.weight": ((cfg.vocab_size, cfg.hidden_size), "embedding"),
        "model.norm.weight": ((cfg.hidden_size,), "norm"),
    }
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), "lm_head")
    return tensors


def module_list(cfg: Config) -> list[tuple[str, str]]:
    """(dotted module name, kind) in the order torch's `named_modules()` lists them on the HF model.

    kind is "linear", "embedding" or "other": what PEFT's target matching needs to know.
    """
    modules = [("model", "other"), ("model.embed_tokens", "embedding"), ("model.layers", "other")]
    for i in range(cfg.num_layers):
        modules += decoder_layer_modules(f"model.layers.{i}")
    modules += [("model.norm", "other"), ("model.rotary_emb", "other"), ("lm_head", "linear")]
    return modules


def decoder_layer_modules(p: str) -> list[tuple[str, str]]:
    """One Llama decoder layer's modules under the prefix `p`, in `named_modules()` order (Qwen-VL's
    language layers are the same)."""
    modules = [(p, "other"), (f"{p}.self_attn", "other")]
    modules += [(f"{p}.self_attn.{n}", "linear") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    modules += [(f"{p}.mlp", "other")]
    modules += [(f"{p}.mlp.{n}", "linear") for n in ("gate_proj", "up_proj", "down_proj")]
    return modules + [(f"{p}.mlp.act_fn", "other"), (f"{p}.input_layernorm", "other"),
                      (f"{p}.post_attention_layernorm", "other")]


# ---------------------------------------------------------------------------------------------
# Forward.


def _linear(x, module: dict, key=None, dropout_rate: float = 0.0):
    """A linear module of the combined tree: base weight (+ bias), plus a LoRA branch when it has one."""
    if "lora_A" in module:
        return kernels.lora_linear(x, module, key, dropout_rate)
    return kernels.linear(x, module["weight"], module.get("bias"))


def _linears(x, modules: list[dict], keys: list, dropout_rate: float = 0.0) -> list:
    """`[_linear(x, m, k) for ...]` for modules that read the same x; their LoRA branches share one pass
    over x (kernels.lora_linear_group) when no dropout or DoRA makes them differ."""
    grouped = [i for i, m in enumerate(modules) if "lora_A" in m and "lora_magnitude_vector" not in m]
    no_dropout = dropout_rate == 0.0 or all(k is None for k in keys)
    if len(grouped) < 2 or not no_dropout:
        return [_linear(x, m, k, dropout_rate) for m, k in zip(modules, keys)]
    outs = dict(zip(grouped, kernels.lora_linear_group(x, [modules[i] for i in grouped])))
    return [outs[i] if i in outs else _linear(x, m, k, dropout_rate) for i, (m, k) in enumerate(zip(modules, keys))]


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def decoder_layer(cfg: Config, layer: dict, x_bsd, cos_bsr, sin_bsr, attention_mask_bs, key=None,
                  dropout_rate: float = 0.0):
    """One decoder layer over a whole sequence (training and uncached forward)."""
    def attend(q, k, v):
        return kernels.attention(q, k, v, attention_mask_bs, scale=cfg.head_dim ** -0.5), None
    return decoder_layer_with_attention(cfg, layer, x_bsd, cos_bsr, sin_bsr, attend, key, dropout_rate)[0]


def hidden_states(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs=None,
                  compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, remat=None):
    """Final normed hidden states `[batch, seq, hidden]` (the loss takes these, never full logits).

    `params` is the combined tree (lora.combine): base weights with LoRA branches and trainable copies
    laid over them. `dropout_key=None` means no LoRA dropout (evaluation).
    """
    x = kernels.embedding(input_ids_bs, params["model"]["embed_tokens"], compute_dtype)
    cos_bsr, sin_bsr = cos_bsr.astype(compute_dtype), sin_bsr.astype(compute_dtype)
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    def step(x_bsd, layer_and_key):
        layer, key = layer_and_key
        x_bsd = checkpoint_name(x_bsd, LAYER_INPUT)
        return decoder_layer(cfg, layer, x_bsd, cos_bsr, sin_bsr, attention_mask_bs, key, dropout_rate), None

    if remat is not None:  # `remat` is a jax.checkpoint policy (see training.remat_policy)
        step = jax.checkpoint(step, policy=remat, prevent_cse=False)
    x, _ = jax.lax.scan(step, x, (params["model"]["layers"], layer_keys))
    return kernels.rms_norm(x, params["model"]["norm"]["weight"], cfg.rms_norm_eps)


def lm_head_module(cfg: Config, params: dict) -> dict:
    """The output layer's module dict; a tied head reads the embedding matrix (LoRA on it stays its own)."""
    head = dict(params.get("lm_head", {}))
    if cfg.tie_word_embeddings and "weight" not in head:
        head["weight"] = params["model"]["embed_tokens"]["weight"]
    return head


def forward(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs=None,
            compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0):
    """Logits `[batch, seq, vocab]` in the compute dtype, as the HF model's `.logits`."""
    h = hidden_states(cfg, params, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs, compute_dtype,
                      dropout_key, dropout_rate)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers)
    return _linear(h, lm_head_module(cfg, params), head_key, dropout_rate)


# ---------------------------------------------------------------------------------------------
# Inference with a KV cache (generation.py drives these). The cache holds, per layer, the rotated keys
# and the values of every slot written so far: `{"k", "v"}` of shape [num_layers, batch, max_len,
# kv_heads, head_dim], stacked like the layers so that the layer scan carries its own slice.


def decoder_layer_with_attention(cfg: Config, layer: dict, x_bsd, cos_bsr, sin_bsr, attend, key=None,
                                 dropout_rate: float = 0.0):
    """`decoder_layer` with the attention core as a callback: `attend(q_bshd, k_bskd, v_bskd) -> (o_bshd, aux)`
    gets the rotated queries/keys and the values of this call's tokens; returns `(x_bsd, aux)`.

    `decoder_layer` is this function with the plain causal attention; the KV-cache path passes an
    attention that writes the cache first.
    """
    batch, seq, _ = x_bsd.shape
    attn, mlp = layer["self_attn"], layer["mlp"]
    kq, kk, kv, ko, kg, ku, kd = _keys(key, 7)
    lin = partial(_linear, dropout_rate=dropout_rate)

    h = kernels.rms_norm(x_bsd, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
    q, k, v = _linears(h, [attn["q_proj"], attn["k_proj"], attn["v_proj"]], [kq, kk, kv], dropout_rate)
    q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    q, k = rope.apply_rotary(q, cos_bsr, sin_bsr), rope.apply_rotary(k, cos_bsr, sin_bsr)
    q, k, v = (checkpoint_name(t, SAVED_ATTENTION_INPUTS) for t in (q, k, v))
    o, aux = attend(q, k, v)
    x_bsd = x_bsd + lin(o.reshape(batch, seq, cfg.num_heads * cfg.head_dim), attn["o_proj"], ko)
    x_bsd = checkpoint_name(x_bsd, SAVED_MID_RESIDUAL)

    h = kernels.rms_norm(x_bsd, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    act = kernels.ACTIVATIONS[cfg.hidden_act]
    gate, up = _linears(h, [mlp["gate_proj"], mlp["up_proj"]], [kg, ku], dropout_rate)
    gate, up = checkpoint_name(gate, SAVED_MLP_INPUTS), checkpoint_name(up, SAVED_MLP_INPUTS)
    gated = act(gate) * up
    return x_bsd + lin(gated, mlp["down_proj"], kd), aux


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache: `{"k", "v"}` zeros of shape [num_layers, batch, max_len, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_attention_allowed(seq: int, max_len: int, cache_index, attention_mask_b_maxlen=None):
    """Which cache slots each of this call's queries may attend to: `[batch|1, seq, max_len]` bool.

    Query i sits in slot `cache_index + i`; it sees slot j when `j <= cache_index + i` (everything cached
    before this call plus the causal part of the call itself) and the slot is not padding
    (`attention_mask_b_maxlen[b, j] == 1`; the mask must already cover this call's slots).
    """
    query_slot = cache_index + jnp.arange(seq, dtype=jnp.int32)
    allowed_sl = jnp.arange(max_len, dtype=jnp.int32)[None, :] <= query_slot[:, None]
    allowed = allowed_sl[None]
    if attention_mask_b_maxlen is not None:
        allowed = allowed & attention_mask_b_maxlen.astype(bool)[:, None, :]
    return allowed


def cache_writing_attention(k_cache, v_cache, cache_index, allowed_bsL, scale: float):
    """The `attend` callback of a KV-cache step (one layer's cache slices): write this call's keys and values at
    `cache_index`, attend over the whole cache, and return the updated slices as the aux output."""
    zero = jnp.zeros((), jnp.int32)

    def attend(q, k, v):
        k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (zero, cache_index, zero, zero))
        v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (zero, cache_index, zero, zero))
        o = cached_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), allowed_bsL, scale)
        return o, (k_all, v_all)

    return attend


def cached_attention(q_bshd, k_bLkd, v_bLkd, allowed_bsL, scale: float):
    """Grouped-query attention of `seq` queries over `max_len` cached keys with an explicit mask, with the
    arithmetic of `kernels.attention` (fp32 scores and softmax, probabilities cast to the query dtype)."""
    batch, seq, q_heads, head_dim = q_bshd.shape
    kv_heads = k_bLkd.shape[2]
    q_bskgd = q_bshd.reshape(batch, seq, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_bskgd, k_bLkd, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed_bsL[:, None, None], scores, kernels.reference.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_bshd.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_bLkd, preferred_element_type=q_bshd.dtype)
    return out.reshape(batch, seq, q_heads, head_dim)


def hidden_states_cached(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, cache: dict, cache_index,
                         attention_mask_b_maxlen=None, compute_dtype=jnp.float32):
    """Final normed hidden states of `input_ids_bs` written at slots `cache_index ...` of `cache`.

    Returns `(hidden [batch, seq, hidden], new_cache)`. `cos_bsr`/`sin_bsr` are for the tokens' own
    positions (which, with left padding, are not their slots). Prefill is a call with the whole prompt
    at `cache_index=0`, a decode step a call with one token.
    """
    seq = input_ids_bs.shape[1]
    max_len = cache["k"].shape[2]
    x = kernels.embedding(input_ids_bs, params["model"]["embed_tokens"], compute_dtype)
    cos_bsr, sin_bsr = cos_bsr.astype(compute_dtype), sin_bsr.astype(compute_dtype)
    cache_index = jnp.asarray(cache_index, jnp.int32)
    allowed = cache_attention_allowed(seq, max_len, cache_index, attention_mask_b_maxlen)

    def step(x_bsd, layer_and_cache):
        layer, k_cache, v_cache = layer_and_cache
        attend = cache_writing_attention(k_cache, v_cache, cache_index, allowed, cfg.head_dim ** -0.5)
        return decoder_layer_with_attention(cfg, layer, x_bsd, cos_bsr, sin_bsr, attend)

    x, (k, v) = jax.lax.scan(step, x, (params["model"]["layers"], cache["k"], cache["v"]))
    return kernels.rms_norm(x, params["model"]["norm"]["weight"], cfg.rms_norm_eps), {"k": k, "v": v}


def forward_cached(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, cache: dict, cache_index,
                   attention_mask_b_maxlen=None, compute_dtype=jnp.float32, last_only: bool = False):
    """`(logits, new_cache)`: logits `[batch, seq, vocab]` (`[batch, 1, vocab]` with `last_only`) of the tokens
    written at slots `cache_index ...`, LoRA branches computed unmerged as in `forward` (no dropout)."""
    h, cache = hidden_states_cached(cfg, params, input_ids_bs, cos_bsr, sin_bsr, cache, cache_index,
                                    attention_mask_b_maxlen, compute_dtype)
    if last_only:
        h = h[:, -1:]
    return _linear(h, lm_head_module(cfg, params)), cache
