"""Gemma 3 vision-language (`Gemma3ForConditionalGeneration`: Gemma 3 4B, 12B, 27B) as plain functions over a
nested-dict pytree, in transformers 5.17's layout.

Module names are transformers' (`model.vision_tower.encoder.layers.N.self_attn.q_proj`,
`model.multi_modal_projector.mm_input_projection_weight`, `model.language_model.layers.N.mlp.up_proj`, `lm_head`),
so PEFT keys and targeting come from one table. Two stacks, each on a leading axis under `jax.lax.scan`: the
SigLIP encoder layers and the Gemma 3 decoder layers, which the shared decoder runs (decoder.py, the text
family's `DecoderConfig` from gemma3.py). Checkpoints keep the older layout save_pretrained still writes
(`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head`); Google's
files have `vision_tower.vision_model.*`. `CHECKPOINT_RENAMES` / `LOAD_RENAMES` map between them.

What is Gemma 3's own:
- the SigLIP tower: a patch embedding (a Conv2d with stride = kernel, here a matmul over flattened patches) plus
  learned position embeddings, pre-LayerNorm encoder layers with biases (every patch sees every patch of its
  image), a post-LayerNorm. No pooling head (`vision_use_head=False` in every Gemma 3 config);
- the projector: the patch grid average-pooled to `mm_tokens_per_image` tokens, Gemma's (1 + w) RMSNorm
  (`mm_soft_emb_norm`), then a plain parameter matmul (`mm_input_projection_weight`, `[vision, text]`: not an
  nn.Linear, so neither quantized by bitsandbytes nor a LoRA candidate);
- image features replace the `image_token_id` tokens (not scaled by sqrt(hidden): the text embeddings are);
- the training mask: causal for text, bidirectional among the tokens of each image, driven by `token_type_ids`
  (1 on image tokens; a run of them is one image) exactly as transformers builds it: without `token_type_ids`
  transformers' mask is plain causal, and so is ours. Sliding layers AND their window on top
  (`kernels.reference.causal_allowed`). In generation the block mask applies at prefill only, as transformers'.
- no final-logit soft-cap (Gemma3ForConditionalGeneration applies none, whatever the text config says).

Inputs are the processor's: `pixel_values [images, 3, image_size, image_size]` (all images of the batch, in the
order their tokens appear), `input_ids` with `mm_tokens_per_image` image tokens per image, `token_type_ids`.
Positions are transformers': `arange(seq)` in a forward pass, the attention mask's cumsum in generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax import kernels
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions
from fastlora_jax.models import decoder, gemma3
from fastlora_jax.models.qwen2_vl import layer_norm, scatter_image_embeds

ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
MODEL_TYPES = ("gemma3",)
VISION = True  # FastVisionModel's family: the model takes pixel_values / token_type_ids
IMAGE_INPUTS = ("pixel_values", "token_type_ids")  # the processor's, in this order
EMBED_TOKENS = "model.language_model.embed_tokens"
OUTPUT_LAYER = "lm_head"
VISION_STACK = "model.vision_tower.encoder.layers"
TEXT_STACK = "model.language_model.layers"
# module name -> tensor name as transformers 5.17's save_pretrained writes it, and back (loading accepts those,
# the module names, and Google's `vision_tower.vision_model.*`).
CHECKPOINT_RENAMES = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                      (r"^model\.vision_tower\.", "vision_tower."),
                      (r"^model\.multi_modal_projector\.", "multi_modal_projector."))
LOAD_RENAMES = ((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                (r"^vision_tower\.vision_model\.", "model.vision_tower."), (r"^vision_tower\.", "model.vision_tower."),
                (r"^multi_modal_projector\.", "model.multi_modal_projector."))
DEFAULT_TARGET_MODULES = gemma3.DEFAULT_TARGET_MODULES
LAYER_INPUT = decoder.LAYER_INPUT  # one name for checkpointing policies: encoder and decoder layers


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2


@dataclass(frozen=True)
class Config(decoder.LanguageModelFields):
    text: decoder.DecoderConfig
    vision: VisionConfig
    mm_tokens_per_image: int
    image_token_id: int
    tie_word_embeddings: bool

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        return self.vision.patches_per_side // self.tokens_per_side

    @classmethod
    def from_hf(cls, hf_config) -> "Config":
        if hf_config.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={hf_config.model_type!r} is not a Gemma 3 vision config; "
                             f"supported: {list(MODEL_TYPES)}")
        vc = hf_config.vision_config
        if getattr(vc, "vision_use_head", False):
            raise NotImplementedError("vision_config.vision_use_head=True is not supported (Gemma 3 never reads the "
                                      "SigLIP pooling head); supported: False")
        if vc.hidden_act not in kernels.ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={vc.hidden_act!r} is not supported; "
                             f"supported: {sorted(kernels.ACTIVATIONS)}")
        vision = VisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                              num_layers=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
                              num_channels=vc.num_channels, image_size=int(vc.image_size),
                              patch_size=int(vc.patch_size), layer_norm_eps=float(vc.layer_norm_eps),
                              hidden_act=vc.hidden_act)
        if vision.image_size % vision.patch_size:
            raise ValueError(f"vision_config.image_size={vision.image_size} is not a multiple of "
                             f"patch_size={vision.patch_size}")
        tokens = int(hf_config.mm_tokens_per_image)
        side = math.isqrt(tokens)
        if side * side != tokens or vision.patches_per_side % side:
            raise ValueError(f"mm_tokens_per_image={tokens} must be a square whose side divides the "
                             f"{vision.patches_per_side} patches per side of an image (the projector's average pool)")
        tie = bool(getattr(hf_config, "tie_word_embeddings", True))  # the top-level flag decides, as transformers
        text = replace(gemma3.config(hf_config.text_config), tie_word_embeddings=tie)
        return cls(text=text, vision=vision, mm_tokens_per_image=tokens, image_token_id=int(hf_config.image_token_id),
                   tie_word_embeddings=tie)


def config(hf_config) -> Config:
    return Config.from_hf(hf_config)


# ---------------------------------------------------------------------------------------------
# The name table (kinds as decoder.py's and qwen2_vl.py's; "projection" is the projector's bare parameter).


def vision_layer_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors of one SigLIP encoder layer, by HF name relative to `model.vision_tower.encoder.layers.N.`."""
    e, i = cfg.vision.hidden_size, cfg.vision.intermediate_size
    tensors = {}
    for norm in ("layer_norm1", "layer_norm2"):
        tensors[f"{norm}.weight"] = ((e,), "norm")
        tensors[f"{norm}.bias"] = ((e,), "norm_bias")
    for name, out, fan_in in (("self_attn.q_proj", e, e), ("self_attn.k_proj", e, e), ("self_attn.v_proj", e, e),
                              ("self_attn.out_proj", e, e), ("mlp.fc1", i, e), ("mlp.fc2", e, i)):
        tensors[f"{name}.weight"] = ((out, fan_in), "linear")
        tensors[f"{name}.bias"] = ((out,), "linear_bias")
    return tensors


def layer_stacks(cfg: Config) -> dict[str, tuple[int, dict]]:
    """The encoder layers and the decoder layers, each one stack."""
    return {VISION_STACK: (cfg.vision.num_layers, vision_layer_tensors(cfg)),
            TEXT_STACK: (cfg.text.num_layers, decoder.layer_tensors(cfg.text))}


def top_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors outside the stacks, by full HF module name. A tied lm_head is not stored."""
    v, t = cfg.vision, cfg.text
    tower = "model.vision_tower"
    tensors = {
        f"{EMBED_TOKENS}.weight": ((t.vocab_size, t.hidden_size), "embedding"),
        f"{tower}.embeddings.patch_embedding.weight": ((v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
                                                       "conv"),
        f"{tower}.embeddings.patch_embedding.bias": ((v.hidden_size,), "linear_bias"),
        f"{tower}.embeddings.position_embedding.weight": ((v.num_patches, v.hidden_size), "embedding"),
        f"{tower}.post_layernorm.weight": ((v.hidden_size,), "norm"),
        f"{tower}.post_layernorm.bias": ((v.hidden_size,), "norm_bias"),
        "model.multi_modal_projector.mm_input_projection_weight": ((v.hidden_size, t.hidden_size), "projection"),
        "model.multi_modal_projector.mm_soft_emb_norm.weight": ((v.hidden_size,), "norm"),
        "model.language_model.norm.weight": ((t.hidden_size,), "norm"),
    }
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = ((t.vocab_size, t.hidden_size), "lm_head")
    return tensors


def module_list(cfg: Config) -> list[tuple[str, str]]:
    """(dotted module name, kind) in the order torch's `named_modules()` lists them on the HF model.

    The patch embedding is a Conv2d: kind "other" (LoRA on it is not supported); the position embedding is an
    nn.Embedding."""
    tower = "model.vision_tower"
    modules = [("model", "other"), (tower, "other"), (f"{tower}.embeddings", "other"),
               (f"{tower}.embeddings.patch_embedding", "other"), (f"{tower}.embeddings.position_embedding", "embedding"),
               (f"{tower}.encoder", "other"), (VISION_STACK, "other")]
    for i in range(cfg.vision.num_layers):
        p = f"{VISION_STACK}.{i}"
        modules += [(p, "other"), (f"{p}.layer_norm1", "other"), (f"{p}.self_attn", "other")]
        modules += [(f"{p}.self_attn.{n}", "linear") for n in ("k_proj", "v_proj", "q_proj", "out_proj")]
        modules += [(f"{p}.layer_norm2", "other"), (f"{p}.mlp", "other"), (f"{p}.mlp.activation_fn", "other"),
                    (f"{p}.mlp.fc1", "linear"), (f"{p}.mlp.fc2", "linear")]
    modules += [(f"{tower}.post_layernorm", "other"), ("model.multi_modal_projector", "other"),
                ("model.multi_modal_projector.mm_soft_emb_norm", "other"),
                ("model.multi_modal_projector.avg_pool", "other"),
                ("model.language_model", "other"), (EMBED_TOKENS, "embedding"), (TEXT_STACK, "other")]
    for i in range(cfg.text.num_layers):
        modules += decoder.decoder_layer_modules(cfg.text, f"{TEXT_STACK}.{i}")
    modules += [("model.language_model.norm", "other"), ("model.language_model.rotary_emb", "other"),
                ("lm_head", "linear")]
    return modules


# ---------------------------------------------------------------------------------------------
# Host side: the processor's arrays checked and turned into what the jitted forward takes.


def image_block_ids(token_type_ids_bs) -> np.ndarray:
    """transformers' `get_block_sequence_ids_for_mask`: each run of image tokens (`token_type_ids == 1`) is one
    block, numbered 0, 1, ... along the row; text and padding are -1. `[batch, seq]` int32."""
    is_image = np.asarray(token_type_ids_bs) == 1
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)


def _pixels(cfg: Config, pixel_values) -> np.ndarray | None:
    array = decoder.host_array(pixel_values)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"pixel_values must be floating point; got dtype {array.dtype}")
    v = cfg.vision
    if array.ndim == 4 and array.shape[0] == 0:
        return None  # a batch without images (a collator's empty array)
    expected = (v.num_channels, v.image_size, v.image_size)
    if array.ndim != 4 or array.shape[1:] != expected:
        raise ValueError(f"pixel_values has shape {array.shape}; expected [images, {', '.join(map(str, expected))}] "
                         f"as the Gemma 3 image processor makes it")
    return array.astype(np.float32)


def prepare_inputs(cfg: Config, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                   position_ids=None) -> dict:
    """The processor's outputs as the arrays the jitted forward and loss take:
    `{"input_ids" [B, S] int32, "attention_mask" [B, S] int32 | None, "position_ids" [B, S] int32,
    "vision": {"pixel_values"?, "block_ids"?} | None}`.

    Checks what transformers finds deep inside its forward: `mm_tokens_per_image` image tokens per image. The
    bidirectional blocks come from `token_type_ids` only (transformers: none given, plain causal mask).
    `position_ids` default to transformers' `arange(seq)`.
    """
    from fastlora_jax.model import as_batch
    ids = as_batch(input_ids, "input_ids")
    mask = None
    if attention_mask is not None:
        mask = as_batch(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; input_ids has {ids.shape}")
    vision = {}
    pixels = None if pixel_values is None else _pixels(cfg, pixel_values)
    if pixels is not None:
        found = int((ids == cfg.image_token_id).sum())
        needed = pixels.shape[0] * cfg.mm_tokens_per_image
        if found != needed:
            raise ValueError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but {pixels.shape[0]} "
                             f"images give {needed} features ({cfg.mm_tokens_per_image} each): build the inputs with "
                             f"the model's processor")
        vision["pixel_values"] = pixels
    if token_type_ids is not None:
        types = as_batch(token_type_ids, "token_type_ids")
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids has shape {types.shape}; input_ids has {ids.shape}")
        blocks = image_block_ids(types)
        if (blocks >= 0).any():  # all text: the plain causal mask, on the fused causal kernels
            vision["block_ids"] = blocks
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    else:
        position_ids = as_batch(position_ids, "position_ids")
        if position_ids.shape != ids.shape:
            raise ValueError(f"position_ids has shape {position_ids.shape}; input_ids has {ids.shape}")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int32),
            "vision": vision or None}


# ---------------------------------------------------------------------------------------------
# Generation's contract and the rotary tables: the text model's (a table per layer type).


def generation_inputs(cfg: Config, ids_bs, mask_bs, pixel_values=None, token_type_ids=None):
    """`(positions [B, S], vision | None, last_position [B])` of a left-padded prompt: positions as the text
    families' (the mask's cumsum - 1, transformers' generate), the images and the prefill's block mask."""
    prepared = prepare_inputs(cfg, ids_bs, mask_bs, pixel_values, token_type_ids)
    positions, _, last = decoder.generation_inputs(cfg.text, ids_bs, mask_bs)
    return positions, prepared["vision"], last


def rope_tables(hf_config, cfg: Config, seq_len: int | None):
    return decoder.rope_tables(hf_config.get_text_config(), cfg.text, seq_len)


def rope_is_dynamic(hf_config, cfg: Config) -> bool:
    return decoder.rope_is_dynamic(hf_config.get_text_config(), cfg.text)


def rope_invalidates_cache(hf_config, cfg: Config) -> bool:
    return decoder.rope_invalidates_cache(hf_config.get_text_config(), cfg.text)


def rotary_cos_sin(hf_config, cfg: Config, position_ids_bs):
    return decoder.rotary_cos_sin(hf_config.get_text_config(), cfg.text, position_ids_bs)


rope_cos_sin = decoder.rope_cos_sin


def position_cos_sin(cfg: Config, inv_freq, scaling, positions_bs):
    return decoder.position_cos_sin(cfg.text, inv_freq, scaling, positions_bs)


# ---------------------------------------------------------------------------------------------
# Forward.

_linear = decoder.linear_module
_keys = decoder.keys_for


def patch_embeddings(v: VisionConfig, embeddings: dict, pixels_nchw, compute_dtype):
    """SigLIP's embeddings `[images, patches, hidden]`: the stride-P Conv2d as a matmul over each patch's
    (channel, row, column) values, patches row-major as the conv's flatten(2) orders them, plus the learned
    position embeddings."""
    n, g, p = pixels_nchw.shape[0], v.patches_per_side, v.patch_size
    x = jnp.asarray(pixels_nchw).astype(compute_dtype).reshape(n, v.num_channels, g, p, g, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, v.num_channels * p * p)
    conv = embeddings["patch_embedding"]
    w = kernels.dense_weight(conv["weight"], compute_dtype).reshape(v.hidden_size, -1)
    x = kernels.linear(x, w, conv["bias"])
    positions = kernels.embedding(jnp.arange(v.num_patches, dtype=jnp.int32), embeddings["position_embedding"],
                                  compute_dtype)
    return x + positions[None]


def encoder_layer(v: VisionConfig, layer: dict, x_npd, key=None, dropout_rate: float = 0.0,
                  options: KernelOptions = DEFAULT_OPTIONS):
    """One SigLIP encoder layer: x + out_proj(attn(layer_norm1(x))), then + fc2(act(fc1(layer_norm2(x))))."""
    n, p, _ = x_npd.shape
    kq, kk, kv, ko, k1, k2 = _keys(key, 6)
    lin = partial(_linear, dropout_rate=dropout_rate, options=options)
    attn, mlp = layer["self_attn"], layer["mlp"]
    h = layer_norm(x_npd, layer["layer_norm1"]["weight"], layer["layer_norm1"]["bias"], v.layer_norm_eps)
    q, k, values = decoder.linears(h, [attn["q_proj"], attn["k_proj"], attn["v_proj"]], [kq, kk, kv], dropout_rate,
                                   options)
    q, k, values = (checkpoint_name(t.reshape(n, p, v.num_heads, v.head_dim), decoder.SAVED_ATTENTION_INPUTS)
                    for t in (q, k, values))
    o = kernels.masked_attention(q, k, values, None, v.head_dim ** -0.5, impl=options.attention)
    x_npd = checkpoint_name(x_npd + lin(o.reshape(n, p, v.hidden_size), attn["out_proj"], ko),
                            decoder.SAVED_MID_RESIDUAL)
    h = layer_norm(x_npd, layer["layer_norm2"]["weight"], layer["layer_norm2"]["bias"], v.layer_norm_eps)
    up = checkpoint_name(lin(h, mlp["fc1"], k1), decoder.SAVED_MLP_INPUTS)
    return x_npd + lin(kernels.ACTIVATIONS[v.hidden_act](up), mlp["fc2"], k2)


def project(cfg: Config, projector: dict, x_npd):
    """`Gemma3MultiModalProjector`: the patch grid average-pooled `pool_kernel` x `pool_kernel` (in fp32) to
    `mm_tokens_per_image` tokens, the (1 + w) RMSNorm, then the `[vision, text]` projection matmul."""
    n, _, d = x_npd.shape
    t, k = cfg.tokens_per_side, cfg.pool_kernel
    pooled = x_npd.astype(jnp.float32).reshape(n, t, k, t, k, d).mean(axis=(2, 4))
    pooled = pooled.reshape(n, t * t, d).astype(x_npd.dtype)
    normed = kernels.rms_norm(pooled, projector["mm_soft_emb_norm"]["weight"], cfg.vision.layer_norm_eps, offset=1.0)
    w = projector["mm_input_projection_weight"].astype(x_npd.dtype)
    return jnp.einsum("npv,vt->npt", normed, w, preferred_element_type=x_npd.dtype)


def image_features(cfg: Config, params: dict, pixels_nchw, compute_dtype=jnp.float32, dropout_key=None,
                   dropout_rate: float = 0.0, remat=None, options: KernelOptions = DEFAULT_OPTIONS):
    """`[images * mm_tokens_per_image, text hidden]`: the tower, its post-LayerNorm and the projector, images in
    the order of `pixels_nchw` (the order of their tokens in the batch)."""
    v = cfg.vision
    tower = params["model"]["vision_tower"]
    x = patch_embeddings(v, tower["embeddings"], pixels_nchw, compute_dtype)
    keys = None if dropout_key is None else jax.random.split(dropout_key, v.num_layers)

    def step(x_npd, xs):
        layer, key = xs
        x_npd = checkpoint_name(x_npd, LAYER_INPUT)
        return encoder_layer(v, layer, x_npd, key, dropout_rate, options), None

    if remat is not None:
        step = jax.checkpoint(step, policy=remat, prevent_cse=False)
    x, _ = jax.lax.scan(step, x, (tower["encoder"]["layers"], keys))
    post = tower["post_layernorm"]
    x = layer_norm(x, post["weight"], post["bias"], v.layer_norm_eps)
    return project(cfg, params["model"]["multi_modal_projector"], x).reshape(-1, cfg.text.hidden_size)


def _text_params(params: dict) -> dict:
    """The language model's subtree as the shared decoder reads a text model (`params["model"][...]`)."""
    return {"model": params["model"]["language_model"]}


def embed(cfg: Config, params: dict, input_ids_bs, vision: dict | None, compute_dtype, dropout_key=None,
          dropout_rate: float = 0.0, remat=None, options: KernelOptions = DEFAULT_OPTIONS):
    """Text embeddings times sqrt(hidden) (decoder.embed), image features in place of the image tokens. An image
    token outside the vocabulary is looked up as id 0 first (transformers; its row is replaced anyway)."""
    ids = input_ids_bs
    if cfg.image_token_id >= cfg.vocab_size:
        ids = jnp.where(ids == cfg.image_token_id, 0, ids)
    x = decoder.embed(cfg.text, _text_params(params), ids, compute_dtype)
    if vision is not None and "pixel_values" in vision:
        features = image_features(cfg, params, vision["pixel_values"], compute_dtype, dropout_key, dropout_rate, remat,
                                  options)
        x = scatter_image_embeds(x, input_ids_bs == cfg.image_token_id, features)
    return x


def hidden_states(cfg: Config, params: dict, input_ids_bs, cos, sin, attention_mask_bs=None,
                  compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, remat=None, *,
                  vision: dict | None = None, options: KernelOptions = DEFAULT_OPTIONS):
    """Final normed hidden states `[batch, seq, hidden]`; decoder.hidden_states' signature plus `vision`
    (`prepare_inputs`': the images and the bidirectional blocks; None: text only, causal)."""
    vision_key = text_key = None
    if dropout_key is not None:
        vision_key, text_key = jax.random.split(dropout_key)
    x = embed(cfg, params, input_ids_bs, vision, compute_dtype, vision_key, dropout_rate, remat, options)
    blocks = None if vision is None else vision.get("block_ids")
    lm = params["model"]["language_model"]
    x = decoder.run_layers(cfg.text, lm["layers"], x, cos.astype(compute_dtype), sin.astype(compute_dtype),
                           attention_mask_bs, text_key, dropout_rate, remat, options, block_ids_bs=blocks)
    return decoder._norm(cfg.text, x, lm["norm"])


def lm_head_module(cfg: Config, params: dict) -> dict:
    """The output layer's module dict; a tied head reads the embedding matrix (LoRA on it stays its own)."""
    head = dict(params.get("lm_head", {}))
    if cfg.tie_word_embeddings and "weight" not in head:
        head["weight"] = params["model"]["language_model"]["embed_tokens"]["weight"]
    return head


def forward(cfg: Config, params: dict, input_ids_bs, cos, sin, attention_mask_bs=None, compute_dtype=jnp.float32,
            dropout_key=None, dropout_rate: float = 0.0, *, vision: dict | None = None,
            options: KernelOptions = DEFAULT_OPTIONS):
    """Logits `[batch, seq, vocab]` in the compute dtype, as the HF model's `.logits` (no final soft-cap)."""
    h = hidden_states(cfg, params, input_ids_bs, cos, sin, attention_mask_bs, compute_dtype, dropout_key,
                      dropout_rate, vision=vision, options=options)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers)
    return _linear(h, lm_head_module(cfg, params), head_key, dropout_rate, options)


# ---------------------------------------------------------------------------------------------
# Inference with a KV cache (the language model's, decoder.py's layout; the images and their bidirectional
# blocks enter once, at prefill).


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    return decoder.init_cache(cfg.text, batch, max_len, dtype)


def forward_cached(cfg: Config, params: dict, input_ids_bs, cos, sin, cache: dict, cache_index,
                   attention_mask_b_maxlen=None, compute_dtype=jnp.float32, last_only: bool = False, *,
                   vision: dict | None = None, options: KernelOptions = DEFAULT_OPTIONS):
    """`(logits, new_cache)` of the tokens written at slots `cache_index ...` (decoder.forward_cached's contract)."""
    x = embed(cfg, params, input_ids_bs, vision, compute_dtype, options=options)
    blocks = None if vision is None else vision.get("block_ids")
    lm = params["model"]["language_model"]
    x, cache = decoder.run_layers_cached(cfg.text, lm["layers"], x, cos.astype(compute_dtype),
                                         sin.astype(compute_dtype), cache, cache_index, attention_mask_b_maxlen,
                                         options, block_ids_bs=blocks)
    h = decoder._norm(cfg.text, x, lm["norm"])
    if last_only:
        h = h[:, -1:]
    return _linear(h, lm_head_module(cfg, params), options=options), cache
