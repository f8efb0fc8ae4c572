"""A tiny offline Llama 3.2 Vision (Mllama) checkpoint and processor for the tests.

No model hub is reachable, so both are made here:
- the processor is transformers' own `MllamaProcessor`: its `MllamaImageProcessor` with small tiles
  (`TINY_TILE` px, at most `TINY_MAX_TILES` tiles per image) and the project's tiny BPE tokenizer
  (tiny.py) with Llama 3's chat tokens and `<|image|>` added as special tokens, and a chat template shaped
  like Llama 3.2 Vision Instruct's (`CHAT_TEMPLATE`);
- the checkpoint is written by transformers' `MllamaForConditionalGeneration.save_pretrained`, so the
  files are exactly what transformers writes, with every parameter random (see `write_tiny_mllama`).

As in the real checkpoints, the image token's id equals the text vocabulary size (the embedding has
`vocab_size + 8` rows, `lm_head` has `vocab_size`): `write_tiny_mllama` sets `text_config.vocab_size` and
`image_token_index` to the id the tokenizer gives `<|image|>`.
"""

from __future__ import annotations

import math
from pathlib import Path

IMAGE_TOKEN = "<|image|>"
# Llama 3's chat tokens (ids below the image token's, as in the real vocabulary) and the shape of Llama 3.2
# Vision Instruct's chat template without its system-date preamble: an image part renders as <|image|> where it
# stands, a turn ends with <|eot_id|> (also the tokenizer's eos, as in the Instruct tokenizer).
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
TINY_TILE = 28  # tile side in pixels: (28 / 7)^2 = 16 patches + 1 class token = 17 per tile, padded to 24
TINY_MAX_TILES = 2  # aspect ratios (1,1), (1,2), (2,1): ids 1, 2, 3 (0 = no image)
# Every linear's in_features is a multiple of 64: bitsandbytes 0.50's CPU dequantize_4bit is wrong otherwise
# (blocks of 64 taken per row), which would break the 4-bit oracle.
TINY_MLLAMA_VISION = dict(
    hidden_size=64, attention_heads=2, intermediate_size=128, num_hidden_layers=3, num_global_layers=1,
    image_size=TINY_TILE, patch_size=7, max_num_tiles=TINY_MAX_TILES, num_channels=3, norm_eps=1e-5,
    supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers_indices=[0, 2],
    vision_output_dim=64 * 3,  # the final hidden state and two intermediate layers
)
# Cross-attention at 1 and 4: a run of one self-attention layer, a cross layer, a run of two, a cross layer last.
TINY_MLLAMA_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
    cross_attention_layers=[1, 4], rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
)


def write_tiny_mllama_processor(directory=None, tile_size: int = TINY_TILE, max_image_tiles: int = TINY_MAX_TILES):
    """An `MllamaProcessor` (image processor + the tiny tokenizer with `<|image|>`); saved when `directory` is
    given (`AutoProcessor.from_pretrained(directory)` loads it back). Needs torchvision and pillow."""
    import tempfile

    from transformers import MllamaImageProcessor, MllamaProcessor

    from fastlora_jax.tiny import write_tiny_tokenizer

    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive int (pixels); got {tile_size!r}")
    if isinstance(max_image_tiles, bool) or not isinstance(max_image_tiles, int) or max_image_tiles <= 0:
        raise ValueError(f"max_image_tiles must be a positive int; got {max_image_tiles!r}")
    with tempfile.TemporaryDirectory() as scratch:  # write_tiny_tokenizer always saves
        tokenizer = write_tiny_tokenizer(scratch)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # last: its id is the vocab size
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = MllamaImageProcessor(size={"height": tile_size, "width": tile_size},
                                           max_image_tiles=max_image_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        processor.save_pretrained(directory)
    return processor


def supported_aspect_ratios(max_image_tiles: int) -> list[list[int]]:
    """The image processor's tile arrangements (width, height) in its id order (id = index + 1)."""
    return [[w, h] for w in range(1, max_image_tiles + 1) for h in range(1, max_image_tiles + 1)
            if w * h <= max_image_tiles]


def write_tiny_mllama(directory, seed: int = 0, dtype: str = "float32", processor: bool = True,
                      **overrides) -> Path:
    """Write a random `MllamaForConditionalGeneration` checkpoint with transformers' save_pretrained, plus the
    tiny processor (its `<|image|>` id is the vocabulary size and the image token id).

    Every parameter is random, the gates included: transformers initializes the cross-attention gates and the
    tile-embedding gates to zero, and with zero gates images would not change the logits at all. Linear weights
    and biases: normal(0, 0.5 / sqrt(fan_in)); embeddings: normal(0, 0.2); norm weights 1 + 0.1·noise (a norm
    that ignored its weight fails the parity tests); gates of random sign and magnitude in [0.3, 0.8]
    (|tanh| 0.29-0.66).
    `text_config=` / `vision_config=` dicts are merged into the tiny defaults; other overrides go to
    `MllamaConfig`. Needs torch.
    """
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = {**TINY_MLLAMA_TEXT, **overrides.pop("text_config", {})}
    vision = {**TINY_MLLAMA_VISION, **overrides.pop("vision_config", {})}
    proc = write_tiny_mllama_processor(directory if processor else None, tile_size=vision["image_size"],
                                       max_image_tiles=vision["max_num_tiles"])
    vision["supported_aspect_ratios"] = supported_aspect_ratios(vision["max_num_tiles"])
    tok = proc.tokenizer
    image_token_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    text.update(vocab_size=image_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_token_id, **overrides)
    config.architectures = ["MllamaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            leaf = name.rsplit(".", 1)[-1]
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            if "gate" in leaf:  # gate, gate_attn, gate_ffn, cross_attn_attn_gate, cross_attn_mlp_gate
                p.copy_(torch.sign(noise) * (0.3 + 0.5 * torch.rand_like(p)))  # |gate| in [0.3, 0.8]
            elif leaf == "weight" and ("norm" in module or "layernorm" in module):
                p.copy_(1.0 + 0.1 * noise)
            elif "embed" in name and "patch_embedding" not in name:
                p.copy_(0.2 * noise)  # token, class, position, tile and aspect-ratio embeddings
            else:
                fan_in = p.shape[1] * (math.prod(p.shape[2:]) if p.ndim > 2 else 1) if p.ndim > 1 else p.shape[0]
                p.copy_(0.5 / math.sqrt(fan_in) * noise)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


__all__ = ["CHAT_TEMPLATE", "CHAT_TOKENS", "IMAGE_TOKEN", "TINY_MAX_TILES", "TINY_MLLAMA_TEXT", "TINY_MLLAMA_VISION", "TINY_TILE",
           "supported_aspect_ratios", "write_tiny_mllama", "write_tiny_mllama_processor"]
