"""Vision-language QLoRA train-step benchmark (Qwen2.5-VL, Llama 3.2 Vision): one JSON line per config.

    python benchmarks/vl_train_step.py --shape qwen2.5-vl-7b --seq 2048 --image 448 --gc unsloth
    python benchmarks/vl_train_step.py --shape llama-3.2-11b-vision --seq 2048 --tiles 4 --gc unsloth

Random weights are drawn and NF4-quantized on the device (no files; `convert.load.random_base_params` over the
family's stacks). The batch is one row, `--seq` tokens in all, labels = the text tokens (image tokens -100, as the
collator makes them):
- Qwen2.5-VL: a random `--image` px square image (448: grid [1, 32, 32] patches -> 256 image tokens after the
  2x2 merge) inside random text;
- Llama 3.2 Vision: one image of `--tiles` tiles (4: the 2x2 arrangement of 560 px tiles, 4 x 1601 vision tokens
  the cross-attention layers attend to) whose `<|image|>` token follows 16 text tokens, as MllamaProcessor lays
  it out (the tokens before it have an empty cross-attention mask, every later one sees all the tiles).
LoRA r=16, alpha=16 on every linear the finetune_* flags select, AdamW, and two modes:

- `vision+language`: FastVisionModel.get_peft_model with every finetune_* flag True (vision layers too);
- `language-only`: finetune_vision_layers=False.

Each config runs in its own process so that peak memory is its own. tokens/s is the median step after two
warm-up steps (plus the compiling one). `--shape tiny` / `--shape tiny-mllama` are CPU smoke tests of the same code
(the test suite runs them with `--no-4bit --in-process`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from config_process import run_config  # noqa: E402

# Qwen2.5-VL-7B-Instruct's config.json (transformers' Qwen2_5_VLConfig defaults are the 72B text model and a
# 3584-wide vision tower; the 7B checkpoint sets these).
SHAPES = {
    "qwen2.5-vl-7b": dict(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=128000, hidden_act="silu", use_sliding_window=False,
                         bos_token_id=151643, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3,
                           tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False),
}
# meta-llama/Llama-3.2-11B-Vision-Instruct's config.json (the text and vision fields that shape the model).
LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MLLAMA_SHAPES = {
    "llama-3.2-11b-vision": dict(
        text_config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, hidden_act="silu",
                         cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], max_position_embeddings=131072,
                         rope_parameters=LLAMA32_ROPE, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                         pad_token_id=128004, tie_word_embeddings=False),
        vision_config=dict(hidden_size=1280, attention_heads=16, intermediate_size=5120, num_hidden_layers=32,
                           num_global_layers=8, image_size=560, patch_size=14, max_num_tiles=4, num_channels=3,
                           norm_eps=1e-5, vision_output_dim=7680, intermediate_layers_indices=[3, 7, 15, 23, 30],
                           supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
                           hidden_act="gelu"),
        image_token_index=128256),
}
GEMMA3_SHAPES = {
    # google/gemma-3-4b-it's config.json: SigLIP so400m at 896 px, 34 decoder layers (every 6th global), 256 soft
    # tokens per image, a tied 262k vocabulary.
    "gemma-3-4b": dict(
        text_config=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                         sliding_window=1024, rms_norm_eps=1e-6, max_position_embeddings=131072,
                         hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
                         rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                           hidden_act="gelu_pytorch_tanh", vision_use_head=False),
        mm_tokens_per_image=256, image_token_index=262144, boi_token_index=255999, eoi_token_index=256000,
        tie_word_embeddings=True),
}
MODES = {"vision+language": True, "language-only": False}  # mode -> finetune_vision_layers


def tiny_shape() -> dict:
    from fastlora_jax.tiny import (
        TINY_QWEN_VL_TEXT,
        TINY_QWEN_VL_TOKENS,
        TINY_QWEN_VL_VISION,
    )
    return dict(text_config=dict(TINY_QWEN_VL_TEXT), vision_config=dict(TINY_QWEN_VL_VISION["qwen2_5_vl"]),
                tie_word_embeddings=False, **TINY_QWEN_VL_TOKENS)


def tiny_mllama_shape() -> dict:
    """tiny_mllama's checkpoint shape (two cross-attention layers, 2 tiles of 28 px) with a 512-token vocabulary."""
    from fastlora_jax.tiny_mllama import TINY_MLLAMA_TEXT, TINY_MLLAMA_VISION, supported_aspect_ratios
    vision = dict(TINY_MLLAMA_VISION, supported_aspect_ratios=supported_aspect_ratios(TINY_MLLAMA_VISION["max_num_tiles"]))
    return dict(text_config=dict(TINY_MLLAMA_TEXT, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                vision_config=vision, image_token_index=512)


def is_mllama(shape: str) -> bool:
    return shape == "tiny-mllama" or shape in MLLAMA_SHAPES


def tiny_gemma3_shape() -> dict:
    """tiny_gemma3's shapes and its tokenizer's ids (boi 6, eoi 7, soft token 8) with a 512-token vocabulary."""
    from fastlora_jax.tiny_gemma3 import TINY_GEMMA3_TEXT, TINY_GEMMA3_VISION, TINY_MM_TOKENS
    return dict(text_config=dict(TINY_GEMMA3_TEXT, vocab_size=512), vision_config=dict(TINY_GEMMA3_VISION),
                mm_tokens_per_image=TINY_MM_TOKENS, image_token_index=8, boi_token_index=6, eoi_token_index=7)


def is_gemma3(shape: str) -> bool:
    return shape == "tiny-gemma3" or shape in GEMMA3_SHAPES


def make_batch(cfg, hf_config, seq: int, side: int, seed: int = 0) -> tuple[dict, int]:
    """One row as UnslothVisionDataCollator lays it out: text, <|vision_start|>, the image's tokens,
    <|vision_end|>, text up to `seq`; `pixel_values` random (the values do not change the work)."""
    import numpy as np
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    if side % unit:
        raise ValueError(f"--image {side}: the side must be a multiple of patch_size * merge = {unit}")
    grid = np.array([[1, side // v.patch_size, side // v.patch_size]])
    n_image = int(grid.prod()) // v.merge_unit
    prefix = 16
    if seq < prefix + n_image + 2 + 16:
        raise ValueError(f"--seq {seq} leaves no room for {n_image} image tokens plus text")
    rng = np.random.default_rng(seed)
    ids = rng.integers(20, min(cfg.vocab_size, 150000), seq)  # ordinary tokens (Qwen's specials are above)
    ids[prefix] = hf_config.vision_start_token_id
    ids[prefix + 1:prefix + 1 + n_image] = cfg.image_token_id
    ids[prefix + 1 + n_image] = hf_config.vision_end_token_id
    labels = np.where(ids == cfg.image_token_id, -100, ids)
    types = (ids == cfg.image_token_id).astype(np.int32)
    pixels = rng.standard_normal((int(grid.prod()), v.patch_dim)).astype(np.float32)
    return {"input_ids": ids[None].astype(np.int32), "attention_mask": np.ones((1, seq), np.int32),
            "labels": labels[None].astype(np.int32), "mm_token_type_ids": types[None], "pixel_values": pixels,
            "image_grid_thw": grid.astype(np.int32)}, n_image


def make_gemma3_batch(cfg, hf_config, seq: int, seed: int = 0) -> tuple[dict, int]:
    """One row as UnslothVisionDataCollator lays it out for Gemma 3: text, <start_of_image>, the soft tokens,
    <end_of_image>, text up to `seq`; `token_type_ids` 1 on the soft tokens; `pixel_values` random."""
    import numpy as np
    n_image, prefix = cfg.mm_tokens_per_image, 16
    if seq < prefix + n_image + 2 + 16:
        raise ValueError(f"--seq {seq} leaves no room for {n_image} image tokens plus text")
    rng = np.random.default_rng(seed)
    ids = rng.integers(20, min(cfg.vocab_size, 150000), seq)  # ordinary tokens (Gemma's image specials are above)
    ids[prefix] = hf_config.boi_token_id
    ids[prefix + 1:prefix + 1 + n_image] = cfg.image_token_id
    ids[prefix + 1 + n_image] = hf_config.eoi_token_id
    labels = np.where(ids == cfg.image_token_id, -100, ids)
    v = cfg.vision
    pixels = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return {"input_ids": ids[None].astype(np.int32), "attention_mask": np.ones((1, seq), np.int32),
            "labels": labels[None].astype(np.int32), "pixel_values": pixels,
            "token_type_ids": (ids == cfg.image_token_id).astype(np.int32)[None]}, n_image


def make_mllama_batch(cfg, seq: int, tiles: int, seed: int = 0) -> tuple[dict, int]:
    """One row as MllamaProcessor (and the collator) lay it out: 16 text tokens, <|image|>, text up to `seq`; one
    image of `tiles` tiles in the most square supported arrangement; random pixels. Returns the batch and the
    number of vision tokens the cross-attention layers attend to (all tiles' patches, padding tiles included)."""
    import numpy as np

    from fastlora_jax.tiny_mllama import supported_aspect_ratios
    v = cfg.vision
    if not 1 <= tiles <= v.max_num_tiles:
        raise ValueError(f"--tiles {tiles}: the model takes 1..{v.max_num_tiles} tiles per image")
    ratios = supported_aspect_ratios(v.max_num_tiles)
    arrangement = min((r for r in ratios if r[0] * r[1] == tiles), key=lambda r: abs(r[0] - r[1]), default=None)
    if arrangement is None:
        raise ValueError(f"--tiles {tiles} is no supported arrangement of {v.max_num_tiles} tiles: {ratios}")
    prefix = 16
    if seq < prefix + 17:
        raise ValueError(f"--seq {seq} leaves no room for the image token plus text")
    rng = np.random.default_rng(seed)
    ids = rng.integers(20, min(cfg.vocab_size, 128000), seq)  # ordinary tokens (Llama 3's specials are above)
    ids[prefix] = cfg.image_token_id
    labels = np.where(ids == cfg.image_token_id, -100, ids)
    pixels = rng.standard_normal((1, 1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size))
    ratio_mask = (np.arange(v.max_num_tiles) < tiles).astype(np.int32)[None, None]
    cross = np.zeros((1, seq, 1, v.max_num_tiles), np.int32)
    cross[0, prefix:, 0, :tiles] = 1
    batch = {"input_ids": ids[None].astype(np.int32), "attention_mask": np.ones((1, seq), np.int32),
             "labels": labels[None].astype(np.int32), "pixel_values": pixels.astype(np.float32),
             "aspect_ratio_ids": np.array([[ratios.index(arrangement) + 1]], np.int32),
             "aspect_ratio_mask": ratio_mask, "cross_attention_mask": cross}
    return batch, v.max_num_tiles * v.num_patches


@functools.cache
def random_base(shape: str, load_in_4bit: bool):
    """(family, HF config, family config, compute dtype, random base pytree); one per process (--in-process
    shares it)."""
    import jax
    import jax.numpy as jnp
    from fastlora_jax.convert.load import random_base_params
    from transformers import Gemma3Config, MllamaConfig, Qwen2_5_VLConfig

    from fastlora_jax.models import gemma3_vl, mllama, qwen2_vl
    if is_gemma3(shape):
        family, hf_config = gemma3_vl, Gemma3Config(**(tiny_gemma3_shape() if shape == "tiny-gemma3"
                                                       else GEMMA3_SHAPES[shape]))
        hf_config.architectures = ["Gemma3ForConditionalGeneration"]
    elif is_mllama(shape):
        family, hf_config = mllama, MllamaConfig(**(tiny_mllama_shape() if shape == "tiny-mllama"
                                                    else MLLAMA_SHAPES[shape]))
        hf_config.architectures = ["MllamaForConditionalGeneration"]
    else:
        family, hf_config = qwen2_vl, Qwen2_5_VLConfig(**(tiny_shape() if shape == "tiny" else SHAPES[shape]))
        hf_config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    cfg = family.config(hf_config)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return family, hf_config, cfg, dtype, random_base_params(family, cfg, dtype, load_in_4bit)


def run_one(shape: str, seq: int, side: int, mode: str, gc: str, steps: int, load_in_4bit: bool,
            tiles: int | None = None) -> dict:
    import jax
    import numpy as np

    from fastlora_jax import FastVisionModel
    from fastlora_jax.model import VisionCausalLM
    from fastlora_jax.training import make_optimizer, make_train_step

    family, hf_config, cfg, dtype, base = random_base(shape, load_in_4bit)
    model = VisionCausalLM(hf_config, family, cfg, base, dtype, name_or_path=shape, max_seq_length=seq)
    checkpointing = {"unsloth": "unsloth", "true": True, "false": False}[gc]
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                           finetune_vision_layers=MODES[mode], finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True,
                                           use_gradient_checkpointing=checkpointing, random_state=3407)
    trainable, total = model.get_nb_trainable_parameters()
    optimizer = make_optimizer(learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0)
    lora = model.lora_params
    opt_state = optimizer.init(lora)
    step = make_train_step(model, optimizer)
    if is_gemma3(shape):
        raw, n_image = make_gemma3_batch(model.cfg, hf_config, seq)
        image = {"image_px": cfg.vision.image_size, "image_patches": cfg.vision.num_patches}
    elif is_mllama(shape):
        tiles = tiles or cfg.vision.max_num_tiles
        raw, n_image = make_mllama_batch(model.cfg, seq, tiles)
        image = {"image_tiles": tiles, "tile_px": cfg.vision.image_size,
                 "image_patches": tiles * (cfg.vision.num_patches - 1)}
    else:
        raw, n_image = make_batch(model.cfg, hf_config, seq, side)
        image = {"image_px": side, "image_patches": int(raw["pixel_values"].shape[0])}
    micro = jax.device_put(model.prepare_training_batch(raw))  # host-side index arrays, computed once
    jax.block_until_ready((lora, opt_state, micro))
    setup_stats = jax.devices()[0].memory_stats() or {}  # CPU: no stats
    setup_bytes = setup_stats.get("bytes_in_use", 0)
    setup_peak = setup_stats.get("peak_bytes_in_use", 0)
    print(f"setup done: {setup_bytes / 2 ** 30:.2f} GiB in use", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    lora, opt_state, metrics = step(lora, opt_state, [micro], None)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        lora, opt_state, metrics = step(lora, opt_state, [micro], None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    times = times[2:]
    median = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {"peak_bytes_in_use": 0}
    return {
        "bench": "vl_train_step", "system": "fastlora_jax", "gpu": jax.devices()[0].device_kind, "shape": shape,
        "family": family.__name__.rsplit(".", 1)[-1], "mode": mode, "gc": gc, "load_in_4bit": load_in_4bit,
        "seq": seq, **image, "image_tokens": n_image,
        "trainable_params": int(trainable), "all_params": int(total), "tokens_per_s": round(seq / median, 1),
        "step_ms": round(median * 1e3, 2), "peak_gib": round(stats["peak_bytes_in_use"] / 2 ** 30, 3),
        "setup_gib": round(setup_bytes / 2 ** 30, 3), "setup_peak_gib": round(setup_peak / 2 ** 30, 3),
        "compile_s": round(compile_s, 1), "loss": float(metrics["loss"]), "steps": steps, "jax": jax.__version__,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-vl-7b", choices=["tiny", "tiny-mllama", "tiny-gemma3", *SHAPES, *MLLAMA_SHAPES, *GEMMA3_SHAPES])
    parser.add_argument("--seq", type=int, default=2048, help="tokens in the row, image tokens included")
    parser.add_argument("--image", type=int, default=448, help="Qwen-VL: image side in pixels (a multiple of 28)")
    parser.add_argument("--tiles", type=int, default=None,
                        help="Llama 3.2 Vision: tiles of the image (default: the model's max_num_tiles, 4 for 11B)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--gc", default="unsloth", choices=["unsloth", "true", "false"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per config (default: %(default)s)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the configs in this process (smoke tests; peak memory is then not per config)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one or args.in_process:
        for mode in args.modes[:1] if args.one else args.modes:
            print(json.dumps(run_one(args.shape, args.seq, args.image, mode, args.gc, args.steps,
                                     not args.no_4bit, args.tiles)), flush=True)
        return
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", "--shape", args.shape, "--seq", str(args.seq), "--image",
               str(args.image), *(["--tiles", str(args.tiles)] if args.tiles else []), "--modes", mode, "--gc", args.gc, "--steps",
               str(args.steps)]
        cmd += ["--no-4bit"] if args.no_4bit else []
        head = {"bench": "vl_train_step", "shape": args.shape, "mode": mode, "gc": args.gc, "seq": args.seq}
        run_config(cmd, head, args.timeout, "vl_train_step_stderr.log")


if __name__ == "__main__":
    main()
