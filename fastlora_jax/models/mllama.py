"""Llama 3.2 Vision (transformers' `MllamaForConditionalGeneration`) as plain functions over a nested-dict pytree.

What is Mllama's own (and so lives here rather than in the shared decoder):
- the vision encoder (`MllamaVisionModel`): tiles of `image_size` px cut into patches (a Conv2d, computed as a
  matmul over flattened patches), a class token per tile, aspect-ratio embeddings before and after the local
  transformer and a gated position + tile-position embedding, a local transformer and a gated global one
  (tanh gates on attention and MLP), and features from intermediate local layers concatenated to the output;
- the multi-modal projector (a Linear from `vision_output_dim` to the text hidden size);
- the language model's cross-attention layers (`MllamaCrossAttentionDecoderLayer`), which attend from text to
  the projected vision tokens. Images never enter the token sequence: `<|image|>` is one ordinary token (its id
  is the vocabulary size; the embedding has `vocab_size + 8` rows) and only `cross_attention_mask` says which
  text tokens see which image tiles.
The self-attention layers are Llama's decoder layer: the shared decoder (decoder.py) runs them, `cfg.text` is
their `DecoderConfig` (its `num_layers` counts every text layer, so each keeps its HF index's rotary table and
dropout key), the runs of consecutive self-attention layers between cross-attention layers each one
`decoder.run_layers(..., indices=...)` scan.

Stacks (each stored on a leading axis and run under `jax.lax.scan`), keyed by pytree path:
- `model.vision_model.transformer.layers` and `model.vision_model.global_transformer.layers` (HF names as is);
- `model.language_model.layers`: the self-attention layers only, in order;
- `model.language_model.cross_attention_layers`: the cross-attention layers, in order (not an HF module name:
  in transformers both kinds live in one `ModuleList`, `model.language_model.layers.N`).
`stack_layers(cfg)` says which HF layer each stack position is (registry.StackMap reads it), so PEFT names,
`target_modules`, loading and export are those of the HF model.

Checkpoints: transformers 5.17's save_pretrained writes the hub layout (`vision_model.*`,
`language_model.model.*`, `language_model.lm_head.*`, `multi_modal_projector.*`) and loads both that and the
module names (`model.vision_model.*`, ...): `CHECKPOINT_RENAMES` / `LOAD_RENAMES`.

Inputs are what `MllamaProcessor` makes (`IMAGE_INPUTS`): `pixel_values [B, images, tiles, C, H, W]`,
`aspect_ratio_ids [B, images]`, `aspect_ratio_mask [B, images, tiles]`, `cross_attention_mask [B, seq, images,
tiles]`; without `pixel_values` every cross-attention layer is skipped (as transformers does).

Generation: the KV cache holds the self-attention layers' keys/values and, after a prefill with images, each
cross-attention layer's keys/values of the vision tokens (computed once) and the cross-attention mask row that
new tokens take (transformers repeats the prompt's last row).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax import kernels
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions
from fastlora_jax.models import decoder

ARCHITECTURES = ("MllamaForConditionalGeneration",)
MODEL_TYPES = ("mllama",)
VISION = True  # FastVisionModel's family: the model takes the processor's image inputs
IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBED_TOKENS = "model.language_model.embed_tokens"
OUTPUT_LAYER = "lm_head"
VISION_STACK = "model.vision_model.transformer.layers"
GLOBAL_STACK = "model.vision_model.global_transformer.layers"
TEXT_STACK = "model.language_model.layers"
CROSS_STACK = "model.language_model.cross_attention_layers"  # pytree key; HF: model.language_model.layers.N
# module name -> tensor name as transformers 5.17's save_pretrained writes it, and back (loading accepts both).
CHECKPOINT_RENAMES = ((r"^model\.vision_model\.", "vision_model."),
                      (r"^model\.language_model\.", "language_model.model."),
                      (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
                      (r"^lm_head\.", "language_model.lm_head."))
LOAD_RENAMES = ((r"^vision_model\.", "model.vision_model."),
                (r"^language_model\.model\.", "model.language_model."),
                (r"^language_model\.lm_head\.", "lm_head."),
                (r"^multi_modal_projector\.", "model.multi_modal_projector."))
LAYER_INPUT = decoder.LAYER_INPUT  # one name for checkpointing policies: vision, self and cross layers
SAVED_ATTENTION_INPUTS = decoder.SAVED_ATTENTION_INPUTS
SAVED_MID_RESIDUAL = decoder.SAVED_MID_RESIDUAL
SAVED_MLP_INPUTS = decoder.SAVED_MLP_INPUTS
PRE_POST_LAYERNORM_EPS = 1e-5  # layernorm_pre / layernorm_post are nn.LayerNorm(hidden) (not config.norm_eps)
PATCH_MULTIPLE = 8  # transformers pads each tile's tokens (patches + class token) to a multiple of 8
EXTRA_EMBEDDING_ROWS = 8  # the token embedding has vocab_size + 8 rows (the image token is row vocab_size)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int  # the local transformer
    num_global_layers: int
    num_channels: int
    image_size: int  # a tile's side in pixels
    patch_size: int
    max_num_tiles: int
    max_aspect_ratio_id: int  # len(supported_aspect_ratios); id 0 is "no image"
    intermediate_layers_indices: tuple[int, ...]
    vision_output_dim: int
    norm_eps: float
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patches and the class token (transformers' `num_patches`)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        return self.num_patches + (PATCH_MULTIPLE - self.num_patches % PATCH_MULTIPLE) % PATCH_MULTIPLE


@dataclass(frozen=True)
class Config(decoder.LanguageModelFields):
    text: decoder.DecoderConfig  # the self-attention layers (num_layers: every text layer, self and cross)
    vision: VisionConfig
    cross_attention_layers: tuple[int, ...]  # HF indices of the cross-attention layers
    image_token_id: int
    tie_word_embeddings: bool = False  # always False: transformers keeps lm_head separate

    @property
    def embedding_rows(self) -> int:
        """Input ids go up to this (exclusive): the vocabulary plus 8 rows, the image token among them."""
        return self.text.vocab_size + EXTRA_EMBEDDING_ROWS

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.text.num_layers) if i not in self.cross_attention_layers)

    @classmethod
    def from_hf(cls, hf_config) -> "Config":
        if getattr(hf_config, "model_type", None) not in MODEL_TYPES:
            raise ValueError(f"model_type={getattr(hf_config, 'model_type', None)!r} is not an Mllama config; "
                             f"supported: {list(MODEL_TYPES)}")
        tc, vc = hf_config.text_config, hf_config.vision_config
        if tc.hidden_act not in kernels.ACTIVATIONS:
            raise ValueError(f"text_config.hidden_act={tc.hidden_act!r} is not supported; "
                             f"supported: {sorted(kernels.ACTIVATIONS)}")
        if vc.hidden_act not in kernels.ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={vc.hidden_act!r} is not supported; "
                             f"supported: {sorted(kernels.ACTIVATIONS)}")
        num_heads = tc.num_attention_heads
        num_kv_heads = getattr(tc, "num_key_value_heads", None) or num_heads
        if tc.hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"text_config: hidden_size={tc.hidden_size}, num_attention_heads={num_heads}, "
                             f"num_key_value_heads={num_kv_heads} do not divide evenly")
        cross = tuple(int(i) for i in tc.cross_attention_layers)
        if sorted(set(cross)) != list(cross) or any(not 0 <= i < tc.num_hidden_layers for i in cross):
            raise ValueError(f"text_config.cross_attention_layers={list(cross)} must be increasing layer indices in "
                             f"[0, {tc.num_hidden_layers})")
        # Llama's decoder layer: no biases, head_dim = hidden / heads (MllamaTextConfig has no head_dim field)
        text = decoder.DecoderConfig(
            vocab_size=int(tc.vocab_size), hidden_size=int(tc.hidden_size), intermediate_size=int(tc.intermediate_size),
            num_layers=int(tc.num_hidden_layers), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads),
            head_dim=int(tc.hidden_size // num_heads), rms_norm_eps=float(tc.rms_norm_eps), tie_word_embeddings=False,
            hidden_act=tc.hidden_act)
        image_size, patch_size = vc.image_size, vc.patch_size
        if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
            raise NotImplementedError(f"vision_config.image_size={image_size!r} / patch_size={patch_size!r}: only "
                                      "square ints are supported (as transformers' num_patches assumes)")
        indices = tuple(int(i) for i in vc.intermediate_layers_indices)
        if any(not -vc.num_hidden_layers <= i < vc.num_hidden_layers for i in indices):
            raise ValueError(f"vision_config.intermediate_layers_indices={list(indices)} has indices outside the "
                             f"{vc.num_hidden_layers} local layers")
        vision = VisionConfig(
            hidden_size=int(vc.hidden_size), num_heads=int(vc.attention_heads),
            intermediate_size=int(vc.intermediate_size), num_layers=int(vc.num_hidden_layers),
            num_global_layers=int(vc.num_global_layers), num_channels=int(vc.num_channels),
            image_size=int(image_size), patch_size=int(patch_size), max_num_tiles=int(vc.max_num_tiles),
            max_aspect_ratio_id=len(vc.supported_aspect_ratios),
            intermediate_layers_indices=tuple(i % vc.num_hidden_layers for i in indices),
            vision_output_dim=int(vc.vision_output_dim), norm_eps=float(vc.norm_eps), hidden_act=vc.hidden_act)
        if vision.vision_output_dim != vision.hidden_size * (len(indices) + 1):
            raise ValueError(f"vision_config.vision_output_dim={vision.vision_output_dim} must be hidden_size * "
                             f"(1 + len(intermediate_layers_indices)) = {vision.hidden_size * (len(indices) + 1)}")
        if vision.hidden_size % vision.num_heads:
            raise ValueError(f"vision_config.hidden_size={vision.hidden_size} is not a multiple of "
                             f"attention_heads={vision.num_heads}")
        # transformers 5.17 never ties Mllama's lm_head (no _tied_weights_keys; the embedding has 8 more rows).
        return cls(text=text, vision=vision, cross_attention_layers=cross,
                   image_token_id=int(hf_config.image_token_id))


def config(hf_config) -> Config:
    return Config.from_hf(hf_config)


# ---------------------------------------------------------------------------------------------
# The name table. Kinds as decoder.py's ("linear", "linear_bias", "norm", "embedding", "lm_head") and
# qwen2_vl.py's ("conv", "norm_bias"), plus "gate" (a [1] scalar that a tanh turns into a gate) and "param"
# (a bare parameter: the class embedding and the position embedding). Only "linear" is 4-bit quantized.


def vision_layer_tensors(cfg: Config, gated: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """One `MllamaVisionEncoderLayer`, by HF name relative to `...layers.N.` (gated: the global transformer's)."""
    v = cfg.vision
    e, i = v.hidden_size, v.intermediate_size
    tensors = {"gate_attn": ((1,), "gate"), "gate_ffn": ((1,), "gate")} if gated else {}
    tensors.update({f"self_attn.{n}.weight": ((e, e), "linear") for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    tensors.update({
        "mlp.fc1.weight": ((i, e), "linear"), "mlp.fc1.bias": ((i,), "linear_bias"),
        "mlp.fc2.weight": ((e, i), "linear"), "mlp.fc2.bias": ((e,), "linear_bias"),
        "input_layernorm.weight": ((e,), "norm"), "input_layernorm.bias": ((e,), "norm_bias"),
        "post_attention_layernorm.weight": ((e,), "norm"), "post_attention_layernorm.bias": ((e,), "norm_bias"),
    })
    return tensors


def cross_layer_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """One `MllamaCrossAttentionDecoderLayer`, relative to `...layers.N.`."""
    t = cfg.text
    d, f, q_out, kv_out = t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return {"cross_attn_attn_gate": ((1,), "gate"), "cross_attn_mlp_gate": ((1,), "gate"),
            "cross_attn.q_proj.weight": ((q_out, d), "linear"), "cross_attn.k_proj.weight": ((kv_out, d), "linear"),
            "cross_attn.v_proj.weight": ((kv_out, d), "linear"), "cross_attn.o_proj.weight": ((d, q_out), "linear"),
            "cross_attn.q_norm.weight": ((t.head_dim,), "norm"), "cross_attn.k_norm.weight": ((t.head_dim,), "norm"),
            "input_layernorm.weight": ((d,), "norm"),
            "mlp.gate_proj.weight": ((f, d), "linear"), "mlp.up_proj.weight": ((f, d), "linear"),
            "mlp.down_proj.weight": ((d, f), "linear"), "post_attention_layernorm.weight": ((d,), "norm")}


def layer_stacks(cfg: Config) -> dict[str, tuple[int, dict]]:
    """{stack key (pytree path): (depth, {relative tensor name: (shape, kind)})}; `stack_layers` names them.
    The self-attention layers are the shared decoder's (`decoder.layer_tensors`)."""
    return {VISION_STACK: (cfg.vision.num_layers, vision_layer_tensors(cfg, gated=False)),
            GLOBAL_STACK: (cfg.vision.num_global_layers, vision_layer_tensors(cfg, gated=True)),
            TEXT_STACK: (len(cfg.self_attention_layers), decoder.layer_tensors(cfg.text)),
            CROSS_STACK: (len(cfg.cross_attention_layers), cross_layer_tensors(cfg))}


def stack_layers(cfg: Config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{stack key: (HF module prefix, HF layer index of each stack position)}: position j of a stack is the HF
    module `f"{prefix}.{indices[j]}"` (registry.StackMap). Both text stacks live in `model.language_model.layers`."""
    v = cfg.vision
    return {VISION_STACK: (VISION_STACK, tuple(range(v.num_layers))),
            GLOBAL_STACK: (GLOBAL_STACK, tuple(range(v.num_global_layers))),
            TEXT_STACK: (TEXT_STACK, cfg.self_attention_layers),
            CROSS_STACK: (TEXT_STACK, cfg.cross_attention_layers)}


def top_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors outside the stacks, by full HF module name (embeddings first)."""
    v, t = cfg.vision, cfg.text
    e, vm = v.hidden_size, "model.vision_model"
    ratios = v.max_aspect_ratio_id + 1
    tensors = {
        f"{EMBED_TOKENS}.weight": ((cfg.embedding_rows, t.hidden_size), "embedding"),
        f"{vm}.gated_positional_embedding.tile_embedding.weight": ((ratios, v.max_num_tiles * v.num_patches * e),
                                                                    "embedding"),
        f"{vm}.pre_tile_positional_embedding.embedding.weight": ((ratios, v.max_num_tiles * e), "embedding"),
        f"{vm}.post_tile_positional_embedding.embedding.weight": ((ratios, v.max_num_tiles * e), "embedding"),
        f"{vm}.patch_embedding.weight": ((e, v.num_channels, v.patch_size, v.patch_size), "conv"),
        f"{vm}.class_embedding": ((e,), "param"),
        f"{vm}.gated_positional_embedding.embedding": ((v.num_patches, e), "param"),
        f"{vm}.gated_positional_embedding.gate": ((1,), "gate"),
        f"{vm}.pre_tile_positional_embedding.gate": ((1,), "gate"),
        f"{vm}.post_tile_positional_embedding.gate": ((1,), "gate"),
        f"{vm}.layernorm_pre.weight": ((e,), "norm"), f"{vm}.layernorm_pre.bias": ((e,), "norm_bias"),
        f"{vm}.layernorm_post.weight": ((e,), "norm"), f"{vm}.layernorm_post.bias": ((e,), "norm_bias"),
        "model.language_model.norm.weight": ((t.hidden_size,), "norm"),
        "model.multi_modal_projector.weight": ((t.hidden_size, v.vision_output_dim), "linear"),
        "model.multi_modal_projector.bias": ((t.hidden_size,), "linear_bias"),
    }
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = ((t.vocab_size, t.hidden_size), "lm_head")
    return tensors


def _vision_layer_modules(p: str) -> list[tuple[str, str]]:
    modules = [(p, "other"), (f"{p}.self_attn", "other")]
    modules += [(f"{p}.self_attn.{n}", "linear") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    modules += [(f"{p}.mlp", "other"), (f"{p}.mlp.activation_fn", "other"), (f"{p}.mlp.fc1", "linear"),
                (f"{p}.mlp.fc2", "linear")]
    return modules + [(f"{p}.input_layernorm", "other"), (f"{p}.post_attention_layernorm", "other")]


def _cross_layer_modules(p: str) -> list[tuple[str, str]]:
    modules = [(p, "other"), (f"{p}.cross_attn", "other")]
    modules += [(f"{p}.cross_attn.{n}", "linear") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    modules += [(f"{p}.cross_attn.q_norm", "other"), (f"{p}.cross_attn.k_norm", "other"),
                (f"{p}.input_layernorm", "other"), (f"{p}.mlp", "other")]
    modules += [(f"{p}.mlp.{n}", "linear") for n in ("gate_proj", "up_proj", "down_proj")]
    return modules + [(f"{p}.mlp.act_fn", "other"), (f"{p}.post_attention_layernorm", "other")]


def module_list(cfg: Config) -> list[tuple[str, str]]:
    """(dotted module name, kind) in the order torch's `named_modules()` lists them on the HF model.

    Kinds: "linear" (nn.Linear), "embedding" (nn.Embedding: the token embedding and the three tile/aspect-ratio
    embeddings), "other" (the patch embedding is a Conv2d)."""
    v = cfg.vision
    vm = "model.vision_model"
    modules = [("model", "other"), (vm, "other"), (f"{vm}.patch_embedding", "other")]
    modules += [(f"{vm}.gated_positional_embedding", "other"),
                (f"{vm}.gated_positional_embedding.tile_embedding", "embedding")]
    for which in ("pre", "post"):
        modules += [(f"{vm}.{which}_tile_positional_embedding", "other"),
                    (f"{vm}.{which}_tile_positional_embedding.embedding", "embedding")]
    modules += [(f"{vm}.layernorm_pre", "other"), (f"{vm}.layernorm_post", "other")]
    for encoder, depth in (("transformer", v.num_layers), ("global_transformer", v.num_global_layers)):
        modules += [(f"{vm}.{encoder}", "other"), (f"{vm}.{encoder}.layers", "other")]
        for i in range(depth):
            modules += _vision_layer_modules(f"{vm}.{encoder}.layers.{i}")
    modules += [("model.language_model", "other"), (EMBED_TOKENS, "embedding"), (TEXT_STACK, "other")]
    for i in range(cfg.num_layers):
        p = f"{TEXT_STACK}.{i}"
        modules += _cross_layer_modules(p) if i in cfg.cross_attention_layers else \
            decoder.decoder_layer_modules(cfg.text, p)
    return modules + [("model.language_model.norm", "other"), ("model.language_model.rotary_emb", "other"),
                      ("model.multi_modal_projector", "linear"), ("lm_head", "linear")]


# ---------------------------------------------------------------------------------------------
# Forward: shared pieces.

_keys = decoder.keys_for


def layer_norm(x, weight_d, bias_d, eps: float):
    """torch's LayerNorm: statistics and affine in fp32, one cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(x.dtype)


def _gate(g) -> jax.Array:
    """A `[1]` gate parameter as tanh(g), a scalar."""
    return jnp.tanh(g.reshape(()))


def _run_stack(step, x, xs, remat):
    """`jax.lax.scan(step, x, xs)`, under `jax.checkpoint(policy=remat)` when given; returns x."""
    if remat is not None:
        step = jax.checkpoint(step, policy=remat, prevent_cse=False)
    x, _ = jax.lax.scan(step, x, xs)
    return x


def _slice(tree, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], tree)


# ---------------------------------------------------------------------------------------------
# The vision encoder.


def _check_vision_inputs(v: VisionConfig, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
    shape = tuple(pixel_values.shape)
    if len(shape) != 6:
        raise ValueError(f"pixel_values must be [batch, images, tiles, channels, height, width] (MllamaProcessor's "
                         f"layout); got shape {shape}")
    want = (v.max_num_tiles, v.num_channels, v.image_size, v.image_size)
    if shape[2:] != want:
        raise ValueError(f"pixel_values has [tiles, channels, height, width] = {list(shape[2:])}; the config needs "
                         f"{list(want)} (max_num_tiles, num_channels, image_size, image_size)")
    if tuple(aspect_ratio_ids.shape) != shape[:2]:
        raise ValueError(f"aspect_ratio_ids has shape {tuple(aspect_ratio_ids.shape)}; pixel_values needs "
                         f"{shape[:2]} (batch, images)")
    if tuple(aspect_ratio_mask.shape) != shape[:3]:
        raise ValueError(f"aspect_ratio_mask has shape {tuple(aspect_ratio_mask.shape)}; pixel_values needs "
                         f"{shape[:3]} (batch, images, tiles)")


def patch_embed(v: VisionConfig, weight_ecpp, pixel_values_ncHW, compute_dtype):
    """The Conv2d with stride == kernel as a matmul over flattened patches: `[n, C, H, W] -> [n, patches, E]`,
    patches row-major (conv's `flatten(2).transpose(1, 2)`)."""
    n, c, h, w = pixel_values_ncHW.shape
    p = v.patch_size
    x = pixel_values_ncHW.astype(compute_dtype).reshape(n, c, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
    return kernels.linear(x, kernels.dense_weight(weight_ecpp, compute_dtype).reshape(v.hidden_size, -1))


def vision_padding(v: VisionConfig, aspect_ratio_mask_nt):
    """`[n, tiles * padded_patches]` bool: which tokens transformers' vision attention mask calls padding (the
    tokens added to reach a multiple of 8, and every token of a padding tile). Only padding-to-padding pairs are
    masked (`_prepare_aspect_ratio_attention_mask`: the outer product of the two padding indicators); real tokens
    attend to padding tokens too. (transformers' `[:, :, -pad:] = 0` would mark everything with pad = 0, but
    patches^2 + 1 is never a multiple of 8.)"""
    n, tiles = aspect_ratio_mask_nt.shape
    real_patch = jnp.arange(v.padded_patches) < v.num_patches
    real = aspect_ratio_mask_nt.astype(bool)[:, :, None] & real_patch[None, None, :]
    return ~real.reshape(n, tiles * v.padded_patches)


def vision_layer(v: VisionConfig, layer: dict, x_nsd, pad_ns, gated: bool, key=None, dropout_rate: float = 0.0,
                 options: KernelOptions = DEFAULT_OPTIONS):
    """One `MllamaVisionEncoderLayer`: x + [tanh(gate_attn) *] attn(ln(x)), then + [tanh(gate_ffn) *] mlp(ln(x))."""
    n, s, _ = x_nsd.shape
    kq, kk, kv, ko, k1, k2 = _keys(key, 6)
    lin = partial(decoder.linear_module, dropout_rate=dropout_rate, options=options)
    attn, mlp = layer["self_attn"], layer["mlp"]
    ln1, ln2 = layer["input_layernorm"], layer["post_attention_layernorm"]
    h = layer_norm(x_nsd, ln1["weight"], ln1["bias"], v.norm_eps)
    q, k, values = (t.reshape(n, s, v.num_heads, v.head_dim) for t in decoder.linears(
        h, [attn["q_proj"], attn["k_proj"], attn["v_proj"]], [kq, kk, kv], dropout_rate, options))
    q, k, values = (checkpoint_name(t, SAVED_ATTENTION_INPUTS) for t in (q, k, values))
    allowed = ~(pad_ns[:, :, None] & pad_ns[:, None, :])  # transformers masks only padding queries x padding keys
    o = kernels.masked_attention(q, k, values, allowed, v.head_dim ** -0.5, impl=options.attention)
    o = lin(o.reshape(n, s, v.hidden_size), attn["o_proj"], ko)
    if gated:
        o = _gate(layer["gate_attn"]).astype(o.dtype) * o
    x_nsd = checkpoint_name(x_nsd + o, SAVED_MID_RESIDUAL)
    h = layer_norm(x_nsd, ln2["weight"], ln2["bias"], v.norm_eps)
    h = checkpoint_name(lin(h, mlp["fc1"], k1), SAVED_MLP_INPUTS)
    h = lin(kernels.ACTIVATIONS[v.hidden_act](h), mlp["fc2"], k2)
    if gated:
        h = _gate(layer["gate_ffn"]).astype(h.dtype) * h
    return x_nsd + h


def _tile_embedding(module: dict, aspect_ratio_ids_n, shape, dtype):
    return jnp.take(module["weight"], aspect_ratio_ids_n, axis=0).astype(dtype).reshape(shape)


def vision_model(cfg: Config, params: dict, pixel_values_bitchw, aspect_ratio_ids_bi, aspect_ratio_mask_bit,
                 compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, remat=None,
                 options: KernelOptions = DEFAULT_OPTIONS):
    """`MllamaVisionModel(...).last_hidden_state`: `[B, images, tiles, num_patches, vision_output_dim]`, the global
    transformer's output followed by the intermediate local layers' (interleaved feature-major, as transformers'
    `torch.stack(..., dim=-1)` then reshape lays them out)."""
    v = cfg.vision
    vm = params["model"]["vision_model"]
    _check_vision_inputs(v, pixel_values_bitchw, aspect_ratio_ids_bi, aspect_ratio_mask_bit)
    b, images, tiles = pixel_values_bitchw.shape[:3]
    n, e, p, pp = b * images, v.hidden_size, v.num_patches, v.padded_patches
    ids_n = jnp.asarray(aspect_ratio_ids_bi).reshape(n)
    pixels = jnp.asarray(pixel_values_bitchw).reshape(n * tiles, *pixel_values_bitchw.shape[3:])

    x = patch_embed(v, vm["patch_embedding"]["weight"], pixels, compute_dtype).reshape(n, tiles, p - 1, e)
    pre = vm["pre_tile_positional_embedding"]
    x = x + _gate(pre["gate"]).astype(compute_dtype) * _tile_embedding(pre["embedding"], ids_n, (n, tiles, 1, e),
                                                                      compute_dtype)
    cls = jnp.broadcast_to(vm["class_embedding"].astype(compute_dtype), (n, tiles, 1, e))
    x = jnp.concatenate([cls, x], axis=2)
    pos = vm["gated_positional_embedding"]
    gate = _gate(pos["gate"]).astype(compute_dtype)
    x = x + (1 - gate) * pos["embedding"].astype(compute_dtype)
    x = x + gate * _tile_embedding(pos["tile_embedding"], ids_n, (n, tiles, p, e), compute_dtype)
    x = layer_norm(x, vm["layernorm_pre"]["weight"], vm["layernorm_pre"]["bias"], PRE_POST_LAYERNORM_EPS)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pp - p), (0, 0))).reshape(n, tiles * pp, e)
    pad_ns = vision_padding(v, jnp.asarray(aspect_ratio_mask_bit).reshape(n, tiles))

    keys = _keys(dropout_key, 2)
    local_keys = None if keys[0] is None else jax.random.split(keys[0], v.num_layers)
    global_keys = None if keys[1] is None else jax.random.split(keys[1], v.num_global_layers)

    def step(gated):
        def body(x_nsd, layer_and_key):
            layer, key = layer_and_key
            x_nsd = checkpoint_name(x_nsd, LAYER_INPUT)
            return vision_layer(v, layer, x_nsd, pad_ns, gated, key, dropout_rate, options), None
        return body

    # The local transformer in segments that end at each intermediate layer (their outputs are kept).
    local = vm["transformer"]["layers"]
    kept, start = {}, 0
    for stop in sorted({i + 1 for i in v.intermediate_layers_indices} | {v.num_layers}):
        x = _run_stack(step(False), x, (_slice(local, start, stop),
                                        None if local_keys is None else local_keys[start:stop]), remat)
        kept[stop - 1], start = x, stop
    intermediate = jnp.stack([kept[i] for i in v.intermediate_layers_indices], axis=-1)  # [n, s, e, K]

    x = layer_norm(x, vm["layernorm_post"]["weight"], vm["layernorm_post"]["bias"], PRE_POST_LAYERNORM_EPS)
    post = vm["post_tile_positional_embedding"]
    x = x.reshape(n, tiles, pp, e) + _gate(post["gate"]).astype(compute_dtype) * _tile_embedding(
        post["embedding"], ids_n, (n, tiles, 1, e), compute_dtype)
    x = _run_stack(step(True), x.reshape(n, tiles * pp, e), (vm["global_transformer"]["layers"], global_keys), remat)

    x = x.reshape(n, tiles, pp, e)[:, :, :p]
    intermediate = intermediate.reshape(n, tiles, pp, -1)[:, :, :p]
    return jnp.concatenate([x, intermediate], axis=-1).reshape(b, images, tiles, p, v.vision_output_dim)


def cross_attention_states(cfg: Config, params: dict, vision: dict, compute_dtype=jnp.float32, dropout_key=None,
                           dropout_rate: float = 0.0, remat=None, options: KernelOptions = DEFAULT_OPTIONS):
    """The projected vision tokens the cross-attention layers attend to: `[B, images * tiles * num_patches, D]`."""
    keys = _keys(dropout_key, 2)
    features = vision_model(cfg, params, vision["pixel_values"], vision["aspect_ratio_ids"],
                            vision["aspect_ratio_mask"], compute_dtype, keys[0], dropout_rate, remat, options)
    out = decoder.linear_module(features, params["model"]["multi_modal_projector"], keys[1], dropout_rate, options)
    return out.reshape(features.shape[0], -1, cfg.text.hidden_size)


# ---------------------------------------------------------------------------------------------
# The language model.


def cross_attention_allowed(cfg: Config, cross_attention_mask_bsit, dtype):
    """transformers' `_prepare_cross_attention_mask` as `(allowed [B, S, images*tiles*num_patches] bool, row_mask
    [B, S])`: its bias is 0 exactly where `allowed`, `finfo.min` elsewhere.

    A token attends to the tiles where its mask is exactly 1 (each tile is `num_patches` vision tokens). A token
    with no such tile (text before the first image, padding) gets an all-zero bias row: it still attends, unmasked,
    to every vision token, and `row_mask` 0 then removes only its cross-attention MLP output."""
    mask = jnp.asarray(cross_attention_mask_bsit)
    if mask.ndim != 4:
        raise ValueError(f"cross_attention_mask must be [batch, seq, images, tiles] (MllamaProcessor's layout); got "
                         f"shape {tuple(mask.shape)}")
    b, s = mask.shape[:2]
    allowed = jnp.repeat(mask == 1, cfg.vision.num_patches, axis=3).reshape(b, s, -1)
    row = jnp.any(allowed, axis=-1)
    return allowed | ~row[..., None], row.astype(dtype)


def cross_attention_kv(cfg: Config, layer: dict, states_bvd, keys=(None, None), dropout_rate: float = 0.0,
                       options: KernelOptions = DEFAULT_OPTIONS):
    """One cross-attention layer's keys (k_norm'd) and values of the vision tokens: `[B, V, kv_heads, head_dim]`
    each. They depend on the image only, so generation computes them once, at prefill.

    Named for the checkpoint policies as k_proj's output, before k_norm: the norm's backward reads its input, so
    a policy that kept only the normed keys ran k_proj (over every vision token) again in the backward."""
    t = cfg.text
    attn = layer["cross_attn"]
    batch = states_bvd.shape[0]
    k, v = (a.reshape(batch, -1, t.num_kv_heads, t.head_dim) for a in decoder.linears(
        states_bvd, [attn["k_proj"], attn["v_proj"]], list(keys), dropout_rate, options))
    k, v = checkpoint_name(k, SAVED_ATTENTION_INPUTS), checkpoint_name(v, SAVED_ATTENTION_INPUTS)
    return kernels.rms_norm(k, attn["k_norm"]["weight"], t.rms_norm_eps), v


def cross_attention_layer(cfg: Config, layer: dict, x_bsd, states_bvd, allowed_bsv, row_mask_bs, key=None,
                          dropout_rate: float = 0.0, options: KernelOptions = DEFAULT_OPTIONS, kv=None):
    """`MllamaCrossAttentionDecoderLayer`: x + tanh(attn_gate) * cross_attn(ln(x), states), then
    + tanh(mlp_gate) * [row_mask *] mlp(ln(x)). q and k get per-head RMSNorms; no rotary embedding.
    `kv`: the layer's (keys, values) of the vision tokens when already computed (generation; `states_bvd` unused)."""
    t = cfg.text
    batch, seq, _ = x_bsd.shape
    attn, mlp = layer["cross_attn"], layer["mlp"]
    kq, kk, kv_key, ko, kg, ku, kd = _keys(key, 7)
    lin = partial(decoder.linear_module, dropout_rate=dropout_rate, options=options)
    h = kernels.rms_norm(x_bsd, layer["input_layernorm"]["weight"], t.rms_norm_eps)
    q = lin(h, attn["q_proj"], kq).reshape(batch, seq, t.num_heads, t.head_dim)
    # q_proj's output kept (and k_proj's, v_proj's: cross_attention_kv), not the normed q: q_norm's backward
    # reads its input, so keeping q after the norm ran q_proj again; the norms are recomputed
    q = kernels.rms_norm(checkpoint_name(q, SAVED_ATTENTION_INPUTS), attn["q_norm"]["weight"], t.rms_norm_eps)
    if kv is None:
        kv = cross_attention_kv(cfg, layer, states_bvd.astype(x_bsd.dtype), (kk, kv_key), dropout_rate, options)
    k, v = (a.astype(x_bsd.dtype) for a in kv)
    o = kernels.masked_attention(q, k, v, allowed_bsv, t.head_dim ** -0.5, impl=options.attention)
    o = o.reshape(batch, seq, t.num_heads * t.head_dim)
    o = lin(o, attn["o_proj"], ko)
    x_bsd = checkpoint_name(x_bsd + _gate(layer["cross_attn_attn_gate"]).astype(o.dtype) * o, SAVED_MID_RESIDUAL)
    h = kernels.rms_norm(x_bsd, layer["post_attention_layernorm"]["weight"], t.rms_norm_eps)
    gate, up = decoder.gate_up_projections(h, mlp, (kg, ku), t.intermediate_size, dropout_rate, options,
                                           SAVED_MLP_INPUTS)
    h = lin(kernels.ACTIVATIONS[t.hidden_act](gate) * up, mlp["down_proj"], kd)
    if row_mask_bs is not None:
        h = row_mask_bs[..., None].astype(h.dtype) * h
    return x_bsd + _gate(layer["cross_attn_mlp_gate"]).astype(h.dtype) * h


def text_layer_runs(cfg: Config) -> list[tuple[str, int, int]]:
    """The text layers as runs of one kind, in order: `[(stack key, start, stop)]` over stack positions."""
    runs: list[list] = []
    positions = {TEXT_STACK: 0, CROSS_STACK: 0}
    for i in range(cfg.num_layers):
        stack = CROSS_STACK if i in cfg.cross_attention_layers else TEXT_STACK
        if runs and runs[-1][0] == stack:
            runs[-1][2] += 1
        else:
            runs.append([stack, positions[stack], positions[stack] + 1])
        positions[stack] += 1
    return [tuple(r) for r in runs]


def _vision_context(cfg: Config, params, vision, x_bsd, compute_dtype, dropout_key, dropout_rate, remat, options):
    """(states, allowed, row) of the cross-attention layers for `vision` (None: (None, None, None))."""
    if vision is None:
        return None, None, None
    states = cross_attention_states(cfg, params, vision, compute_dtype, dropout_key, dropout_rate, remat, options)
    allowed = row = None
    if vision.get("cross_attention_mask") is not None:
        allowed, row = cross_attention_allowed(cfg, vision["cross_attention_mask"], compute_dtype)
        if allowed.shape[:2] != x_bsd.shape[:2] or allowed.shape[2] != states.shape[1]:
            raise ValueError(f"cross_attention_mask is [batch, seq, images, tiles] = "
                             f"{list(jnp.shape(vision['cross_attention_mask']))}; input_ids are "
                             f"{list(x_bsd.shape[:2])} and pixel_values give {states.shape[1]} vision tokens")
    return states, allowed, row


def hidden_states(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs=None,
                  compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, remat=None, *,
                  vision: dict | None = None, options: KernelOptions = DEFAULT_OPTIONS):
    """Final normed hidden states `[batch, seq, hidden]`.

    `vision`: None (text only: every cross-attention layer is skipped, as transformers does without images) or
    `{pixel_values, aspect_ratio_ids, aspect_ratio_mask[, cross_attention_mask]}` as MllamaProcessor makes them
    (without `cross_attention_mask` every token attends to every vision token and no MLP row is masked)."""
    t = cfg.text
    lm = params["model"]["language_model"]
    x = kernels.embedding(input_ids_bs, lm["embed_tokens"], compute_dtype)
    cos, sin = cos_bsr.astype(compute_dtype), sin_bsr.astype(compute_dtype)
    vision_key, text_key = _keys(dropout_key, 2)
    states, allowed, row = _vision_context(cfg, params, vision, x, compute_dtype, vision_key, dropout_rate, remat,
                                        options)
    layer_keys = None if text_key is None else jax.random.split(text_key, t.num_layers)  # run_layers' split

    def cross_step(x_bsd, layer_and_key):
        layer, key = layer_and_key
        x_bsd = checkpoint_name(x_bsd, LAYER_INPUT)
        return cross_attention_layer(cfg, layer, x_bsd, states, allowed, row, key, dropout_rate, options), None

    hf_index = {stack: indices for stack, (_, indices) in stack_layers(cfg).items()}
    for stack, start, stop in text_layer_runs(cfg):
        indices = hf_index[stack][start:stop]
        if stack == TEXT_STACK:
            x = decoder.run_layers(t, _slice(lm["layers"], start, stop), x, cos, sin, attention_mask_bs, text_key,
                                   dropout_rate, remat, options, indices=indices)
        elif states is not None:
            keys = None if layer_keys is None else layer_keys[jnp.asarray(indices)]
            x = _run_stack(cross_step, x, (_slice(lm["cross_attention_layers"], start, stop), keys), remat)
    return kernels.rms_norm(x, lm["norm"]["weight"], t.rms_norm_eps)


def lm_head_module(cfg: Config, params: dict) -> dict:
    """The output layer's module dict (never tied, see Config.from_hf)."""
    return dict(params.get("lm_head", {}))


def forward(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs=None,
            compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, *, vision: dict | None = None,
            options: KernelOptions = DEFAULT_OPTIONS):
    """Logits `[batch, seq, vocab]` in the compute dtype, as the HF model's `.logits`."""
    h = hidden_states(cfg, params, input_ids_bs, cos_bsr, sin_bsr, attention_mask_bs, compute_dtype, dropout_key,
                      dropout_rate, vision=vision, options=options)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers)
    return decoder.linear_module(h, lm_head_module(cfg, params), head_key, dropout_rate, options)


# ---------------------------------------------------------------------------------------------
# Inputs: the processor's arrays, checked, as the jitted forward and loss take them.



def _int_array(x, name: str) -> np.ndarray:
    array = decoder.host_array(x)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must hold integers (MllamaProcessor's); got dtype {array.dtype}")
    return array.astype(np.int32)


def vision_arrays(cfg: Config, batch: int, seq: int, pixel_values=None, aspect_ratio_ids=None,
                  aspect_ratio_mask=None, cross_attention_mask=None) -> dict | None:
    """The image inputs as the forward takes them (`vision`), checked against each other and the config; None
    without `pixel_values` (text only). An empty image axis (a collator's text-only batch) is text only too."""
    if pixel_values is None:
        given = [n for n, v in (("aspect_ratio_ids", aspect_ratio_ids), ("aspect_ratio_mask", aspect_ratio_mask),
                                ("cross_attention_mask", cross_attention_mask)) if v is not None]
        if given:
            raise ValueError(f"{given} given without pixel_values: they describe images, which go together with "
                             f"their pixel_values (without images the cross-attention layers are skipped)")
        return None
    pixels = decoder.host_array(pixel_values)
    if not (np.issubdtype(pixels.dtype, np.floating) or pixels.dtype.name == "bfloat16"):
        raise ValueError(f"pixel_values must be floating point; got dtype {pixels.dtype}")
    if pixels.ndim == 6 and pixels.shape[1] == 0:
        return None
    if aspect_ratio_ids is None or aspect_ratio_mask is None:
        raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask (MllamaProcessor returns all "
                         "three); got " + ", ".join(f"{n}=None" for n, v in (("aspect_ratio_ids", aspect_ratio_ids),
                                                                             ("aspect_ratio_mask", aspect_ratio_mask))
                                                    if v is None))
    ids, ratio_mask = _int_array(aspect_ratio_ids, "aspect_ratio_ids"), _int_array(aspect_ratio_mask,
                                                                                  "aspect_ratio_mask")
    _check_vision_inputs(cfg.vision, pixels, ids, ratio_mask)
    if pixels.shape[0] != batch:
        raise ValueError(f"pixel_values has batch {pixels.shape[0]}; input_ids has {batch}")
    if ids.min() < 0 or ids.max() > cfg.vision.max_aspect_ratio_id:
        raise ValueError(f"aspect_ratio_ids must be in [0, {cfg.vision.max_aspect_ratio_id}] (0: no image, i: "
                         f"supported_aspect_ratios[i - 1]); got values in [{ids.min()}, {ids.max()}]")
    vision = {"pixel_values": pixels.astype(np.float32), "aspect_ratio_ids": ids, "aspect_ratio_mask": ratio_mask}
    if cross_attention_mask is not None:
        cross = _int_array(cross_attention_mask, "cross_attention_mask")
        want = (batch, seq, pixels.shape[1], cfg.vision.max_num_tiles)
        if cross.shape != want:
            raise ValueError(f"cross_attention_mask has shape {cross.shape}; input_ids and pixel_values need {want} "
                             f"(batch, seq, images, max_num_tiles)")
        vision["cross_attention_mask"] = cross
    return vision


def prepare_inputs(cfg: Config, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None,
                   aspect_ratio_mask=None, cross_attention_mask=None, position_ids=None) -> dict:
    """The processor's outputs as the arrays the jitted forward and loss take: `{"input_ids" [B, S] int32,
    "attention_mask" [B, S] int32 | None, "position_ids" [B, S] int32, "vision": dict | None}`.

    `position_ids` default to `arange(seq)` in every row, as transformers' forward makes them (generate makes its
    own from the mask: `generation_inputs`)."""
    from fastlora_jax.model import as_batch
    ids = as_batch(input_ids, "input_ids")
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.embedding_rows):
        raise ValueError(f"input_ids must be in [0, {cfg.embedding_rows}) (the vocabulary, the image token "
                         f"{cfg.image_token_id} and the embedding's extra rows); got [{ids.min()}, {ids.max()}]")
    mask = None
    if attention_mask is not None:
        mask = as_batch(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; input_ids has {ids.shape}")
    vision = vision_arrays(cfg, *ids.shape, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    else:
        position_ids = as_batch(position_ids, "position_ids")
        if position_ids.shape != ids.shape:
            raise ValueError(f"position_ids has shape {position_ids.shape}; input_ids has {ids.shape}")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int32),
            "vision": vision}


# ---------------------------------------------------------------------------------------------
# Rotary tables: the language model's (Llama 3's rope, from text_config), as the shared decoder computes them.


def rope_tables(hf_config, cfg: Config, seq_len: int | None):
    return decoder.rope_tables(hf_config.text_config, cfg.text, seq_len)


def rope_is_dynamic(hf_config, cfg: Config) -> bool:
    return decoder.rope_is_dynamic(hf_config.text_config, cfg.text)


def rope_invalidates_cache(hf_config, cfg: Config) -> bool:
    return decoder.rope_invalidates_cache(hf_config.text_config, cfg.text)


def position_cos_sin(cfg: Config, inv_freq, scaling, positions_bs):
    return decoder.rope_cos_sin(inv_freq, positions_bs, scaling)


def rotary_cos_sin(hf_config, cfg: Config, position_ids_bs):
    return decoder.rotary_cos_sin(hf_config.text_config, cfg.text, position_ids_bs)


def text_cos_sin(hf_config, position_ids_bs, dtype=jnp.float32):
    """The language model's rotary cos/sin `[B, S, head_dim]` (transformers' rope, llama3 scaling included)."""
    cos, sin = rotary_cos_sin(hf_config, Config.from_hf(hf_config), position_ids_bs)
    return cos.astype(dtype), sin.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Generation. The cache: `{"k", "v"}` [self layers, B, max_len, kv_heads, head_dim] as decoder.py's, plus, once a
# prefill has seen images, `cross_k` / `cross_v` [cross layers, B, vision tokens, kv_heads, head_dim] (each cross
# layer's keys and values of the image, computed once) and `cross_allowed [B, vision tokens]` / `cross_row [B]`: the
# cross-attention mask of the prompt's last token, which transformers repeats for every new token. A cache
# without `cross_k` (a text-only prompt) skips the cross-attention layers, as transformers does.


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    t = cfg.text
    shape = (len(cfg.self_attention_layers), batch, max_len, t.num_kv_heads, t.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def generation_inputs(cfg: Config, ids_bs, mask_bs, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                      cross_attention_mask=None):
    """`(positions [B, S], vision | None, last_position [B])` of a left-padded prompt: positions as transformers'
    generate makes them (the mask's cumsum - 1, 0 on padding), the images as `prepare_inputs` checks them."""
    vision = vision_arrays(cfg, *np.shape(ids_bs), pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                           cross_attention_mask)
    positions, _, last = decoder.generation_inputs(cfg.text, ids_bs, mask_bs)
    return positions, vision, last


def hidden_states_cached(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, cache: dict, cache_index,
                         attention_mask_b_maxlen=None, compute_dtype=jnp.float32, *, vision: dict | None = None,
                         options: KernelOptions = DEFAULT_OPTIONS):
    """decoder.hidden_states_cached for Mllama: `vision` (prefill only) adds each cross-attention layer's vision
    keys/values and the last cross-attention mask row to the cache. Returns `(hidden [B, S, D], new_cache)`."""
    t = cfg.text
    lm = params["model"]["language_model"]
    x = kernels.embedding(input_ids_bs, lm["embed_tokens"], compute_dtype)
    cos, sin = cos_bsr.astype(compute_dtype), sin_bsr.astype(compute_dtype)
    cache = dict(cache)
    allowed = row = None
    if vision is not None:
        states, allowed, row = _vision_context(cfg, params, vision, x, compute_dtype, None, 0.0, None, options)
        kv = jax.lax.map(lambda layer: cross_attention_kv(cfg, layer, states.astype(compute_dtype), options=options),
                         lm["cross_attention_layers"])
        cache["cross_k"], cache["cross_v"] = (a.astype(cache["k"].dtype) for a in kv)
        b, v_tokens = states.shape[:2]
        cache["cross_allowed"] = jnp.ones((b, v_tokens), bool) if allowed is None else allowed[:, -1]
        cache["cross_row"] = jnp.ones((b,), compute_dtype) if row is None else row[:, -1]
    elif "cross_k" in cache:  # a decode step after a prefill with images: the last row, for each new token
        seq = x.shape[1]
        allowed = jnp.broadcast_to(cache["cross_allowed"][:, None],
                                   (x.shape[0], seq, cache["cross_allowed"].shape[-1]))
        row = jnp.broadcast_to(cache["cross_row"][:, None], (x.shape[0], seq))

    def cross_step(x_bsd, xs):
        layer, k, v = xs
        return cross_attention_layer(cfg, layer, x_bsd, None, allowed, row, options=options, kv=(k, v)), None

    hf_index = {stack: indices for stack, (_, indices) in stack_layers(cfg).items()}
    new_k, new_v = [], []
    for stack, start, stop in text_layer_runs(cfg):
        if stack == TEXT_STACK:
            part = {"k": cache["k"][start:stop], "v": cache["v"][start:stop]}
            x, part = decoder.run_layers_cached(t, _slice(lm["layers"], start, stop), x, cos, sin, part, cache_index,
                                                attention_mask_b_maxlen, options,
                                                indices=hf_index[stack][start:stop])
            new_k.append(part["k"])
            new_v.append(part["v"])
        elif "cross_k" in cache:
            x, _ = jax.lax.scan(cross_step, x, (_slice(lm["cross_attention_layers"], start, stop),
                                                cache["cross_k"][start:stop], cache["cross_v"][start:stop]))
    if new_k:
        cache["k"], cache["v"] = jnp.concatenate(new_k), jnp.concatenate(new_v)
    return kernels.rms_norm(x, lm["norm"]["weight"], t.rms_norm_eps), cache


def forward_cached(cfg: Config, params: dict, input_ids_bs, cos_bsr, sin_bsr, cache: dict, cache_index,
                   attention_mask_b_maxlen=None, compute_dtype=jnp.float32, last_only: bool = False, *,
                   vision: dict | None = None, options: KernelOptions = DEFAULT_OPTIONS):
    """`(logits, new_cache)` of the tokens written at slots `cache_index ...` (decoder.forward_cached's contract)."""
    h, cache = hidden_states_cached(cfg, params, input_ids_bs, cos_bsr, sin_bsr, cache, cache_index,
                                    attention_mask_b_maxlen, compute_dtype, vision=vision, options=options)
    if last_only:
        h = h[:, -1:]
    return decoder.linear_module(h, lm_head_module(cfg, params), options=options), cache
