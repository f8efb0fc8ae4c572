"""A tiny offline Gemma 3 vision-language checkpoint and processor for the tests, the notebook and the benchmark.

No model hub is reachable, so both are made here:
- the processor is transformers' own `Gemma3Processor`: its `Gemma3ImageProcessor` set small (`TINY_IMAGE_SIZE`
  px, so `TINY_IMAGE_SIZE / 14` squared patches, pooled to `TINY_MM_TOKENS` soft tokens) and a byte-level BPE
  trained on the bundled chat data with Gemma 3's special tokens (`<start_of_image>`, `<end_of_image>`,
  `<image_soft_token>` as the tokenizer's boi / eoi / image tokens) and Gemma 3's chat template;
- the checkpoint is written by transformers' `Gemma3ForConditionalGeneration.save_pretrained`, so the files are
  exactly what transformers writes, with every parameter random (`write_tiny_gemma3_vl`).

The special tokens take the first ids, Gemma's four in Gemma's order (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>`
3); `gemma3_config_fields` gives the config values (token ids, vocab size, image geometry) a model must use to
agree with the processor. Needs torch, and for the processor torchvision and pillow.
"""

from __future__ import annotations

import math
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>")
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# Gemma 3's chat template (google/gemma-3-4b-it), image parts included.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

TINY_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px
TINY_MM_TOKENS = 16  # pooled 2 x 2 to 4 x 4 soft tokens per image
# Every linear's in_features is a multiple of 64 (bitsandbytes 0.50's CPU dequantize_4bit is wrong otherwise).
TINY_GEMMA3_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=TINY_IMAGE_SIZE, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                          vision_use_head=False)
# The window (6) is shorter than an image's 16 tokens and than the prompts: sliding layers cut image blocks.
TINY_GEMMA3_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, query_pre_attn_scalar=32, sliding_window=6, max_position_embeddings=512, rms_norm_eps=1e-6,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}})
_EXTRA_CORPUS = ["You are a helpful assistant.", "Describe this image.", "What is in the picture?",
                 "The image shows a red square on a blue background.", "Compare the two images."]


def _corpus() -> list[str]:
    from fastlora_jax.tiny_vision import _corpus as chat_corpus
    return _EXTRA_CORPUS + chat_corpus()


def write_tiny_gemma3_tokenizer(directory=None, vocab_size: int = 512):
    """A byte-level BPE with Gemma 3's special tokens (ids 0..8), boi / eoi / image tokens and chat template;
    saved when `directory` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + special tokens + merges); got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", clean_up_tokenization_spaces=False,
                                   extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_TOKEN})
    fast.chat_template = GEMMA3_CHAT_TEMPLATE
    for i, t in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(t) == i, (t, fast.convert_tokens_to_ids(t))
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def write_tiny_gemma3_processor(directory=None, image_size: int = TINY_IMAGE_SIZE, mm_tokens: int = TINY_MM_TOKENS,
                                vocab_size: int = 512):
    """A `Gemma3Processor` (the Gemma 3 image processor at `image_size` px, `mm_tokens` soft tokens per image, the
    tiny tokenizer); saved when `directory` is given (`AutoProcessor.from_pretrained(directory)` loads it back)."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int (pixels); got {image_size!r}")
    if isinstance(mm_tokens, bool) or not isinstance(mm_tokens, int) or math.isqrt(mm_tokens) ** 2 != mm_tokens:
        raise ValueError(f"mm_tokens must be a square int (tokens per image); got {mm_tokens!r}")
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    tokenizer = write_tiny_gemma3_tokenizer(None, vocab_size=vocab_size)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        processor.save_pretrained(directory)
    return processor


def gemma3_config_fields(processor, vocab_size: int | None = None) -> dict:
    """The config values a Gemma3ForConditionalGeneration needs to agree with `processor` (or its directory):
    `{image_token_index, boi_token_index, eoi_token_index, mm_tokens_per_image, text_config: {vocab_size,
    bos/eos/pad_token_id}, vision_config: {image_size}}`. `vocab_size` defaults to the tokenizer's size rounded up
    to a multiple of 64; a given one must hold every token."""
    if isinstance(processor, (str, Path)):
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(processor)
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None or not hasattr(processor, "full_image_sequence"):
        raise TypeError(f"processor must be a Gemma3Processor or its directory; got {type(processor).__name__}")
    return _config_fields(tokenizer, int(image_processor.size["height"]), int(processor.image_seq_length), vocab_size)


def _config_fields(tokenizer, image_size: int, mm_tokens: int, vocab_size: int | None) -> dict:
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = -(-n_tokens // 64) * 64
    elif vocab_size < n_tokens:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tokens} tokens)")
    return {
        "image_token_index": int(tokenizer.image_token_id),
        "boi_token_index": int(tokenizer.convert_tokens_to_ids(BOI)),
        "eoi_token_index": int(tokenizer.convert_tokens_to_ids(EOI)),
        "mm_tokens_per_image": int(mm_tokens),
        "text_config": {"vocab_size": int(vocab_size), "bos_token_id": int(tokenizer.bos_token_id),
                        "eos_token_id": int(tokenizer.eos_token_id),
                        "pad_token_id": int(tokenizer.pad_token_id)},
        "vision_config": {"image_size": int(image_size)},
    }


# Standard deviations of the random weights, by module leaf (the rest: 0.02). Queries and keys larger so attention
# is far from uniform (masks, windows and the image blocks then move the logits), the token embedding and the
# projector so that images and text both matter.
_STD_BY_MODULE = {"q_proj": 0.15, "k_proj": 0.15, "embed_tokens": 0.1, "lm_head": 0.1, "position_embedding": 0.3,
                  "patch_embedding": 0.05, "multi_modal_projector": 0.3}


def randomize_(model, seed: int) -> None:
    """Redraw every parameter of a torch Gemma 3 model in place from a generator seeded with `seed`: LayerNorm
    weights (initialized to ones) 1 + 0.1·N, Gemma's (1 + w) RMSNorm weights and the projection (initialized to
    zeros) 0.1·N / 0.3·N, everything else std·N (biases included: transformers initializes them to zero)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            parts = name.split(".")
            module = parts[-2] if len(parts) > 1 else ""
            if "norm" in module and parts[-1] == "weight":
                p.copy_(1.0 + 0.1 * noise if bool((p == 1).all()) else 0.1 * noise)
            elif parts[-1] == "mm_input_projection_weight":
                p.copy_(_STD_BY_MODULE["multi_modal_projector"] * noise)
            else:
                p.copy_(_STD_BY_MODULE.get(module, 0.02) * noise)


def write_tiny_gemma3_vl(directory, seed: int = 0, dtype: str = "float32", processor: bool = True,
                         **overrides) -> Path:
    """Write a random `Gemma3ForConditionalGeneration` checkpoint with transformers' save_pretrained, plus (with
    `processor=True`) the tiny processor, whose token ids and image geometry the config takes.

    `text_config=` / `vision_config=` dicts are merged into the tiny defaults; other overrides go to
    `Gemma3Config` (e.g. `tie_word_embeddings=False`). Every parameter is random (`randomize_`). Needs torch
    (and, with `processor=True`, torchvision)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = {**TINY_GEMMA3_TEXT, **overrides.pop("text_config", {})}
    vision = {**TINY_GEMMA3_VISION, **overrides.pop("vision_config", {})}
    mm_tokens = overrides.pop("mm_tokens_per_image", TINY_MM_TOKENS)
    vocab_size = text.pop("vocab_size", None)
    if processor:
        proc = write_tiny_gemma3_processor(directory, image_size=vision["image_size"], mm_tokens=mm_tokens)
        fields = gemma3_config_fields(proc, vocab_size=vocab_size)
    else:  # the tokenizer's ids only: no image processor, no torchvision needed
        fields = _config_fields(write_tiny_gemma3_tokenizer(None), vision["image_size"], mm_tokens, vocab_size)
    text.update(fields.pop("text_config"))
    vision.update(fields.pop("vision_config"))
    config = Gemma3Config(text_config=text, vision_config=vision, **{**fields, **overrides})
    config.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


__all__ = ["BOI", "EOI", "GEMMA3_CHAT_TEMPLATE", "IMAGE_TOKEN", "SPECIAL_TOKENS", "TINY_GEMMA3_TEXT",
           "TINY_GEMMA3_VISION", "TINY_IMAGE_SIZE", "TINY_MM_TOKENS", "gemma3_config_fields", "randomize_",
           "write_tiny_gemma3_processor", "write_tiny_gemma3_tokenizer", "write_tiny_gemma3_vl"]
