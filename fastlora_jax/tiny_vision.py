"""Tiny offline Qwen2-VL / Qwen2.5-VL processors for the tests and the vision notebook.

No model hub is reachable, so the processor of a tiny vision-language checkpoint is made here: a byte-level BPE
trained on the bundled chat data with Qwen-VL's special tokens and chat template, and transformers' own
`Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor` set small (min_pixels 56x56, max_pixels 112x112, so a 56x56
image is 4x4 patches of 14 px, merged 2x2 into 4 image tokens).

The special tokens take the first ids, in Qwen's order (`<|endoftext|>` = 0, ..., `<|video_pad|>` = 13), and
`qwen_vl_config_fields` gives the config values (token ids, vocab size, patch geometry) that a tiny model must use
to agree with this processor.

Transformers 5.17's Qwen-VL processors need `torchvision` (the video processor is torchvision-only) and `pillow`.
"""

from __future__ import annotations

import json
from pathlib import Path

VARIANTS = ("qwen2_5_vl", "qwen2_vl")

# Qwen2-VL's added tokens, in the order of their ids there (151643 ... 151656).
QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# Qwen2-VL-7B-Instruct's (and Qwen2.5-VL's) chat template, verbatim.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image geometry of the tiny processor (Qwen-VL's real one: min 56*56, max 28*28*1280 pixels).
TINY_IMAGE_GEOMETRY = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2,
                       "merge_size": 2}

_EXTRA_CORPUS = [
    "You are a helpful assistant.",
    "Describe this image.", "What is in the picture?", "The image shows a red square on a blue background.",
    "Compare the two images.", "There is no image here.", "Write the LaTeX for this formula.",
]


def _corpus() -> list[str]:
    from fastlora_jax.data import bundled_dataset_path

    texts = list(_EXTRA_CORPUS)
    path = bundled_dataset_path()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += [m["content"] for m in json.loads(line).get("messages", [])
                          if isinstance(m.get("content"), str)]
    return texts


def write_tiny_qwen_vl_tokenizer(directory=None, vocab_size: int = 512):
    """A byte-level BPE with Qwen-VL's special tokens (ids 0..13) and chat template; saved when `directory` is
    given. eos is `<|im_end|>` and pad `<|endoftext|>`, as in the Instruct checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + special tokens + merges); got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_VL_SPECIAL_TOKENS),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="right", clean_up_tokenization_spaces=False)
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    for i, t in enumerate(QWEN_VL_SPECIAL_TOKENS):  # the ids the config helper promises
        assert fast.convert_tokens_to_ids(t) == i, (t, fast.convert_tokens_to_ids(t))
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def write_tiny_qwen_vl_processor(directory, variant: str = "qwen2_5_vl", vocab_size: int = 512, *,
                                 min_pixels: int = TINY_IMAGE_GEOMETRY["min_pixels"],
                                 max_pixels: int = TINY_IMAGE_GEOMETRY["max_pixels"],
                                 patch_size: int = TINY_IMAGE_GEOMETRY["patch_size"],
                                 temporal_patch_size: int = TINY_IMAGE_GEOMETRY["temporal_patch_size"],
                                 merge_size: int = TINY_IMAGE_GEOMETRY["merge_size"]):
    """Save a `Qwen2_5_VLProcessor` (variant "qwen2_5_vl") or `Qwen2VLProcessor` ("qwen2_vl") to `directory`
    (tokenizer files, processor_config.json, chat_template.jinja) and return it. `AutoProcessor.from_pretrained(
    directory)` loads it back. Use `qwen_vl_config_fields(processor)` for the matching model config values."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not accepted; use one of {VARIANTS}")
    factor = patch_size * merge_size
    if min_pixels < factor * factor or max_pixels < min_pixels:
        raise ValueError(f"min_pixels={min_pixels}, max_pixels={max_pixels}: need (patch_size*merge_size)^2 = "
                         f"{factor * factor} <= min_pixels <= max_pixels")
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if variant == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as processor_class
    else:
        from transformers import Qwen2VLProcessor as processor_class
    geometry = {"patch_size": patch_size, "temporal_patch_size": temporal_patch_size, "merge_size": merge_size}
    # `size` given as a fresh dict: the image processors' __init__ writes min/max_pixels into the dict it is given,
    # and without one that is their class attribute, shared by every instance.
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **geometry)
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **geometry)
    tokenizer = write_tiny_qwen_vl_tokenizer(None, vocab_size=vocab_size)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor, chat_template=QWEN_VL_CHAT_TEMPLATE)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(directory)
    return processor


def qwen_vl_config_fields(processor, vocab_size: int | None = None) -> dict:
    """The config values a Qwen2(.5)-VL model needs to agree with `processor` (a processor or its directory).

    Returns `{image_token_id, video_token_id, vision_start_token_id, vision_end_token_id,
    text_config: {vocab_size, bos_token_id, eos_token_id, pad_token_id},
    vision_config: {in_channels, patch_size, temporal_patch_size, spatial_merge_size}}`, in the layout of
    transformers' `Qwen2_5_VLConfig` / `Qwen2VLConfig` (merge the two sub-dicts into your text/vision configs).
    `vocab_size` defaults to the tokenizer's size rounded up to a multiple of 64 (the real checkpoints also have
    more embedding rows than tokens); a given one must hold every token.
    """
    if isinstance(processor, (str, Path)):
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(processor)
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise TypeError(f"processor must be a Qwen-VL processor (with .tokenizer and .image_processor) or its "
                        f"directory; got {type(processor).__name__}")

    def token_id(token: str) -> int:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
            raise ValueError(f"the tokenizer has no {token!r} token; a Qwen-VL processor needs it")
        return int(i)

    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = -(-n_tokens // 64) * 64
    elif vocab_size < n_tokens:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tokens} tokens)")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    return {
        "image_token_id": int(processor.image_token_id),
        "video_token_id": int(processor.video_token_id),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
        "text_config": {
            "vocab_size": int(vocab_size),
            "bos_token_id": token_id("<|endoftext|>"),  # as Qwen's configs: bos = <|endoftext|>
            "eos_token_id": int(eos) if eos is not None else token_id("<|im_end|>"),
            "pad_token_id": int(pad) if pad is not None else token_id("<|endoftext|>"),
        },
        "vision_config": {
            "in_channels": 3,
            "patch_size": int(image_processor.patch_size),
            "temporal_patch_size": int(image_processor.temporal_patch_size),
            "spatial_merge_size": int(image_processor.merge_size),
        },
    }


__all__ = ["QWEN_VL_CHAT_TEMPLATE", "QWEN_VL_SPECIAL_TOKENS", "TINY_IMAGE_GEOMETRY", "VARIANTS",
           "qwen_vl_config_fields", "write_tiny_qwen_vl_processor", "write_tiny_qwen_vl_tokenizer"]
