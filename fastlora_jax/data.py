"""SFT data: records -> token ids + labels -> fixed-shape rows -> `[accum, micro_batch, seq]` batches.

Formats (as TRL's SFTTrainer reads them; the first that fits a record is used):

- pre-tokenized: `{"input_ids": [...]}` with optional `"labels"` (-100 = ignored), or TRL's
  `"completion_mask"` / `"assistant_masks"` (1 = trained on);
- `formatting_func(record) -> str`: the returned text is used as a plain-text example;
- chat: `{"messages": [{"role", "content"}, ...]}` (or `"conversations"`, with ShareGPT's
  `{"from", "value"}` turns accepted), rendered with `tokenizer.apply_chat_template`;
- prompt-completion: `{"prompt": ..., "completion": ...}`; strings, or message lists (conversational);
- plain text: `{dataset_text_field: str}` (default field `"text"`).

Labels:

- By default every token is trained on (TRL's default), except prompt-completion data, where only the
  completion is (TRL's `completion_only_loss=None`).
- `assistant_only_loss=True` (chat): only the assistant turns. Each turn's span is found by rendering
  the conversation before it with `add_generation_prompt=True` and the conversation up to and including
  it; the characters between the two renderings are the reply (with the template's end-of-turn tokens,
  so the model learns to stop). Characters map to tokens through the fast tokenizer's offsets, so a
  BPE merge across a boundary cannot shift the span. Templates whose renderings are not prefixes of
  each other fall back to finding the reply text itself.
- `instruction_part=` / `response_part=` (Unsloth's `train_on_responses_only`): on the rendered text,
  everything after each `response_part` up to the next `instruction_part` is trained on (less trailing
  whitespace, as above).
- The first token of every example is never a target (its label is -100): with packing, nothing is
  learned across an example boundary.

Rows: examples are truncated to `max_seq_length` (keeping the start). Without packing each example is one
row, right-padded to one length for the whole dataset (the longest example rounded up to
`pad_to_multiple_of`, at most `max_seq_length`), so the jitted train step compiles once. With packing:

- `"bfd"` (default; TRL's strategy name): best-fit-decreasing bin packing of whole examples into rows
  of `max_seq_length`; no example is split, every token is kept.
- `"wrapped"`: all examples concatenated in order and cut every `max_seq_length` tokens (TRL's older
  packing); examples may be split across rows.

Packed examples share a row with plain causal attention and positions 0..seq-1 (no per-example attention
isolation, no position reset: TRL's packing without `padding_free`). Each example ends with EOS (the chat
template's, or one appended to text), so the model sees where one ends and the next begins; labels never
cross a boundary (see above).

Batches: the step-`s` batch (0-based) is a pure function of `(seed, s)`: epoch `s // steps_per_epoch` uses
the permutation `default_rng([seed, epoch])` of the rows, and takes its `s % steps_per_epoch`-th slice of
`micro_batch * accum` rows. An incomplete last slice of an epoch is filled with rows that carry no
labels (the loss is token-weighted, so they change nothing).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

IGNORE_INDEX = -100
PACKING_STRATEGIES = ("bfd", "wrapped")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "model": "assistant"}


# ------------------------------------------------------------------------------------------ loading


def load_records(data, name: str = "dataset") -> list[dict]:
    """A list of dict records from a list of dicts, a dict of columns, a `.jsonl`/`.json` path or a
    `datasets.Dataset`."""
    if data is None:
        raise ValueError(f"{name} is None; pass a list of dicts, a .jsonl path or a datasets.Dataset")
    if isinstance(data, (str, os.PathLike)):
        return _read_json_records(Path(data), name)
    type_name = type(data).__name__
    if type_name in ("DatasetDict", "IterableDatasetDict"):
        raise TypeError(f"{name} is a {type_name} with splits {list(data.keys())}; pass one split, "
                        f"e.g. {name}=dataset['train']")
    if type_name == "IterableDataset":
        raise TypeError(f"{name} is a streaming datasets.IterableDataset; materialize it first "
                        f"(datasets.Dataset.from_list(list(ds.take(n))))")
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        records = data.to_list()
    elif isinstance(data, dict):
        lengths = {k: len(v) for k, v in data.items() if isinstance(v, (list, tuple))}
        if not lengths or len(lengths) != len(data) or len(set(lengths.values())) != 1:
            raise TypeError(f"{name} is a dict; a dataset given as a dict must map column names to lists of "
                            f"one length (got {({k: type(v).__name__ for k, v in data.items()})})")
        n = next(iter(lengths.values()))
        records = [{k: data[k][i] for k in data} for i in range(n)]
    elif isinstance(data, (list, tuple)):
        records = list(data)
    else:
        raise TypeError(f"{name} must be a list of dicts, a .jsonl path or a datasets.Dataset; "
                        f"got {type_name}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise TypeError(f"{name}[{i}] is a {type(r).__name__}; every record must be a dict")
    if not records:
        raise ValueError(f"{name} is empty")
    return records


def _read_json_records(path: Path, name: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name}: {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected one JSON object "
                                 f"per line (JSONL)") from err
    return load_records(records, name=f"{name} ({path})")


# ------------------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class DataOptions:
    """How records become token ids and labels (see the module docstring)."""
    dataset_text_field: str = "text"
    formatting_func: Callable[[dict], str] | None = None
    assistant_only_loss: bool = False
    completion_only_loss: bool | None = None
    instruction_part: str | None = None
    response_part: str | None = None
    add_eos: bool = True

    def __post_init__(self):
        if (self.instruction_part is None) != (self.response_part is None):
            raise ValueError(f"instruction_part={self.instruction_part!r} and response_part={self.response_part!r}: "
                             "give both (as Unsloth's train_on_responses_only takes them) or neither")
        for key in ("instruction_part", "response_part"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key} must be a non-empty string; got {value!r}")
        if not isinstance(self.dataset_text_field, str) or not self.dataset_text_field:
            raise ValueError(f"dataset_text_field must be a non-empty string; got {self.dataset_text_field!r}")
        if self.formatting_func is not None and not callable(self.formatting_func):
            raise TypeError(f"formatting_func must be callable; got {self.formatting_func!r}")


@dataclass
class _Text:
    """One example before tokenization: text, trained character spans (None: all), tokenizer flags."""
    text: str
    spans: list[tuple[int, int]] | None
    add_special_tokens: bool
    append_eos: bool


def _normalize_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {j} is a {type(m).__name__}, not a dict")
        if "role" in m:
            out.append(dict(m))
        elif "from" in m and "value" in m:  # ShareGPT
            role = SHAREGPT_ROLES.get(m["from"])
            if role is None:
                raise ValueError(f"{where}: message {j} has from={m['from']!r}; known: {sorted(SHAREGPT_ROLES)}")
            out.append({"role": role, "content": m["value"]})
        else:
            raise ValueError(f"{where}: message {j} has keys {sorted(m)}; expected 'role' and 'content'")
    return out


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], text: str | None = None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the rendered conversation; rendered here if None).

    A turn's span runs from the end of the rendering of the conversation before it with
    `add_generation_prompt=True` to the end of the rendering up to and including it (less trailing
    whitespace), so it holds the reply and the template's end-of-turn marker (EOS), not the assistant
    header.
    """
    if text is None:
        text = _render(tokenizer, messages, False)
    spans, cursor = [], 0
    eos = getattr(tokenizer, "eos_token", None)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = end = None
        if i > 0:
            prefix = _render(tokenizer, messages[:i], True)
            upto = _render(tokenizer, messages[: i + 1], False)
            if text.startswith(prefix) and len(prefix) >= cursor:
                start = len(prefix)
                if text.startswith(upto) and len(upto) > start:
                    end = start + len(text[start:len(upto)].rstrip())  # not the newline after EOS
        if end is None:  # the template renders history differently: find the reply itself
            content = m.get("content")
            if not isinstance(content, str) or not content:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered conversation (its content is "
                                 f"{type(content).__name__}); use instruction_part=/response_part= instead")
            found = text.find(content, start if start is not None else cursor)
            if found < 0:
                raise ValueError(f"cannot locate assistant turn {i} ({content[:40]!r}...) in the rendered "
                                 f"conversation; use instruction_part=/response_part= instead")
            start = found if start is None else start
            end = found + len(content)
            rest = text[end:]
            if eos and rest.lstrip(" ").startswith(eos):
                end += len(rest) - len(rest.lstrip(" ")) + len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def response_part_spans(text: str, instruction_part: str, response_part: str) -> list[tuple[int, int]]:
    """Unsloth's rule: after each `response_part`, up to the next `instruction_part` (or the end), less
    trailing whitespace (the template's newline after EOS is not a target)."""
    spans, pos = [], 0
    while True:
        i = text.find(response_part, pos)
        if i < 0:
            return spans
        start = i + len(response_part)
        j = text.find(instruction_part, start)
        end = j if j >= 0 else len(text)
        pos = max(end, start)
        end = start + len(text[start:end].rstrip())
        if end > start:
            spans.append((start, end))


def _record_to_text(record: dict, index: int, tokenizer, opts: DataOptions, name: str) -> _Text | None:
    """The example's text and trained spans; None for a pre-tokenized record."""
    where = f"{name}[{index}]"
    if "input_ids" in record:
        return None
    response_only = opts.response_part is not None
    if opts.formatting_func is not None:
        text = opts.formatting_func(record)
        if not isinstance(text, str):
            raise TypeError(f"formatting_func returned {type(text).__name__} for {where}; it is called on one "
                            f"record at a time and must return a str")
        return _plain_text(text, tokenizer, opts)
    key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    if key is not None:
        messages = _normalize_messages(record[key], where)
        _require_template(tokenizer)
        text = _render(tokenizer, messages, False)
        if response_only:
            spans = response_part_spans(text, opts.instruction_part, opts.response_part)
        elif opts.assistant_only_loss:
            spans = assistant_spans(tokenizer, messages, text)
        else:
            spans = None
        return _Text(text, spans, add_special_tokens=False, append_eos=False)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        completion_only = opts.completion_only_loss is not False
        if isinstance(prompt, (list, tuple)):
            _require_template(tokenizer)
            prompt_messages = _normalize_messages(prompt, where + ".prompt")
            completion_messages = _normalize_messages(completion, where + ".completion") \
                if isinstance(completion, (list, tuple)) else [{"role": "assistant", "content": completion}]
            prompt_text = _render(tokenizer, prompt_messages, True)
            text = _render(tokenizer, prompt_messages + completion_messages, False)
            if not text.startswith(prompt_text):
                raise ValueError(f"{where}: the chat template renders the prompt differently alone and with the "
                                 f"completion; cannot tell where the completion starts")
            special, eos = False, False
        else:
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise TypeError(f"{where}: prompt and completion must both be strings or both message lists")
            prompt_text, text = prompt, prompt + completion
            special, eos = _adds_special(tokenizer, text), opts.add_eos
        if response_only:
            spans = response_part_spans(text, opts.instruction_part, opts.response_part)
        elif completion_only:
            spans = [(len(prompt_text), len(text))]
        else:
            spans = None
        return _Text(text, spans, special, eos)
    if opts.dataset_text_field in record:
        text = record[opts.dataset_text_field]
        if not isinstance(text, str):
            raise TypeError(f"{where}[{opts.dataset_text_field!r}] is a {type(text).__name__}, not a str")
        return _plain_text(text, tokenizer, opts)
    raise ValueError(f"{where} has keys {sorted(record)}: expected 'messages' (chat), 'prompt' + 'completion', "
                     f"{opts.dataset_text_field!r} (dataset_text_field), 'input_ids', or pass formatting_func")


def _plain_text(text: str, tokenizer, opts: DataOptions) -> _Text:
    if opts.response_part is not None:
        spans = response_part_spans(text, opts.instruction_part, opts.response_part)
    elif opts.assistant_only_loss:
        raise ValueError("assistant_only_loss=True needs chat data ('messages'); for plain text give "
                         "instruction_part= and response_part= (train_on_responses_only)")
    else:
        spans = None
    return _Text(text, spans, _adds_special(tokenizer, text), opts.add_eos)


def _adds_special(tokenizer, text: str) -> bool:
    """Let the tokenizer add its special tokens (BOS) unless the text already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat data ('messages') needs a tokenizer with a chat_template; set "
                         "tokenizer.chat_template, or pass formatting_func to render records as text")


@dataclass
class Example:
    input_ids: np.ndarray  # [n] int32
    labels: np.ndarray     # [n] int32, -100 = not trained on


def tokenize_records(records: list[dict], tokenizer, opts: DataOptions | None = None,
                     name: str = "dataset") -> list[Example]:
    """Token ids and labels of each record (not truncated); see the module docstring for the rules."""
    opts = opts or DataOptions()
    texts = [_record_to_text(r, i, tokenizer, opts, name) for i, r in enumerate(records)]
    out: list[Example | None] = [None] * len(records)
    for i, t in enumerate(texts):
        if t is None:
            out[i] = _pretokenized(records[i], f"{name}[{i}]")
    missing_response = 0
    for flag in (True, False):
        idx = [i for i, t in enumerate(texts) if t is not None and t.add_special_tokens == flag]
        for lo in range(0, len(idx), 1024):
            chunk = idx[lo: lo + 1024]
            ids_list, masks = _tokenize_with_spans(tokenizer, [texts[i] for i in chunk], flag)
            for i, ids, mask in zip(chunk, ids_list, masks):
                t = texts[i]
                if t.spans is not None and not mask.any():
                    missing_response += 1
                out[i] = _finish(ids, mask, t.append_eos, tokenizer)
    if missing_response and opts.response_part is not None:
        warnings.warn(f"{missing_response} of {len(records)} examples of {name} contain no response_part "
                      f"{opts.response_part!r}: they carry no labels", stacklevel=2)
    return out  # type: ignore[return-value]


def _tokenize_with_spans(tokenizer, texts: list[_Text], add_special_tokens: bool):
    strings = [t.text for t in texts]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(strings, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_attention_mask=False)
        ids_list, masks = [], []
        for t, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            ids = np.asarray(ids, np.int32)
            if t.spans is None:
                mask = np.ones(len(ids), bool)
            else:
                off = np.asarray(offsets, np.int64).reshape(-1, 2)
                tok_start, tok_end = off[:, 0], off[:, 1]
                mask = np.zeros(len(ids), bool)
                for s, e in t.spans:  # a token is trained on when it overlaps a span
                    mask |= (tok_start < e) & (tok_end > s)
            ids_list.append(ids)
            masks.append(mask)
        return ids_list, masks
    # A slow tokenizer has no offsets: span boundaries from the token counts of text prefixes.
    ids_list, masks = [], []
    for t in texts:
        ids = np.asarray(tokenizer(t.text, add_special_tokens=add_special_tokens)["input_ids"], np.int32)
        mask = np.ones(len(ids), bool) if t.spans is None else np.zeros(len(ids), bool)
        for s, e in t.spans or ():
            n_s = len(tokenizer(t.text[:s], add_special_tokens=add_special_tokens)["input_ids"])
            n_e = len(tokenizer(t.text[:e], add_special_tokens=add_special_tokens)["input_ids"])
            mask[n_s:n_e] = True
        ids_list.append(ids)
        masks.append(mask)
    return ids_list, masks


def _finish(ids: np.ndarray, mask: np.ndarray, append_eos: bool, tokenizer) -> Example:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos_id is not None and (len(ids) == 0 or ids[-1] != eos_id):
        ids = np.append(ids, np.int32(eos_id))
        mask = np.append(mask, bool(mask[-1]) if len(mask) else True)
    labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    if len(labels):
        labels[0] = IGNORE_INDEX
    return Example(ids.astype(np.int32), labels)


def _pretokenized(record: dict, where: str) -> Example:
    ids = np.asarray(record["input_ids"])
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{where}['input_ids'] must be a flat list of ints")
    ids = ids.astype(np.int32)
    if "labels" in record:
        labels = np.asarray(record["labels"], np.int32)
    else:
        mask_key = next((k for k in ("completion_mask", "assistant_masks") if k in record), None)
        mask = np.asarray(record[mask_key], bool) if mask_key else np.ones(len(ids), bool)
        if mask.shape != ids.shape:
            raise ValueError(f"{where}[{mask_key!r}] has {mask.size} entries; input_ids has {ids.size}")
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    if labels.shape != ids.shape:
        raise ValueError(f"{where}['labels'] has {labels.size} entries; input_ids has {ids.size}")
    labels = labels.copy()
    if len(labels):
        labels[0] = IGNORE_INDEX
    return Example(ids, labels)


# ------------------------------------------------------------------------------------------ rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class SFTData:
    """Fixed-shape rows `[num_rows, seq]` ready for the train step, and how they were made."""
    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    num_examples: int
    num_truncated: int
    packing: bool
    pad_token_id: int
    stats: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_label_tokens(self) -> int:
        """Tokens that are loss targets (labels shift by one inside the loss)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.input_ids, self.labels, self.attention_mask):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- training order
    def steps_per_epoch(self, rows_per_step: int) -> int:
        return -(-self.num_rows // rows_per_step)

    def epoch_order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        if not shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([int(seed), int(epoch)]).permutation(self.num_rows)

    def position(self, step: int, rows_per_step: int) -> tuple[int, int]:
        """(epoch, index of the batch within the epoch) of the 0-based step `step`."""
        spe = self.steps_per_epoch(rows_per_step)
        return step // spe, step % spe

    def step_rows(self, step: int, micro_batch: int, accum: int, seed: int, shuffle: bool = True) -> np.ndarray:
        """Row indices of the 0-based step `step` (-1: a filler row)."""
        per_step = micro_batch * accum
        epoch, k = self.position(step, per_step)
        rows = self.epoch_order(seed, epoch, shuffle)[k * per_step: (k + 1) * per_step]
        return np.concatenate([rows, np.full(per_step - len(rows), -1, rows.dtype)])

    def step_batch(self, step: int, micro_batch: int, accum: int, seed: int, shuffle: bool = True) -> dict:
        """The batch of the 0-based step `step`: `input_ids`, `labels`, `attention_mask`, each
        `[accum, micro_batch, seq]` int32."""
        rows = self.step_rows(step, micro_batch, accum, seed, shuffle)
        return {k: v.reshape(accum, micro_batch, self.seq_len) for k, v in self.take(rows).items()}

    def take(self, rows: np.ndarray) -> dict:
        """Rows by index (-1: a filler row: pad tokens, no labels; attended, so no query is fully masked)."""
        rows = np.asarray(rows)
        real = rows >= 0
        safe = np.where(real, rows, 0)
        ids = np.where(real[:, None], self.input_ids[safe], self.pad_token_id).astype(np.int32)
        labels = np.where(real[:, None], self.labels[safe], IGNORE_INDEX).astype(np.int32)
        mask = np.where(real[:, None], self.attention_mask[safe], 1).astype(np.int32)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """The rows in order, `[batch_size, seq]` each; the last batch is filled with filler rows."""
        for lo in range(0, self.num_rows, batch_size):
            rows = np.arange(lo, min(lo + batch_size, self.num_rows))
            yield self.take(np.concatenate([rows, np.full(batch_size - len(rows), -1, rows.dtype)]))


def build_rows(examples: list[Example], max_seq_length: int, pad_token_id: int, packing: bool = False,
               packing_strategy: str = "bfd", pad_to_multiple_of: int | None = 8) -> SFTData:
    """Truncate, pack or pad the examples into fixed-shape rows (see the module docstring)."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length must be an int >= 2; got {max_seq_length!r}")
    if packing_strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing_strategy={packing_strategy!r} is not accepted; use one of {PACKING_STRATEGIES}")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                           not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None; got {pad_to_multiple_of!r}")
    examples = [e for e in examples if len(e.input_ids)]
    if not examples:
        raise ValueError("no example has any tokens")
    truncated = sum(len(e.input_ids) > max_seq_length for e in examples)
    if not (packing and packing_strategy == "wrapped"):
        examples = [Example(e.input_ids[:max_seq_length], e.labels[:max_seq_length]) for e in examples]
    if not packing:
        groups = [[i] for i in range(len(examples))]
        truncated_count = truncated
    elif packing_strategy == "bfd":
        groups = _best_fit_decreasing([len(e.input_ids) for e in examples], max_seq_length)
        truncated_count = truncated
    else:
        groups = None
        truncated_count = 0
    if groups is not None:
        rows_ids = [np.concatenate([examples[i].input_ids for i in g]) for g in groups]
        rows_labels = [np.concatenate([examples[i].labels for i in g]) for g in groups]
    else:  # wrapped: one stream, cut every max_seq_length tokens
        stream_ids = np.concatenate([e.input_ids for e in examples])
        stream_labels = np.concatenate([e.labels for e in examples])
        cuts = range(0, len(stream_ids), max_seq_length)
        rows_ids = [stream_ids[c: c + max_seq_length] for c in cuts]
        rows_labels = [stream_labels[c: c + max_seq_length] for c in cuts]
    longest = max(len(r) for r in rows_ids)
    seq = min(max_seq_length, _round_up(longest, pad_to_multiple_of or 1))
    n = len(rows_ids)
    input_ids = np.full((n, seq), pad_token_id, np.int32)
    labels = np.full((n, seq), IGNORE_INDEX, np.int32)
    attention_mask = np.zeros((n, seq), np.int32)
    for r, (ids, lab) in enumerate(zip(rows_ids, rows_labels)):
        input_ids[r, : len(ids)] = ids
        labels[r, : len(lab)] = lab
        attention_mask[r, : len(ids)] = 1
    stats = {"examples": len(examples), "rows": n, "seq_len": seq, "tokens": int(attention_mask.sum()),
             "truncated": truncated_count, "fill": float(attention_mask.mean())}
    return SFTData(input_ids, labels, attention_mask, len(examples), truncated_count, packing, int(pad_token_id),
                   stats)


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each bin's total length <= capacity; longest examples placed first, each
    into the fullest bin that still has room (a sorted list of (room, bin) pairs)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # sorted (remaining room, bin index)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(rooms, (n, -1))
        if j < len(rooms):
            room, b = rooms.pop(j)
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(rooms, (room - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(rooms, (capacity - n, len(bins) - 1))
    for b in bins:  # examples within a row in dataset order
        b.sort()
    return bins


def pad_token_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def prepare_dataset(data, tokenizer, max_seq_length: int, *, packing: bool = False, packing_strategy: str = "bfd",
                    pad_to_multiple_of: int | None = 8, options: DataOptions | None = None,
                    name: str = "dataset", **option_kwargs) -> SFTData:
    """Records (list of dicts, .jsonl path, datasets.Dataset) -> fixed-shape `SFTData`.

    `option_kwargs` are `DataOptions` fields (dataset_text_field, formatting_func, assistant_only_loss,
    completion_only_loss, instruction_part, response_part, add_eos).
    """
    if options is not None and option_kwargs:
        raise TypeError("pass either options= or DataOptions fields, not both")
    options = options or DataOptions(**option_kwargs)
    if tokenizer is None:
        raise ValueError(f"{name} needs a tokenizer (processing_class) to be tokenized")
    records = load_records(data, name=name)
    examples = tokenize_records(records, tokenizer, options, name=name)
    return build_rows(examples, max_seq_length, pad_token_id_of(tokenizer), packing=packing,
                      packing_strategy=packing_strategy, pad_to_multiple_of=pad_to_multiple_of)


def bundled_dataset_path() -> Path:
    """The small chat dataset shipped with the package (`fastlora_jax/data/tiny_chat.jsonl`)."""
    return Path(__file__).parent / "bundled_data" / "tiny_chat.jsonl"


__all__ = ["IGNORE_INDEX", "DataOptions", "Example", "SFTData", "assistant_spans", "build_rows", "bundled_dataset_path",
           "load_records", "pad_token_id_of", "prepare_dataset", "response_part_spans", "tokenize_records"]
