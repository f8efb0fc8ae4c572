"""Qwen2-VL and Qwen2.5-VL as plain functions over a nested-dict pytree: one family, the differences are
config fields (`VisionConfig.variant`).

Module names are transformers 5.17's (`model.visual.blocks.N.attn.qkv`, `model.language_model.layers.N.
self_attn.q_proj`, `lm_head`), so PEFT keys and targeting come from one table. Two stacks of layers, each
stacked on a leading axis and run under `jax.lax.scan`: the vision blocks `model.visual.blocks` and the
Qwen2 decoder layers `model.language_model.layers` (Qwen2's layer: the shared decoder, decoder.py, runs them).
Checkpoints keep the older layout that save_pretrained still writes (`visual.*`, `model.layers.*`,
`model.embed_tokens`, `model.norm`): `CHECKPOINT_RENAMES` / `LOAD_RENAMES` map between the two.

|                    | Qwen2-VL                         | Qwen2.5-VL                                            |
|--------------------|----------------------------------|-------------------------------------------------------|
| vision norms       | LayerNorm (weight, bias)         | RMSNorm                                               |
| vision MLP         | fc1 -> quick_gelu -> fc2         | down(act(gate) * up), with biases                     |
| vision attention   | whole image (each frame)         | windows of `window_size` px, whole image in `fullatt_block_indexes` |
| merger `ln_q`      | LayerNorm                        | RMSNorm                                               |

Inputs are what the HF processor makes: `pixel_values [patches, C*T*P*P]` (all images' patches, each image
block-major over `spatial_merge_size`² blocks), `image_grid_thw [images, 3]`, and `input_ids` holding one
`image_token_id` per merged patch. What transformers computes with Python loops over the grid (the
patches' 2-D rotary positions, the window permutation, attention segments, the multimodal rotary
positions of the tokens) is computed here on the host in numpy (`vision_inputs`, `rope_index`) and enters
the jitted forward as index arrays. Videos are not supported (yet).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax import kernels, rope
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions
from fastlora_jax.models import decoder

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
VISION = True  # FastVisionModel's family: the model takes pixel_values / image_grid_thw
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")  # the processor's, in this order
EMBED_TOKENS = "model.language_model.embed_tokens"
OUTPUT_LAYER = "lm_head"
VISION_STACK = "model.visual.blocks"
TEXT_STACK = "model.language_model.layers"
# module name -> tensor name as transformers 5.17's save_pretrained writes it, and back (loading accepts both).
CHECKPOINT_RENAMES = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model."))
LOAD_RENAMES = ((r"^visual\.", "model.visual."), (r"^model\.(?!language_model\.|visual\.)", "model.language_model."))
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_INPUT = decoder.LAYER_INPUT  # one name for checkpointing policies: vision blocks and decoder layers
VISION_EPS = 1e-6  # every vision norm (blocks and merger) is built with eps=1e-6
ACTIVATIONS = {**kernels.ACTIVATIONS, "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


@dataclass(frozen=True)
class VisionConfig:
    variant: str  # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    hidden_size: int  # the tower's width (Qwen2-VL's `embed_dim`)
    num_heads: int
    intermediate_size: int  # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int  # the merger's output width = the language model's hidden size
    rope_theta: float = 10000.0
    window_size: int = 0  # Qwen2.5-VL: window side in pixels (0: no windows)
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def windowed(self) -> bool:
        return self.variant == "qwen2_5_vl"


@dataclass(frozen=True)
class Config(decoder.LanguageModelFields):
    text: decoder.DecoderConfig
    vision: VisionConfig
    mrope_section: tuple[int, ...]  # rotary frequency pairs driven by the temporal, height, width positions
    rope_theta: float
    image_token_id: int
    video_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf_config) -> "Config":
        variant = hf_config.model_type
        if variant not in MODEL_TYPES:
            raise ValueError(f"model_type={variant!r} is not a Qwen-VL config; supported: {list(MODEL_TYPES)}")
        tc, vc = hf_config.text_config, hf_config.vision_config
        if getattr(tc, "use_sliding_window", False):
            raise NotImplementedError("text_config.use_sliding_window=True is not supported (transformers applies it "
                                      "only with flash attention); use a config with use_sliding_window=False")
        params = dict(getattr(tc, "rope_parameters", None) or {})
        if params.get("rope_type", "default") not in ("default", "mrope"):
            raise NotImplementedError(f"text_config.rope_parameters['rope_type']={params['rope_type']!r} is not "
                                      "supported for Qwen-VL; supported: 'default'")
        num_heads = tc.num_attention_heads
        head_dim = tc.hidden_size // num_heads
        mrope = tuple(int(n) for n in params.get("mrope_section", (16, 24, 24)))
        if 2 * sum(mrope) != head_dim:
            raise ValueError(f"rope_parameters['mrope_section']={list(mrope)} must sum to head_dim/2={head_dim // 2}")
        if tc.hidden_act not in kernels.ACTIVATIONS:
            raise ValueError(f"text_config.hidden_act={tc.hidden_act!r} is not supported; "
                             f"supported: {sorted(kernels.ACTIVATIONS)}")
        tie = bool(getattr(hf_config, "tie_word_embeddings", False))
        text = decoder.DecoderConfig(
            vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
            num_layers=tc.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or num_heads, head_dim=head_dim,
            rms_norm_eps=float(tc.rms_norm_eps), tie_word_embeddings=tie, hidden_act=tc.hidden_act,
            qkv_bias=True)  # Qwen2's layer: q/k/v biases, none on o_proj
        vision_rope = dict(getattr(vc, "rope_parameters", None) or {})
        common = dict(variant=variant, depth=vc.depth, num_heads=vc.num_heads, hidden_act=vc.hidden_act,
                      in_channels=vc.in_channels, patch_size=int(vc.patch_size),
                      temporal_patch_size=int(vc.temporal_patch_size), spatial_merge_size=vc.spatial_merge_size,
                      rope_theta=float(vision_rope.get("rope_theta", 10000.0)))
        if variant == "qwen2_vl":
            vision = VisionConfig(hidden_size=vc.embed_dim, intermediate_size=int(vc.embed_dim * vc.mlp_ratio),
                                  out_hidden_size=vc.hidden_size, **common)
        else:
            vision = VisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                                  out_hidden_size=vc.out_hidden_size, window_size=int(vc.window_size),
                                  fullatt_block_indexes=tuple(int(i) for i in vc.fullatt_block_indexes), **common)
        if vision.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={vision.hidden_act!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"the vision merger outputs {vision.out_hidden_size} features but the language model's "
                             f"hidden_size is {text.hidden_size}")
        return cls(text=text, vision=vision, mrope_section=mrope, rope_theta=float(params.get("rope_theta", 1e6)),
                   image_token_id=int(hf_config.image_token_id), video_token_id=int(hf_config.video_token_id),
                   tie_word_embeddings=tie)


def config(hf_config) -> Config:
    return Config.from_hf(hf_config)


# ---------------------------------------------------------------------------------------------
# The name table (kinds as decoder.py's, plus "conv": the patch embedding, which bitsandbytes leaves alone,
# and "norm_bias": a LayerNorm bias, which PEFT's bias="all" trains like any bias).


def vision_block_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors of one vision block, by HF name relative to `model.visual.blocks.N.`."""
    v = cfg.vision
    e, i = v.hidden_size, v.intermediate_size
    tensors = {"norm1.weight": ((e,), "norm")}
    if v.variant == "qwen2_vl":
        tensors["norm1.bias"] = ((e,), "norm_bias")
    tensors["norm2.weight"] = ((e,), "norm")
    if v.variant == "qwen2_vl":
        tensors["norm2.bias"] = ((e,), "norm_bias")
    tensors.update({
        "attn.qkv.weight": ((3 * e, e), "linear"), "attn.qkv.bias": ((3 * e,), "linear_bias"),
        "attn.proj.weight": ((e, e), "linear"), "attn.proj.bias": ((e,), "linear_bias"),
    })
    mlp = (("fc1", i, e), ("fc2", e, i)) if v.variant == "qwen2_vl" else \
        (("gate_proj", i, e), ("up_proj", i, e), ("down_proj", e, i))
    for name, out, fan_in in mlp:
        tensors[f"mlp.{name}.weight"] = ((out, fan_in), "linear")
        tensors[f"mlp.{name}.bias"] = ((out,), "linear_bias")
    return tensors


def text_layer_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors of one decoder layer, by HF name relative to `model.language_model.layers.N.`."""
    t = cfg.text
    d, q_out, kv_out = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return {
        "self_attn.q_proj.weight": ((q_out, d), "linear"), "self_attn.q_proj.bias": ((q_out,), "linear_bias"),
        "self_attn.k_proj.weight": ((kv_out, d), "linear"), "self_attn.k_proj.bias": ((kv_out,), "linear_bias"),
        "self_attn.v_proj.weight": ((kv_out, d), "linear"), "self_attn.v_proj.bias": ((kv_out,), "linear_bias"),
        "self_attn.o_proj.weight": ((d, q_out), "linear"),
        "mlp.gate_proj.weight": ((t.intermediate_size, d), "linear"),
        "mlp.up_proj.weight": ((t.intermediate_size, d), "linear"),
        "mlp.down_proj.weight": ((d, t.intermediate_size), "linear"),
        "input_layernorm.weight": ((d,), "norm"),
        "post_attention_layernorm.weight": ((d,), "norm"),
    }


def layer_stacks(cfg: Config) -> dict[str, tuple[int, dict]]:
    """The vision blocks and the decoder layers, each one stack."""
    return {VISION_STACK: (cfg.vision.depth, vision_block_tensors(cfg)),
            TEXT_STACK: (cfg.text.num_layers, text_layer_tensors(cfg))}


def top_tensors(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensors outside the stacks, by full HF module name. A tied lm_head is not stored."""
    v, t = cfg.vision, cfg.text
    merged = v.merge_unit * v.hidden_size
    tensors = {
        f"{EMBED_TOKENS}.weight": ((t.vocab_size, t.hidden_size), "embedding"),
        "model.visual.patch_embed.proj.weight": (
            (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), "conv"),
        "model.visual.merger.ln_q.weight": ((v.hidden_size,), "norm"),
    }
    if v.variant == "qwen2_vl":
        tensors["model.visual.merger.ln_q.bias"] = ((v.hidden_size,), "norm_bias")
    tensors.update({
        "model.visual.merger.mlp.0.weight": ((merged, merged), "linear"),
        "model.visual.merger.mlp.0.bias": ((merged,), "linear_bias"),
        "model.visual.merger.mlp.2.weight": ((v.out_hidden_size, merged), "linear"),
        "model.visual.merger.mlp.2.bias": ((v.out_hidden_size,), "linear_bias"),
        "model.language_model.norm.weight": ((t.hidden_size,), "norm"),
    })
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = ((t.vocab_size, t.hidden_size), "lm_head")
    return tensors


def module_list(cfg: Config) -> list[tuple[str, str]]:
    """(dotted module name, kind) in the order torch's `named_modules()` lists them on the HF model.

    The patch embedding is a Conv3d: kind "other" here (LoRA on it is not supported)."""
    v = cfg.vision
    modules = [("model", "other"), ("model.visual", "other"), ("model.visual.patch_embed", "other"),
               ("model.visual.patch_embed.proj", "other"), ("model.visual.rotary_pos_emb", "other"),
               (VISION_STACK, "other")]
    for i in range(v.depth):
        p = f"{VISION_STACK}.{i}"
        modules += [(p, "other"), (f"{p}.norm1", "other"), (f"{p}.norm2", "other"), (f"{p}.attn", "other"),
                    (f"{p}.attn.qkv", "linear"), (f"{p}.attn.proj", "linear"), (f"{p}.mlp", "other")]
        if v.variant == "qwen2_vl":
            modules += [(f"{p}.mlp.fc1", "linear"), (f"{p}.mlp.act", "other"), (f"{p}.mlp.fc2", "linear")]
        else:
            modules += [(f"{p}.mlp.{n}", "linear") for n in ("gate_proj", "up_proj", "down_proj")]
            modules += [(f"{p}.mlp.act_fn", "other")]
    modules += [("model.visual.merger", "other"), ("model.visual.merger.ln_q", "other"),
                ("model.visual.merger.mlp", "other"), ("model.visual.merger.mlp.0", "linear"),
                ("model.visual.merger.mlp.1", "other"), ("model.visual.merger.mlp.2", "linear"),
                ("model.language_model", "other"), (EMBED_TOKENS, "embedding"), (TEXT_STACK, "other")]
    for i in range(cfg.text.num_layers):
        modules += decoder.decoder_layer_modules(cfg.text, f"{TEXT_STACK}.{i}")
    modules += [("model.language_model.norm", "other"), ("model.language_model.rotary_emb", "other"),
                ("lm_head", "linear")]
    return modules


# ---------------------------------------------------------------------------------------------
# Host side: everything transformers derives from image_grid_thw with Python loops, as numpy arrays.


def _grid(cfg: Config, image_grid_thw) -> np.ndarray:
    grid = np.asarray(image_grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3 or (grid <= 0).any():
        raise ValueError(f"image_grid_thw must be positive integers of shape [images, 3] (t, h, w); got shape "
                         f"{grid.shape}")
    m = cfg.vision.spatial_merge_size
    if (grid[:, 1:] % m).any():
        raise ValueError(f"image_grid_thw has h/w {grid[:, 1:].tolist()} not divisible by spatial_merge_size={m}")
    return grid


def image_token_count(cfg: Config, image_grid_thw) -> int:
    """How many image tokens `input_ids` must hold for these images (one per merged patch)."""
    grid = _grid(cfg, image_grid_thw)
    return int(np.prod(grid, axis=1).sum()) // cfg.vision.merge_unit


def vision_inputs(cfg: Config, image_grid_thw) -> dict[str, np.ndarray]:
    """Index arrays the vision tower needs, in the order the blocks see the patches (Qwen2.5-VL groups the
    patches window by window first; Qwen2-VL keeps the processor's order).

    - `patch_order [N]`: which input patch goes where (the window permutation, merge-unit by merge-unit);
    - `rot_pos [N, 2]`: each patch's (row, column) in its image, for the 2-D rotary embedding;
    - `full_segment [N]`, `window_segment [N]`: attention runs within equal ids (one image frame; one window);
    - `merge_reverse [N / merge_unit]`: puts the merged tokens back in the processor's order.
    """
    v = cfg.vision
    grid = _grid(cfg, image_grid_thw)
    m, unit = v.spatial_merge_size, v.merge_unit
    rot_pos, full_segment = [], []
    frame = 0
    for t, h, w in grid.tolist():  # transformers' vision_utils.get_vision_position_ids / get_vision_cu_seqlens
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hpos = hpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        rot_pos.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
        full_segment.append(np.repeat(np.arange(frame, frame + t), h * w))
        frame += t
    rot_pos, full_segment = np.concatenate(rot_pos), np.concatenate(full_segment)
    n = rot_pos.shape[0]
    if not v.windowed:
        order, reverse, window_segment = np.arange(n), np.arange(n // unit), full_segment
    else:
        window_index, cu_seqlens = _window_index(v, grid)
        order = (window_index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
        reverse = np.argsort(window_index)
        window_segment = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
        full_segment = full_segment[order]
    return {"patch_order": order.astype(np.int32), "rot_pos": rot_pos[order].astype(np.int32),
            "full_segment": full_segment.astype(np.int32), "window_segment": window_segment.astype(np.int32),
            "merge_reverse": reverse.astype(np.int32)}


def _window_index(v: VisionConfig, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `vision_utils.get_vision_window_index`: (window_index over merged tokens, cu_window_seqlens
    over patches with empty windows dropped)."""
    window_index, cu_seqlens, offset = [], [0], 0
    win = v.window_size // v.spatial_merge_size // v.patch_size
    if win <= 0:
        raise ValueError(f"window_size={v.window_size} is smaller than spatial_merge_size * patch_size")
    for t, h, w in grid.tolist():
        gh, gw = h // v.spatial_merge_size, w // v.spatial_merge_size
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu_seqlens.extend((np.cumsum(seqlens) * v.merge_unit + cu_seqlens[-1]).tolist())
        offset += t * gh * gw
    cu = np.asarray(cu_seqlens, np.int64)
    cu = cu[np.concatenate([[True], np.diff(cu) != 0])]  # torch.unique_consecutive
    return np.concatenate(window_index), cu


def rope_index(cfg: Config, input_ids_bs, image_grid_thw=None, attention_mask_bs=None,
               mm_token_type_ids_bs=None) -> tuple[np.ndarray, np.ndarray]:
    """Multimodal rotary positions `[3, batch, seq]` (temporal, height, width) and `rope_deltas [batch, 1]`,
    as transformers 5.17's `get_rope_index`.

    Text tokens count up on all three axes; an image's tokens take (t, row, column) of its merged grid offset
    by the position where it starts, and the text after it resumes at that start + max(rows, columns).
    Padding (attention_mask 0) gets position 0 and is skipped. Without images every axis is `arange(seq)`
    (transformers' default, which does not skip padding either). `mm_token_type_ids` (the processor's:
    1 marks image tokens) defaults to `input_ids == image_token_id` — transformers without it silently
    falls back to 1-D positions; here the positions are the processor's either way.
    """
    ids = np.asarray(input_ids_bs)
    batch, seq = ids.shape
    if image_grid_thw is None:
        return np.broadcast_to(np.arange(seq), (3, batch, seq)).copy(), np.zeros((batch, 1), np.int64)
    grid = _grid(cfg, image_grid_thw)
    types = (ids == cfg.image_token_id).astype(np.int64) if mm_token_type_ids_bs is None \
        else np.asarray(mm_token_type_ids_bs, np.int64)
    if types.shape != ids.shape:
        raise ValueError(f"mm_token_type_ids has shape {types.shape}; input_ids has {ids.shape}")
    if (types > 1).any():
        raise NotImplementedError("mm_token_type_ids marks video tokens (2): videos are not supported")
    m = cfg.vision.spatial_merge_size
    images = iter(grid.tolist())
    positions = np.zeros((3, batch, seq), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    for b in range(batch):
        keep = np.ones(seq, bool) if attention_mask_bs is None else np.asarray(attention_mask_bs)[b].astype(bool)
        row_types = types[b][keep]
        pieces, current = [], 0
        for kind, group in itertools.groupby(row_types.tolist()):
            length = len(list(group))
            if kind == 0:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
                continue
            try:
                t, h, w = next(images)
            except StopIteration:
                raise ValueError("input_ids hold more runs of image tokens than image_grid_thw has images") from None
            gt, gh, gw = t, h // m, w // m
            if gt * gh * gw != length:
                raise ValueError(f"a run of {length} image tokens in input_ids row {b} does not match its image "
                                 f"grid {[t, h, w]} ({gt * gh * gw} tokens after merging {m}x{m} patches)")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh) + current, np.arange(gw) + current, indexing="ij")
            pieces.append(np.stack([tt.reshape(-1) + current, hh.reshape(-1), ww.reshape(-1)]))
            current += max(h, w) // m
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = row
        deltas[b, 0] = (row.max() + 1 if row.size else 0) - int(keep.sum())
    return positions, deltas


def text_inv_freq(cfg: Config) -> np.ndarray:
    """The language model's rotary inverse frequencies (transformers' default rope), float32 `[head_dim / 2]`."""
    return rope._plain_inv_freq(cfg.rope_theta, cfg.text.head_dim)


def mrope_cos_sin(cfg: Config, position_ids_3bs, dtype=jnp.float32):
    """cos/sin `[batch, seq, head_dim]` of multimodal positions `[3, batch, seq]`: frequency pair j takes its
    position from axis (temporal, height, width) by `mrope_section`, then the halves are concatenated as in
    Llama's rope. With equal positions on the three axes this is Llama's rope exactly."""
    inv_freq = jnp.asarray(text_inv_freq(cfg))
    freqs = jnp.asarray(position_ids_3bs).astype(jnp.float32)[..., None] * inv_freq  # [3, b, s, hd/2]
    bounds = np.cumsum((0,) + cfg.mrope_section)
    freqs = jnp.concatenate([freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(cfg.mrope_section))],
                            axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def prepare_inputs(cfg: Config, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   mm_token_type_ids=None, position_ids=None) -> dict:
    """The processor's outputs as the arrays the jitted forward and loss take:
    `{"input_ids" [B, S] int32, "attention_mask" [B, S] int32 | None, "position_ids" [3, B, S] int32,
    "vision": dict | None}` (`vision`: `pixel_values` plus the `vision_inputs` index arrays).

    Checks what transformers would only find deep inside its forward: the patch count against
    `image_grid_thw`, and one image token in `input_ids` per merged patch. `position_ids` default to
    transformers' `get_rope_index` of the inputs (`[B, S]` given ones are used on all three axes).
    """
    from fastlora_jax.model import as_batch
    ids = as_batch(input_ids, "input_ids")
    mask = None
    if attention_mask is not None:
        mask = as_batch(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; input_ids has {ids.shape}")
    pixels = None if pixel_values is None else _float_array(pixel_values, "pixel_values")
    grid = None if image_grid_thw is None else np.asarray(decoder.host_array(image_grid_thw), np.int64).reshape(-1, 3)
    if pixels is not None and pixels.shape[0] == 0 and (grid is None or len(grid) == 0):
        pixels = grid = None  # a batch without images (a collator's empty arrays)
    if (pixels is None) != (grid is None):
        raise ValueError("pixel_values and image_grid_thw go together: got "
                         f"pixel_values={'None' if pixels is None else pixels.shape}, "
                         f"image_grid_thw={'None' if grid is None else grid.shape}")
    vision = None
    if pixels is not None:
        patches = int(np.prod(grid, axis=1).sum())
        if pixels.shape != (patches, cfg.vision.patch_dim):
            raise ValueError(f"pixel_values has shape {pixels.shape}; image_grid_thw {grid.tolist()} needs "
                             f"({patches}, {cfg.vision.patch_dim}) (patches, channels*temporal*patch*patch)")
        needed = image_token_count(cfg, grid)
        found = int((ids == cfg.image_token_id).sum())
        if found != needed:
            raise ValueError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but the images of "
                             f"image_grid_thw {grid.tolist()} give {needed} features: build the inputs with the "
                             f"model's processor")
        vision = {"pixel_values": pixels, **vision_inputs(cfg, grid)}
    if position_ids is None:
        types = None if mm_token_type_ids is None else as_batch(mm_token_type_ids, "mm_token_type_ids")
        position_ids, _ = rope_index(cfg, ids, grid, mask, types)
    else:
        position_ids = np.asarray(decoder.host_array(position_ids))
        if position_ids.ndim == 2:
            position_ids = np.broadcast_to(position_ids, (3,) + position_ids.shape)
        if position_ids.shape != (3,) + ids.shape:
            raise ValueError(f"position_ids has shape {position_ids.shape}; expected [3, batch, seq] or "
                             f"[batch, seq] for input_ids of shape {ids.shape}")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int32),
            "vision": vision}



def _float_array(x, name: str) -> np.ndarray:
    array = decoder.host_array(x)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be floating point; got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be [patches, channels*temporal*patch*patch] as the processor makes it; "
                         f"got shape {array.shape}")
    return array.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Generation's contract (decoder.py has the text families'): the prompt's positions and images, and the
# rotary tables of any positions.


def generation_inputs(cfg: Config, ids_bs, mask_bs, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None):
    """`(positions [3, B, S], vision | None, last_position [B])` of a left-padded prompt: the multimodal positions
    of `prepare_inputs`; new tokens continue from each row's largest position (transformers' `rope_deltas`)."""
    prepared = prepare_inputs(cfg, ids_bs, mask_bs, pixel_values, image_grid_thw, mm_token_type_ids)
    positions = prepared["position_ids"]
    return positions, prepared["vision"], positions.max(axis=(0, 2)).astype(np.int32)


def rope_tables(hf_config, cfg: Config, seq_len: int | None):
    """The language model's inverse frequencies (default rope: no dependence on `seq_len`) and scaling 1."""
    return text_inv_freq(cfg), np.float32(1.0)


def rope_is_dynamic(hf_config, cfg: Config) -> bool:
    return False


def rope_invalidates_cache(hf_config, cfg: Config) -> bool:
    return False


def position_cos_sin(cfg: Config, inv_freq, scaling, positions):
    """cos/sin of `[3, B, S]` multimodal (or `[B, S]` text) positions; the tables are the config's own
    (`mrope_cos_sin`), so `inv_freq`/`scaling` (rope_tables') are not read."""
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions, (3,) + positions.shape)
    return mrope_cos_sin(cfg, positions)


# ---------------------------------------------------------------------------------------------
# Forward.

_linear = decoder.linear_module
_keys = decoder.keys_for


def layer_norm(x_nd, weight_d, bias_d, eps: float):
    """torch's LayerNorm: statistics and affine in fp32, one cast back to the input dtype."""
    x32 = x_nd.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(x_nd.dtype)


def _vision_norm(v: VisionConfig, module: dict, x_nd):
    if v.variant == "qwen2_vl":
        return layer_norm(x_nd, module["weight"], module["bias"], VISION_EPS)
    return kernels.rms_norm(x_nd, module["weight"], VISION_EPS)


def vision_cos_sin(v: VisionConfig, rot_pos_n2):
    """The tower's 2-D rotary cos/sin `[N, head_dim]` in fp32: a quarter of the pairs turn with the row, a
    quarter with the column, repeated for the two halves (transformers' axial vision rope)."""
    inv_freq = jnp.asarray(rope._plain_inv_freq(v.rope_theta, v.head_dim // 2))
    freqs = rot_pos_n2.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, hd/4]
    hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_vision(x_nhd, cos_nd, sin_nd):
    """`apply_rotary_pos_emb_vision`: rotated in fp32, cast back."""
    x32 = x_nhd.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos_nd[:, None] + rotated * sin_nd[:, None]).astype(x_nhd.dtype)


def segment_attention(q_nhd, k_nhd, v_nhd, segment_n, scale: float):
    """Non-causal attention among patches of equal segment id (one image frame, or one window), with the
    arithmetic of transformers' eager attention (fp32 softmax, probabilities in the query dtype).

    Dense `[heads, N, N]` scores masked block-diagonally: N is the patch count of the batch's images.
    """
    scores = jnp.einsum("qhd,khd->hqk", q_nhd, k_nhd, preferred_element_type=jnp.float32) * scale
    allowed = segment_n[:, None] == segment_n[None, :]
    scores = jnp.where(allowed[None], scores, kernels.reference.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_nhd.dtype)
    return jnp.einsum("hqk,khd->qhd", probs, v_nhd, preferred_element_type=q_nhd.dtype)


def vision_block(v: VisionConfig, block: dict, x_nd, cos_nd, sin_nd, segment_n, key=None, dropout_rate: float = 0.0,
                 options: KernelOptions = DEFAULT_OPTIONS):
    """One vision block: x + attn(norm1(x)), then + mlp(norm2(x))."""
    n = x_nd.shape[0]
    kqkv, kproj, k1, k2, k3 = _keys(key, 5)
    lin = partial(_linear, dropout_rate=dropout_rate, options=options)
    attn, mlp = block["attn"], block["mlp"]
    h = _vision_norm(v, block["norm1"], x_nd)
    qkv = lin(h, attn["qkv"], kqkv).reshape(n, 3, v.num_heads, v.head_dim)
    q, k = _rotate_vision(qkv[:, 0], cos_nd, sin_nd), _rotate_vision(qkv[:, 1], cos_nd, sin_nd)
    q, k, values = (checkpoint_name(t, decoder.SAVED_ATTENTION_INPUTS) for t in (q, k, qkv[:, 2]))
    o = segment_attention(q, k, values, segment_n, v.head_dim ** -0.5)
    x_nd = checkpoint_name(x_nd + lin(o.reshape(n, v.hidden_size), attn["proj"], kproj), decoder.SAVED_MID_RESIDUAL)
    h = _vision_norm(v, block["norm2"], x_nd)
    act = ACTIVATIONS[v.hidden_act]
    if v.variant == "qwen2_vl":
        out = lin(act(checkpoint_name(lin(h, mlp["fc1"], k1), decoder.SAVED_MLP_INPUTS)), mlp["fc2"], k2)
    else:
        gate = checkpoint_name(lin(h, mlp["gate_proj"], k1), decoder.SAVED_MLP_INPUTS)
        up = checkpoint_name(lin(h, mlp["up_proj"], k2), decoder.SAVED_MLP_INPUTS)
        out = lin(act(gate) * up, mlp["down_proj"], k3)
    return x_nd + out


def vision_tower(cfg: Config, params: dict, vision: dict, compute_dtype=jnp.float32, dropout_key=None,
                 dropout_rate: float = 0.0, remat=None, options: KernelOptions = DEFAULT_OPTIONS):
    """Image features `[N / merge_unit, hidden]` in the processor's token order, from `vision` = `vision_inputs(...)`
    plus `pixel_values [N, C*T*P*P]`."""
    v = cfg.vision
    visual = params["model"]["visual"]
    x = jnp.asarray(vision["pixel_values"]).astype(compute_dtype)[vision["patch_order"]]
    w = visual["patch_embed"]["proj"]["weight"]  # Conv3d with stride == kernel: a linear over flattened patches
    x = kernels.linear(x, kernels.dense_weight(w, compute_dtype).reshape(v.hidden_size, -1))
    cos, sin = vision_cos_sin(v, vision["rot_pos"])
    full = np.zeros((v.depth,), bool)
    full[list(v.fullatt_block_indexes)] = True
    if not v.windowed:
        full[:] = True
    keys = None if dropout_key is None else jax.random.split(dropout_key, v.depth + 1)

    def step(x_nd, xs):
        block, is_full, key = xs
        x_nd = checkpoint_name(x_nd, LAYER_INPUT)
        segment = jnp.where(is_full, vision["full_segment"], vision["window_segment"])
        return vision_block(v, block, x_nd, cos, sin, segment, key, dropout_rate, options), None

    if remat is not None:
        step = jax.checkpoint(step, policy=remat, prevent_cse=False)
    x, _ = jax.lax.scan(step, x, (visual["blocks"], jnp.asarray(full), None if keys is None else keys[:-1]))
    merger = visual["merger"]
    h = _vision_norm(v, merger["ln_q"], x).reshape(-1, v.merge_unit * v.hidden_size)
    k0, k2 = _keys(None if keys is None else keys[-1], 2)
    h = _linear(h, merger["mlp"]["0"], k0, dropout_rate, options)
    h = _linear(kernels.ACTIVATIONS["gelu"](h), merger["mlp"]["2"], k2, dropout_rate, options)
    return h[vision["merge_reverse"]]


def scatter_image_embeds(x_bsd, image_mask_bs, image_nd):
    """transformers' `masked_scatter`: the k-th image token (row-major over the batch) takes image feature k."""
    flat = image_mask_bs.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, image_nd.shape[0] - 1)
    gathered = image_nd.astype(x_bsd.dtype)[index].reshape(x_bsd.shape)
    return jnp.where(image_mask_bs[..., None], gathered, x_bsd)


def hidden_states(cfg: Config, params: dict, input_ids_bs, cos_bsd, sin_bsd, attention_mask_bs=None,
                  compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, remat=None, *,
                  vision: dict | None = None, options: KernelOptions = DEFAULT_OPTIONS):
    """Final normed hidden states `[batch, seq, hidden]`, with image features in place of the image tokens.

    Same signature as decoder.hidden_states plus `vision` (None: text only); `cos_bsd`/`sin_bsd` come from
    `mrope_cos_sin` (for text only, Llama's rope of `arange(seq)` is the same thing).
    """
    lm = params["model"]["language_model"]
    x = kernels.embedding(input_ids_bs, lm["embed_tokens"], compute_dtype)
    vision_key = text_key = None
    if dropout_key is not None:
        vision_key, text_key = jax.random.split(dropout_key)
    if vision is not None:
        image = vision_tower(cfg, params, vision, compute_dtype, vision_key, dropout_rate, remat, options)
        x = scatter_image_embeds(x, input_ids_bs == cfg.image_token_id, image)
    cos_bsd, sin_bsd = cos_bsd.astype(compute_dtype), sin_bsd.astype(compute_dtype)
    x = decoder.run_layers(cfg.text, lm["layers"], x, cos_bsd, sin_bsd, attention_mask_bs, text_key, dropout_rate,
                           remat, options)
    return kernels.rms_norm(x, lm["norm"]["weight"], cfg.text.rms_norm_eps)


def lm_head_module(cfg: Config, params: dict) -> dict:
    """The output layer's module dict; a tied head reads the embedding matrix (LoRA on it stays its own)."""
    head = dict(params.get("lm_head", {}))
    if cfg.tie_word_embeddings and "weight" not in head:
        head["weight"] = params["model"]["language_model"]["embed_tokens"]["weight"]
    return head


def forward(cfg: Config, params: dict, input_ids_bs, cos_bsd, sin_bsd, attention_mask_bs=None,
            compute_dtype=jnp.float32, dropout_key=None, dropout_rate: float = 0.0, *, vision: dict | None = None,
            options: KernelOptions = DEFAULT_OPTIONS):
    """Logits `[batch, seq, vocab]` in the compute dtype, as the HF model's `.logits`."""
    h = hidden_states(cfg, params, input_ids_bs, cos_bsd, sin_bsd, attention_mask_bs, compute_dtype, dropout_key,
                      dropout_rate, vision=vision, options=options)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers)
    return _linear(h, lm_head_module(cfg, params), head_key, dropout_rate, options)


# ---------------------------------------------------------------------------------------------
# Inference with a KV cache (the language model's; images enter once, at prefill). As decoder.py's: the cache
# is `{"k", "v"}` of shape [num_layers, batch, max_len, kv_heads, head_dim]. A generated token's multimodal
# position is the same on all three axes, so decode steps may take Llama's rope of that position.


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    return decoder.init_cache(cfg.text, batch, max_len, dtype)


def hidden_states_cached(cfg: Config, params: dict, input_ids_bs, cos_bsd, sin_bsd, cache: dict, cache_index,
                         attention_mask_b_maxlen=None, compute_dtype=jnp.float32, *, vision: dict | None = None,
                         options: KernelOptions = DEFAULT_OPTIONS):
    """decoder.hidden_states_cached for the language model, with image features in place of the image tokens
    (`vision`: prefill only). Returns `(hidden [batch, seq, hidden], new_cache)`."""
    lm = params["model"]["language_model"]
    x = kernels.embedding(input_ids_bs, lm["embed_tokens"], compute_dtype)
    if vision is not None:
        x = scatter_image_embeds(x, input_ids_bs == cfg.image_token_id,
                                 vision_tower(cfg, params, vision, compute_dtype, options=options))
    cos_bsd, sin_bsd = cos_bsd.astype(compute_dtype), sin_bsd.astype(compute_dtype)
    x, cache = decoder.run_layers_cached(cfg.text, lm["layers"], x, cos_bsd, sin_bsd, cache, cache_index,
                                         attention_mask_b_maxlen, options)
    return kernels.rms_norm(x, lm["norm"]["weight"], cfg.text.rms_norm_eps), cache


def forward_cached(cfg: Config, params: dict, input_ids_bs, cos_bsd, sin_bsd, cache: dict, cache_index,
                   attention_mask_b_maxlen=None, compute_dtype=jnp.float32, last_only: bool = False, *,
                   vision: dict | None = None, options: KernelOptions = DEFAULT_OPTIONS):
    """`(logits, new_cache)` of the tokens written at slots `cache_index ...` (decoder.forward_cached's contract)."""
    h, cache = hidden_states_cached(cfg, params, input_ids_bs, cos_bsd, sin_bsd, cache, cache_index,
                                    attention_mask_b_maxlen, compute_dtype, vision=vision, options=options)
    if last_only:
        h = h[:, -1:]
    return _linear(h, lm_head_module(cfg, params), options=options), cache
