"""Chat-style image + text examples -> one padded numpy batch for a vision-language model (Qwen2-VL, Qwen2.5-VL,
Llama 3.2 Vision).

`VisionDataCollator(model, processor)` (alias `UnslothVisionDataCollator`, the name Unsloth users know) takes a list
of examples such as

    {"messages": [{"role": "user", "content": [{"type": "image", "image": <PIL.Image | path | array>},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

(`"conversations"` and ShareGPT turns are accepted as in `fastlora_jax.data`; content may be a plain string; an
image part without `"image"` takes the next entry of the example's `"images"` list, as datasets that store images
in their own column do) and returns numpy arrays:

- `input_ids`, `attention_mask`, `labels`, `mm_token_type_ids`: `[B, S]` int32;
- `pixel_values`: `[total_patches, C*T*P*P]` float32 and `image_grid_thw`: `[n_images, 3]` int32, the images of
  the batch in order (`[0, C*T*P*P]` and `[0, 3]` when the batch has none).

For Mllama (its processor tiles each image and keeps one `<|image|>` token per image) the image arrays are
MllamaProcessor's: `pixel_values [B, images, tiles, C, H, W]` float32, `aspect_ratio_ids [B, images]`,
`aspect_ratio_mask [B, images, tiles]`, `cross_attention_mask [B, S, images, tiles]` int32 (none of them for a
text-only batch; the processor refuses a batch mixing examples with and without images, and so does the collator).
An image whose token falls after the truncation is dropped with its slot; `cross_attention_mask` is recomputed
from the final ids with transformers' own functions (`_collate_tiled`).

Everything image-related is the processor's: each example is rendered with `processor.apply_chat_template`, and
the batch goes through one `processor(text=..., images=...)` call; the collator only adds labels, truncation and
padding. So `input_ids`, `pixel_values` and `image_grid_thw` are exactly the processor's.

Labels (aligned with `input_ids`; the loss shifts them) are -100 on padding and on image/video pad tokens, and, by
default (`train_on_responses_only=True`), everywhere outside the assistant replies. A reply's span holds its text
and the template's end-of-turn marker (`<|im_end|>`), not the `<|im_start|>assistant\\n` header. The spans are found
on the rendered text as `fastlora_jax.data` finds them: by the renderings of the conversation before and up to each
assistant turn (`assistant_spans`), or, with `instruction_part=` / `response_part=` (Unsloth's
`train_on_responses_only`, e.g. `"<|im_start|>user\\n"` / `"<|im_start|>assistant\\n"`), by those markers
(`response_part_spans`). Character spans become token masks through the fast tokenizer's offsets on the rendered
text, where each image is still one `<|image_pad|>`; the mask is then repeated over each image's token run as the
processor expanded it (and the repetition is checked against the processor's ids). Unlike Unsloth's collator, whose
default trains on every token, the default here trains on the replies only; `train_on_responses_only=False` trains
on every token except padding and image pads.

Truncation (`max_seq_length`, default the model's `max_seq_length` if it has one) keeps the start of each example.
A cut inside an image's token run (`<|vision_start|>`, its pads, `<|vision_end|>`) raises a ValueError naming the
example and the smallest length that keeps the image; images wholly after the cut are dropped with their patches.
Padding is to the longest example, rounded up to `pad_to_multiple_of`, at most `max_seq_length`
(`padding="max_length"`: always `max_seq_length`), on `padding_side` ("right" by default).

Gemma 3 (`Gemma3Processor`): the batch holds `pixel_values [n_images, 3, H, W]` and `token_type_ids` (1 on the
soft image tokens: the model's bidirectional image blocks) instead of `image_grid_thw` / `mm_token_type_ids`. The
processor writes each `<start_of_image>` out as blank lines, `<start_of_image>`, the soft tokens and
`<end_of_image>`, so the labels are placed by tokenizing the text with those sequences written out (checked
against the processor's ids); labels are -100 on the soft tokens; a cut between an image's `<start_of_image>` and
`<end_of_image>` is an error.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from fastlora_jax.data import IGNORE_INDEX, _normalize_messages, assistant_spans, response_part_spans

PADDING_MODES = ("longest", "max_length")
PADDING_SIDES = ("right", "left")


class _Renderer:
    """What `data.assistant_spans` calls on a tokenizer, answered by the processor (whose chat template rules)."""

    def __init__(self, processor):
        self.processor = processor
        self.eos_token = getattr(processor.tokenizer, "eos_token", None)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _is_processor(obj) -> bool:
    return obj is not None and hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def _config_value(config, key):
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


class VisionDataCollator:
    """Collate chat-style image + text examples into a numpy batch (see the module docstring).

    `VisionDataCollator(model, processor)` as Unsloth's `UnslothVisionDataCollator(model, processor)`; the model
    is optional (`VisionDataCollator(processor)` or `processor=`) and is only read for its config's image/video
    token ids and vocabulary size (checked against the processor) and its `max_seq_length`.
    """

    def __init__(self, model=None, processor=None, max_seq_length: int | None = None, formatting_func=None,
                 ignore_index: int = IGNORE_INDEX, train_on_responses_only: bool = True,
                 instruction_part: str | None = None, response_part: str | None = None,
                 pad_to_multiple_of: int | None = None, padding: str = "longest", padding_side: str = "right"):
        if processor is None and _is_processor(model):
            model, processor = None, model
        if processor is None:
            raise ValueError("VisionDataCollator needs a processor: VisionDataCollator(model, processor) or "
                             "VisionDataCollator(processor=...), with the processor FastVisionModel.from_pretrained "
                             "returns (e.g. a Qwen2_5_VLProcessor)")
        if not _is_processor(processor):
            raise TypeError(f"processor must be a multimodal processor with .tokenizer and .image_processor (e.g. "
                            f"Qwen2_5_VLProcessor); got {type(processor).__name__}. A plain tokenizer cannot "
                            f"process images")
        tokenizer = processor.tokenizer
        if not getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the processor has no chat_template; set processor.chat_template")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"processor.tokenizer must be a fast tokenizer (character offsets locate the replies); "
                            f"got {type(tokenizer).__name__}")
        if tokenizer.pad_token_id is None:
            raise ValueError("processor.tokenizer has no pad_token; set one (Qwen-VL uses '<|endoftext|>')")
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None:
            raise ValueError(f"{type(processor).__name__} has no image_token_id; VisionDataCollator supports "
                             f"processors with one image token per image (Qwen2-VL, Qwen2.5-VL, Mllama)")
        if (instruction_part is None) != (response_part is None):
            raise ValueError(f"instruction_part={instruction_part!r} and response_part={response_part!r}: give both "
                             f"(as Unsloth's train_on_responses_only takes them) or neither")
        for key, value in (("instruction_part", instruction_part), ("response_part", response_part)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key} must be a non-empty string; got {value!r}")
        if max_seq_length is None:
            max_seq_length = getattr(model, "max_seq_length", None)
        if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                           or max_seq_length < 1):
            raise ValueError(f"max_seq_length must be a positive int or None; got {max_seq_length!r}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                               not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None; got {pad_to_multiple_of!r}")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding={padding!r} is not accepted; use one of {PADDING_MODES}")
        if padding == "max_length" and max_seq_length is None:
            raise ValueError("padding='max_length' needs max_seq_length")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side={padding_side!r} is not accepted; use one of {PADDING_SIDES}")
        if formatting_func is not None and not callable(formatting_func):
            raise TypeError(f"formatting_func must be callable; got {formatting_func!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")

        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.formatting_func = formatting_func
        self.ignore_index = ignore_index
        self.train_on_responses_only = bool(train_on_responses_only)
        self.instruction_part = instruction_part
        self.response_part = response_part
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding = padding
        self.padding_side = padding_side
        self.image_token = processor.image_token
        self.video_token = getattr(processor, "video_token", None)
        self.video_token_id = getattr(processor, "video_token_id", None)
        self.vision_start_id = self._special_id("<|vision_start|>")
        self.vision_end_id = self._special_id("<|vision_end|>")
        image_processor = processor.image_processor
        # Mllama's processor tiles each image and keeps its one <|image|> token; Qwen-VL's expands it into patches
        self.tiled = hasattr(image_processor, "max_image_tiles")
        # Gemma 3's processor writes each image placeholder (<start_of_image>) out as a text sequence (blank lines,
        # <start_of_image>, the soft tokens, <end_of_image>): `full_image_sequence`
        self.image_sequence = getattr(processor, "full_image_sequence", None)
        if self.image_sequence is not None:
            if getattr(image_processor, "do_pan_and_scan", False):
                raise ValueError("processor.image_processor.do_pan_and_scan=True is not supported by "
                                 "VisionDataCollator (the crops change each image's token run); set it to False")
            self.image_token_id = int(tokenizer.image_token_id)  # the soft token: what the model config names
            self.boi_id, self.eoi_id = int(tokenizer.boi_token_id), int(tokenizer.convert_tokens_to_ids(
                tokenizer.eoi_token))
            self.image_run = int(processor.image_seq_length)
            self.pixel_shape = (3, int(image_processor.size["height"]), int(image_processor.size["width"]))
        elif self.tiled:
            self.max_image_tiles = int(image_processor.max_image_tiles)
        else:
            self.merge_size = int(image_processor.merge_size)
            self.patch_dim = 3 * int(image_processor.temporal_patch_size) * int(image_processor.patch_size) ** 2
        self._renderer = _Renderer(processor)
        self._check_model(model)

    # ------------------------------------------------------------------------------------------ setup

    def _special_id(self, token: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(token)
        if i is None or i == self.tokenizer.unk_token_id or self.tokenizer.convert_ids_to_tokens(i) != token:
            return None
        return int(i)

    def _check_model(self, model) -> None:
        config = getattr(model, "config", None)
        for key, ours in (("image_token_id", self.image_token_id), ("video_token_id", self.video_token_id),
                          ("vision_start_token_id", self.vision_start_id)):
            theirs = _config_value(config, key)
            if theirs is not None and ours is not None and int(theirs) != int(ours):
                raise ValueError(f"the model's config has {key}={theirs} but the processor's tokenizer gives {ours}; "
                                 f"the model and the processor do not belong together")
        vocab = _config_value(_config_value(config, "text_config"), "vocab_size") or _config_value(config, "vocab_size")
        rows = getattr(getattr(model, "cfg", None), "embedding_rows", None)  # Mllama: the image token is row vocab
        if rows is not None:
            vocab = rows
        if vocab is not None and len(self.tokenizer) > int(vocab):
            raise ValueError(f"the processor's tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {vocab}; the model and the processor do not belong together")

    # ------------------------------------------------------------------------------------------ examples

    def _load_image(self, source, where: str):
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if path.startswith(("http://", "https://")):
                raise ValueError(f"{where}: image {path!r} is a URL; VisionDataCollator does not download, load it "
                                 f"first (PIL.Image.open)")
            if not Path(path).is_file():
                raise FileNotFoundError(f"{where}: image path {path!r} is not a file")
            from transformers.image_utils import load_image
            return load_image(path)
        if isinstance(source, dict):  # a datasets Image feature, not decoded: {"bytes": ..., "path": ...}
            if source.get("bytes"):
                from PIL import Image
                image = Image.open(io.BytesIO(source["bytes"]))
                image.load()
                return image
            if source.get("path"):
                return self._load_image(source["path"], where)
            raise ValueError(f"{where}: an image given as a dict needs 'bytes' or 'path'; got keys {sorted(source)}")
        if isinstance(source, np.ndarray):
            if source.ndim not in (2, 3) or source.size == 0:
                raise ValueError(f"{where}: an image array must be [H, W] or [H, W, C] (or [C, H, W]); got shape "
                                 f"{source.shape}")
            return source if source.flags.writeable else source.copy()  # torch warns on read-only arrays
        if type(source).__module__.startswith("PIL.") or hasattr(source, "getdata"):
            return source
        if hasattr(source, "__array__") and hasattr(source, "shape"):  # torch / jax arrays
            return self._load_image(np.asarray(source), where)
        raise TypeError(f"{where}: an image must be a PIL.Image, a numpy array, a file path or a datasets image "
                        f"dict; got {type(source).__name__}")

    def _example(self, record, i: int):
        """(messages to render, images in order of appearance) of example `i`."""
        where = f"examples[{i}]"
        if self.formatting_func is not None:
            record = self.formatting_func(record)
        if not isinstance(record, dict):
            raise TypeError(f"{where} is a {type(record).__name__}; each example must be a dict with 'messages'")
        key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
        if key is None:
            raise ValueError(f"{where} has keys {sorted(record)}; expected 'messages' (a list of {{'role', "
                             f"'content'}} turns, content a string or a list of {{'type': 'image'|'text'}} parts)")
        messages = _normalize_messages(record[key], f"{where}['{key}']")
        extra = record.get("images", record.get("image"))
        if extra is None:
            extra = []
        elif not isinstance(extra, (list, tuple)):
            extra = [extra]
        extra = list(extra)
        n_extra_used = 0
        rendered, images = [], []
        for j, m in enumerate(messages):
            content = m.get("content")
            mwhere = f"{where}['{key}'][{j}]"
            if isinstance(content, str):
                rendered.append({"role": m["role"], "content": content})
                continue
            if isinstance(content, dict):
                content = [content]
            if not isinstance(content, (list, tuple)):
                raise TypeError(f"{mwhere}['content'] is a {type(content).__name__}; expected a string or a list "
                                 f"of {{'type': 'image'|'text'}} parts")
            parts = []
            for k, part in enumerate(content):
                pwhere = f"{mwhere}['content'][{k}]"
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, dict):
                    raise TypeError(f"{pwhere} is a {type(part).__name__}; expected a dict such as "
                                     f"{{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': ...}}")
                kind = part.get("type")
                if kind is None:
                    kind = "image" if "image" in part else "text" if "text" in part else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"{pwhere} is a text part whose 'text' is {type(text).__name__}, not a str")
                    if self.image_token in text or (self.video_token and self.video_token in text):
                        raise ValueError(f"{pwhere}: the text holds the placeholder token {self.image_token!r} or "
                                         f"{self.video_token!r}; give images as {{'type': 'image'}} parts")
                    parts.append({"type": "text", "text": text})
                elif kind == "image":
                    source = part.get("image", part.get("path"))
                    if source is None:
                        if n_extra_used >= len(extra):
                            raise ValueError(f"{pwhere} is an image part without an image, and {where}['images'] "
                                             f"has no image left for it ({len(extra)} given)")
                        source = extra[n_extra_used]
                        n_extra_used += 1
                    images.append(self._load_image(source, pwhere))
                    parts.append({"type": "image"})
                else:
                    raise ValueError(f"{pwhere} has type={kind!r}; VisionDataCollator accepts 'text' and 'image' "
                                     f"parts (no videos)")
            rendered.append({"role": m["role"], "content": parts})
        if n_extra_used != len(extra):
            raise ValueError(f"{where}['images'] holds {len(extra)} images but its messages have {n_extra_used} image "
                             f"parts that take one; add one {{'type': 'image'}} part per image where it belongs")
        return rendered, images

    def _spans(self, messages, text: str):
        if not self.train_on_responses_only:
            return None
        if self.response_part is not None:
            return response_part_spans(text, self.instruction_part, self.response_part)
        return assistant_spans(self._renderer, messages, text)

    # ------------------------------------------------------------------------------------------ batch

    def __call__(self, examples) -> dict[str, np.ndarray]:
        if isinstance(examples, dict):
            raise TypeError("examples must be a list of example dicts (a batch); got one dict: wrap it in a list")
        if not isinstance(examples, (list, tuple)) or not examples:
            raise ValueError(f"examples must be a non-empty list of example dicts; got {examples!r:.80}")
        texts, spans, images_per = [], [], []
        for i, record in enumerate(examples):
            messages, images = self._example(record, i)
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            n_placeholders = text.count(self.image_token)
            if n_placeholders != len(images):
                raise ValueError(f"examples[{i}]: the chat template rendered {n_placeholders} image placeholders for "
                                 f"{len(images)} images; the template must render one {self.image_token!r} per "
                                 f"image part")
            texts.append(text)
            spans.append(self._spans(messages, text))
            images_per.append(images)
        if self.tiled:
            return self._collate_tiled(texts, spans, images_per)
        if self.image_sequence is not None:
            return self._collate_expanded(texts, spans, images_per)
        flat_images = [im for ims in images_per for im in ims]
        out = self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="np")
        if flat_images:
            grids = np.asarray(out["image_grid_thw"], np.int64).reshape(-1, 3)
            pixels = np.asarray(out["pixel_values"], np.float32)
        else:
            grids, pixels = np.zeros((0, 3), np.int64), np.zeros((0, self.patch_dim), np.float32)
        if len(grids) != len(flat_images):
            raise RuntimeError(f"the processor returned {len(grids)} image grids for {len(flat_images)} images")
        patch_end = np.cumsum(grids.prod(axis=1))
        patch_start = patch_end - grids.prod(axis=1)
        n_tokens = grids.prod(axis=1) // (self.merge_size ** 2)
        has_types = "mm_token_type_ids" in out

        rows, keep_images, missing = [], [], 0
        image_cursor = 0
        for i, text in enumerate(texts):
            mask = np.asarray(out["attention_mask"][i]).astype(bool)
            ids = np.asarray(out["input_ids"][i])[mask].astype(np.int64)
            types = np.asarray(out["mm_token_type_ids"][i])[mask] if has_types else None
            k_images = range(image_cursor, image_cursor + len(images_per[i]))
            image_cursor += len(images_per[i])
            trained, starts = self._token_mask(text, spans[i], ids, [int(n_tokens[k]) for k in k_images], i)
            if spans[i] is not None and not trained.any():
                missing += 1
            labels = np.where(trained, ids, self.ignore_index)
            labels[ids == self.image_token_id] = self.ignore_index
            if self.video_token_id is not None:
                labels[ids == self.video_token_id] = self.ignore_index
            ids, labels, types, kept = self._truncate(i, ids, labels, types, starts, list(k_images),
                                                      [int(n_tokens[k]) for k in k_images])
            keep_images += kept
            rows.append((ids, labels, types))
        if missing:
            warnings.warn(f"{missing} of {len(texts)} examples have no assistant reply to train on: their labels are "
                          f"all {self.ignore_index}", stacklevel=2)

        input_ids, labels, attention_mask, slices = self._pad(rows)
        mm_types = np.zeros(input_ids.shape, np.int32)
        for r, (_, _, types) in enumerate(rows):
            if types is not None:
                mm_types[r, slices[r]] = types
        if keep_images:
            pixel_values = np.concatenate([pixels[patch_start[k]:patch_end[k]] for k in keep_images])
            image_grid_thw = grids[keep_images].astype(np.int32)
        else:
            pixel_values = np.zeros((0, pixels.shape[-1] if pixels.ndim == 2 else self.patch_dim), np.float32)
            image_grid_thw = np.zeros((0, 3), np.int32)
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                  "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        if has_types:
            result["mm_token_type_ids"] = mm_types
        return result

    def _pad(self, rows):
        """`(input_ids, labels, attention_mask [B, S] int32, each row's slice)` of `rows` = [(ids, labels, ...)]:
        padded to the longest, rounded up to pad_to_multiple_of, at most max_seq_length (padding="max_length":
        always it), on padding_side."""
        longest = max(len(r[0]) for r in rows)
        seq = longest
        if self.pad_to_multiple_of:
            seq = -(-seq // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_seq_length is not None:
            seq = self.max_seq_length if self.padding == "max_length" else min(seq, self.max_seq_length)
        seq = max(seq, longest)
        batch = len(rows)
        input_ids = np.full((batch, seq), self.tokenizer.pad_token_id, np.int32)
        labels = np.full((batch, seq), self.ignore_index, np.int32)
        attention_mask = np.zeros((batch, seq), np.int32)
        slices = []
        for r, (ids, lab, *_) in enumerate(rows):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(seq - n, seq)
            input_ids[r, sl] = ids
            labels[r, sl] = lab
            attention_mask[r, sl] = 1
            slices.append(sl)
        return input_ids, labels, attention_mask, slices

    def _collate_tiled(self, texts, spans, images_per) -> dict[str, np.ndarray]:
        """Mllama: each image is one `<|image|>` token and a slot of `[images, tiles, C, H, W]` pixels.

        The processor makes the batch (one call, as for Qwen-VL); after the collator's truncation and padding the
        image slots are those of the kept images (an image whose token is cut off is dropped, and with it its
        slot; padding slots as the image processor pads them: zero pixels, aspect ratio id 0, first tile
        marked), and `cross_attention_mask` is recomputed from the final ids with transformers' own
        `get_cross_attention_token_mask` / `convert_sparse_cross_attention_mask_to_dense`, so an untruncated
        batch padded on the processor's side is exactly the processor's."""
        from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                                   get_cross_attention_token_mask)
        counts = [len(ims) for ims in images_per]
        if any(counts) and not all(counts):
            raise ValueError(f"examples {[i for i, n in enumerate(counts) if not n]} have no image while the others "
                             f"of the batch have some: MllamaProcessor takes a batch whose examples all have images, "
                             f"or none do (batch the text-only examples separately, or use batch size 1)")
        images = images_per if any(counts) else None
        out = self.processor(text=texts, images=images, padding=True, return_tensors="np")
        rows, kept_counts, missing = [], [], 0
        for i, text in enumerate(texts):
            mask = np.asarray(out["attention_mask"][i]).astype(bool)
            ids = np.asarray(out["input_ids"][i])[mask].astype(np.int64)
            trained, _ = self._token_mask(text, spans[i], ids, [1] * counts[i], i)
            if spans[i] is not None and not trained.any():
                missing += 1
            labels = np.where(trained, ids, self.ignore_index)
            labels[ids == self.image_token_id] = self.ignore_index
            if self.max_seq_length is not None:
                ids, labels = ids[:self.max_seq_length], labels[:self.max_seq_length]
            rows.append((ids, labels))
            kept_counts.append(int((ids == self.image_token_id).sum()))
        if missing:
            warnings.warn(f"{missing} of {len(texts)} examples have no assistant reply to train on: their labels are "
                          f"all {self.ignore_index}", stacklevel=3)
        input_ids, labels, attention_mask, _ = self._pad(rows)
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        slots = max(kept_counts)
        if slots == 0:
            return result  # text only (or every image cut off): the cross-attention layers are skipped
        pixel_values = np.zeros((len(rows), slots) + out["pixel_values"].shape[2:], np.float32)
        ratio_ids = np.zeros((len(rows), slots), np.int32)
        ratio_mask = np.zeros((len(rows), slots, self.max_image_tiles), np.int32)
        ratio_mask[:, :, 0] = 1
        for i, k in enumerate(kept_counts):
            pixel_values[i, :k] = out["pixel_values"][i, :k]
            ratio_ids[i, :k] = out["aspect_ratio_ids"][i, :k]
            ratio_mask[i, :k] = out["aspect_ratio_mask"][i, :k]
        token_masks = [get_cross_attention_token_mask(list(row), self.image_token_id) for row in input_ids]
        num_tiles = [[int(ratio_mask[i, j].sum()) for j in range(k)] for i, k in enumerate(kept_counts)]
        cross = convert_sparse_cross_attention_mask_to_dense(token_masks, num_tiles, self.max_image_tiles,
                                                             input_ids.shape[1])
        result.update(pixel_values=pixel_values, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
                      cross_attention_mask=cross.astype(np.int32))
        return result

    def _collate_expanded(self, texts, spans, images_per) -> dict[str, np.ndarray]:
        """Gemma 3: each image is its `full_image_sequence` in the ids and one `[3, H, W]` slot of `pixel_values`;
        `token_type_ids` (1 on the soft tokens) are the processor's, rebuilt after truncation and padding.

        An image cut by `max_seq_length` between its <start_of_image> and <end_of_image> is an error; images wholly
        after the cut are dropped with their pixels. Labels are -100 on the soft tokens."""
        counts = [len(ims) for ims in images_per]
        out = self.processor(text=texts, images=images_per if any(counts) else None, padding=True, return_tensors="np")
        rows, kept, missing, first_image = [], [], 0, 0
        for i, text in enumerate(texts):
            mask = np.asarray(out["attention_mask"][i]).astype(bool)
            ids = np.asarray(out["input_ids"][i])[mask].astype(np.int64)
            trained, starts = self._expanded_token_mask(text, spans[i], ids, counts[i], i)
            if spans[i] is not None and not trained.any():
                missing += 1
            labels = np.where(trained, ids, self.ignore_index)
            labels[ids == self.image_token_id] = self.ignore_index
            limit = len(ids) if self.max_seq_length is None else self.max_seq_length
            for n_image, start in enumerate(starts):
                last = start + self.image_run + 1  # its <end_of_image>
                if start < limit <= last:
                    raise ValueError(f"examples[{i}]: max_seq_length={limit} cuts through image {n_image} of the "
                                     f"example (its tokens are positions {start}..{last}); raise max_seq_length to "
                                     f"at least {last + 1}")
                if last < limit:
                    kept.append(first_image + n_image)
            first_image += counts[i]
            rows.append((ids[:limit], labels[:limit]))
        if missing:
            warnings.warn(f"{missing} of {len(texts)} examples have no assistant reply to train on: their labels are "
                          f"all {self.ignore_index}", stacklevel=3)
        input_ids, labels, attention_mask, _ = self._pad(rows)
        pixels = np.asarray(out["pixel_values"], np.float32)[kept] if kept else np.zeros((0,) + self.pixel_shape,
                                                                                         np.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixels,
                "token_type_ids": (input_ids == self.image_token_id).astype(np.int32)}

    def _expanded_token_mask(self, text: str, spans, ids: np.ndarray, n_images: int, i: int):
        """Trained-token mask over the processor's `ids` (Gemma 3) and each image's <start_of_image> position.

        The rendered `text` with each placeholder written out as the processor writes it is tokenized with
        offsets (its ids must be the processor's); the reply spans, found on `text`, move by the length each
        earlier placeholder gained."""
        import bisect
        pieces = text.split(self.image_token)
        expanded = self.image_sequence.join(pieces)
        enc = self.tokenizer(expanded, return_offsets_mapping=True, return_attention_mask=False)
        if not np.array_equal(np.asarray(enc["input_ids"], np.int64), ids):
            raise RuntimeError(f"examples[{i}]: the processor's input_ids are not the tokenized chat text with each "
                               f"image placeholder written out; cannot place the labels")
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        starts = [int(p) for p in np.flatnonzero(ids == self.boi_id)]
        if len(starts) != n_images or any(
                not (ids[s + 1:s + 1 + self.image_run] == self.image_token_id).all()
                or s + self.image_run + 1 >= len(ids) or ids[s + self.image_run + 1] != self.eoi_id for s in starts):
            raise RuntimeError(f"examples[{i}]: expected {n_images} runs of <start_of_image>, {self.image_run} image "
                               f"tokens, <end_of_image> in the processor's input_ids")
        if spans is None:
            return np.ones(len(ids), bool), starts
        placeholders = [len(self.image_token.join(pieces[:k + 1])) for k in range(len(pieces) - 1)]
        grow = len(self.image_sequence) - len(self.image_token)

        def moved(position):
            return position + grow * bisect.bisect_left(placeholders, position)

        trained = np.zeros(len(ids), bool)
        for s, e in spans:  # a token is trained on when it overlaps a span
            trained |= (offsets[:, 0] < moved(e)) & (offsets[:, 1] > moved(s))
        return trained, starts

    def _token_mask(self, text: str, spans, ids: np.ndarray, run_lengths: list[int], i: int):
        """Trained-token mask over the processor's `ids`, and each image's first token position.

        The rendered `text` (one placeholder per image) is tokenized with offsets; its ids, with each placeholder
        repeated as the processor expanded it, must be the processor's ids.
        """
        enc = self.tokenizer(text, return_offsets_mapping=True, return_attention_mask=False)
        short = np.asarray(enc["input_ids"], np.int64)
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        repeats = np.ones(len(short), np.int64)
        placeholder_pos = np.flatnonzero(short == self.image_token_id)
        if len(placeholder_pos) != len(run_lengths):
            raise RuntimeError(f"examples[{i}]: the tokenizer found {len(placeholder_pos)} image tokens in the "
                               f"rendered text for {len(run_lengths)} images")
        repeats[placeholder_pos] = run_lengths
        if not np.array_equal(np.repeat(short, repeats), ids):
            raise RuntimeError(f"examples[{i}]: the processor's input_ids are not the tokenized chat text with each "
                               f"image token expanded; cannot place the labels")
        if spans is None:
            short_mask = np.ones(len(short), bool)
        else:
            short_mask = np.zeros(len(short), bool)
            for s, e in spans:  # a token is trained on when it overlaps a span
                short_mask |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
        starts = (np.cumsum(repeats) - repeats)[placeholder_pos]
        return np.repeat(short_mask, repeats), [int(s) for s in starts]

    def _truncate(self, i, ids, labels, types, starts, image_indices, run_lengths):
        """Keep the first max_seq_length tokens; an image after the cut is dropped, one across it is an error."""
        limit = self.max_seq_length
        if limit is None or len(ids) <= limit:
            return ids, labels, types, image_indices
        kept = []
        for n_image, (k, start, n) in enumerate(zip(image_indices, starts, run_lengths)):
            first, last = start, start + n - 1
            if first > 0 and self.vision_start_id is not None and ids[first - 1] == self.vision_start_id:
                first -= 1
            if last + 1 < len(ids) and self.vision_end_id is not None and ids[last + 1] == self.vision_end_id:
                last += 1
            if first < limit <= last:
                raise ValueError(f"examples[{i}]: max_seq_length={limit} cuts through image {n_image} of the example "
                                 f"(its tokens are positions {first}..{last}); raise max_seq_length to at least "
                                 f"{last + 1}, or make the images smaller (the image processor's max_pixels)")
            if last < limit:
                kept.append(k)
        types = types[:limit] if types is not None else None
        return ids[:limit], labels[:limit], types, kept


UnslothVisionDataCollator = VisionDataCollator

__all__ = ["PADDING_MODES", "PADDING_SIDES", "UnslothVisionDataCollator", "VisionDataCollator"]
