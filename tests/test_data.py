"""data.py: record formats, chat rendering, response-only labels, truncation, packing, fixed-shape batches."""

import json

import numpy as np
import pytest

from fastlora_jax.data import (IGNORE_INDEX, DataOptions, SFTData, assistant_spans, build_rows, bundled_dataset_path,
                               load_records, prepare_dataset, tokenize_records)

CONVERSATION = [
    {"role": "system", "content": "You are a calculator."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 10 plus 4?"},
    {"role": "assistant", "content": "10 plus 4 is 14."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from fastlora_jax.tiny import write_tiny_tokenizer
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def records():
    return load_records(bundled_dataset_path())


def _runs(labels):
    """Contiguous runs of trained label ids."""
    runs, current = [], []
    for x in labels:
        if x == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(int(x))
    return runs + ([current] if current else [])


def test_chat_rendering_equals_apply_chat_template(tokenizer, records):
    data = prepare_dataset(records[:8], tokenizer, 128)
    for row, record in zip(range(8), records):
        expected = tokenizer.apply_chat_template(record["messages"], tokenize=True)["input_ids"]
        n = int(data.attention_mask[row].sum())
        assert data.input_ids[row, :n].tolist() == expected
        # trained on everything (TRL's default) but the first token, which nothing predicts
        assert data.labels[row, 0] == IGNORE_INDEX
        assert data.labels[row, 1:n].tolist() == expected[1:]
        assert (data.labels[row, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("how", ["assistant_only_loss", "response_part"])
def test_response_only_labels_are_exactly_the_assistant_replies(tokenizer, how):
    kwargs = {"assistant_only_loss": True} if how == "assistant_only_loss" else \
        {"instruction_part": "<|user|>\n", "response_part": "<|assistant|>\n"}
    data = prepare_dataset([{"messages": CONVERSATION}], tokenizer, 256, **kwargs)
    runs = _runs(data.labels[0])
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert tokenizer.decode(run, skip_special_tokens=True).strip() == reply
        assert run[-1] == tokenizer.eos_token_id  # the model learns to stop
    # nothing of the prompts, the system message or the role headers is trained on
    trained = tokenizer.decode([t for r in runs for t in r])
    assert "What is" not in trained and "calculator" not in trained and "<|assistant|>" not in trained


def test_assistant_spans_are_character_exact(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    spans = assistant_spans(tokenizer, CONVERSATION, text)
    assert [text[s:e] for s, e in spans] == ["2 plus 3 is 5.</s>", "10 plus 4 is 14.</s>"]


def test_response_only_on_bundled_data(tokenizer, records):
    data = prepare_dataset(records, tokenizer, 128, assistant_only_loss=True)
    for row, record in enumerate(records):
        (run,) = _runs(data.labels[row])
        assert tokenizer.decode(run, skip_special_tokens=True) == record["messages"][-1]["content"]


def test_prompt_completion_trains_on_the_completion_and_eos(tokenizer):
    rows = [{"prompt": "Q: What is 2 plus 2?\nA:", "completion": " 4"}]
    data = prepare_dataset(rows, tokenizer, 64)
    n = int(data.attention_mask[0].sum())
    ids = data.input_ids[0, :n].tolist()
    assert tokenizer.decode(ids[:-1]) == rows[0]["prompt"] + rows[0]["completion"]
    assert ids[-1] == tokenizer.eos_token_id
    (run,) = _runs(data.labels[0])
    assert tokenizer.decode(run, skip_special_tokens=True) == " 4" and run[-1] == tokenizer.eos_token_id
    full = prepare_dataset(rows, tokenizer, 64, completion_only_loss=False)
    assert (full.labels[0, 1:n] != IGNORE_INDEX).all()


def test_conversational_prompt_completion(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}],
             "completion": [{"role": "assistant", "content": "Hello."}]}]
    data = prepare_dataset(rows, tokenizer, 64)
    n = int(data.attention_mask[0].sum())
    expected = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=True)["input_ids"]
    assert data.input_ids[0, :n].tolist() == expected
    (run,) = _runs(data.labels[0])
    assert tokenizer.decode(run, skip_special_tokens=True).strip() == "Hello."


def test_text_formats_sources_and_formatting_func(tokenizer, tmp_path):
    rows = [{"text": "The capital of France is Paris."}, {"text": "Ottawa is in Canada.</s>"}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from datasets import Dataset
    a = prepare_dataset(rows, tokenizer, 64)
    b = prepare_dataset(str(path), tokenizer, 64)
    c = prepare_dataset(Dataset.from_list(rows), tokenizer, 64)
    d = prepare_dataset([{"body": r["text"]} for r in rows], tokenizer, 64, dataset_text_field="body")
    e = prepare_dataset([{"x": r["text"]} for r in rows], tokenizer, 64, formatting_func=lambda r: r["x"])
    for other in (b, c, d, e):
        np.testing.assert_array_equal(a.input_ids, other.input_ids)
        np.testing.assert_array_equal(a.labels, other.labels)
    eos = tokenizer.eos_token_id
    lengths = a.attention_mask.sum(1)
    assert a.input_ids[0, lengths[0] - 1] == eos and a.input_ids[1, lengths[1] - 1] == eos
    assert (a.input_ids[1, : lengths[1]] == eos).sum() == 1  # an EOS already there is not doubled


def test_truncation_and_fixed_width(tokenizer, records):
    data = prepare_dataset(records, tokenizer, 16)
    assert data.input_ids.shape == (len(records), 16) and data.num_truncated == len(records)
    assert data.attention_mask.all()
    full = prepare_dataset(records, tokenizer, 1024, pad_to_multiple_of=8)
    longest = max(len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in records)
    assert full.seq_len == -(-longest // 8) * 8 and full.num_truncated == 0


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_keeps_all_tokens(tokenizer, records, strategy):
    plain = prepare_dataset(records, tokenizer, 128)
    packed = prepare_dataset(records, tokenizer, 128, packing=True, packing_strategy=strategy)
    assert packed.seq_len <= 128 and packed.num_rows < plain.num_rows
    plain_tokens = [plain.input_ids[r, : plain.attention_mask[r].sum()] for r in range(plain.num_rows)]
    packed_stream = np.concatenate([packed.input_ids[r, : packed.attention_mask[r].sum()]
                                    for r in range(packed.num_rows)])
    assert packed.num_tokens == plain.num_tokens == len(packed_stream)
    np.testing.assert_array_equal(np.sort(packed_stream), np.sort(np.concatenate(plain_tokens)))
    if strategy == "wrapped":  # one stream in dataset order
        np.testing.assert_array_equal(packed_stream, np.concatenate(plain_tokens))
    else:  # whole examples, each row within max_seq_length, the same targets as unpacked
        assert packed.num_label_tokens == plain.num_label_tokens
        bos = tokenizer.bos_token_id
        assert sum((packed.input_ids == bos).sum(1)) == len(records)
    # no target crosses an example boundary: every BOS (an example's first token) has label -100
    assert (packed.labels[packed.input_ids == tokenizer.bos_token_id] == IGNORE_INDEX).all()


def test_step_batches_fixed_shape_deterministic_and_cover_each_epoch(tokenizer, records):
    data = prepare_dataset(records[:10], tokenizer, 64)
    micro, accum, seed = 2, 2, 7
    steps = data.steps_per_epoch(micro * accum)
    assert steps == 3  # 10 rows, 4 per step: the last step is filled with rows without labels
    seen = []
    for step in range(steps):
        batch = data.step_batch(step, micro, accum, seed)
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert all(v.shape == (accum, micro, data.seq_len) and v.dtype == np.int32 for v in batch.values())
        rows = data.step_rows(step, micro, accum, seed)
        seen += [r for r in rows if r >= 0]
        filler = batch["labels"].reshape(-1, data.seq_len)[rows < 0]
        assert (filler == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(10))
    np.testing.assert_array_equal(data.step_rows(4, micro, accum, seed), data.step_rows(4, micro, accum, seed))
    assert not np.array_equal(data.epoch_order(seed, 0), data.epoch_order(seed, 1))
    np.testing.assert_array_equal(data.step_rows(steps + 1, micro, accum, seed)[:4], data.epoch_order(seed, 1)[4:8])


def test_eval_batches_fixed_shape(tokenizer, records):
    data = prepare_dataset(records[:5], tokenizer, 64)
    batches = list(data.eval_batches(2))
    assert len(batches) == 3 and all(b["input_ids"].shape == (2, data.seq_len) for b in batches)
    assert (batches[-1]["labels"][1] == IGNORE_INDEX).all()


def test_pretokenized_records(tokenizer):
    rows = [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10], "labels": [9, 10]}]
    data = prepare_dataset(rows, tokenizer, 16)
    assert data.labels[0, :4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    assert data.labels[1, :2].tolist() == [IGNORE_INDEX, 10]


def test_clear_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"dataset\[0\] has keys \['question'\]"):
        prepare_dataset([{"question": "hi"}], tokenizer, 16)
    with pytest.raises(TypeError, match="formatting_func returned list"):
        prepare_dataset([{"a": 1}], tokenizer, 16, formatting_func=lambda r: ["x"])
    with pytest.raises(ValueError, match="give both"):
        DataOptions(response_part="<|assistant|>")
    with pytest.raises(ValueError, match="packing_strategy='ffd'"):
        build_rows(tokenize_records([{"text": "a"}], tokenizer), 16, 0, packing=True, packing_strategy="ffd")
    with pytest.raises(ValueError, match="max_seq_length must be an int >= 2; got 0"):
        prepare_dataset([{"text": "a"}], tokenizer, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_records(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="assistant_only_loss=True needs chat data"):
        prepare_dataset([{"text": "a"}], tokenizer, 16, assistant_only_loss=True)
    import copy
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        prepare_dataset([{"messages": CONVERSATION}], no_template, 16)
    assert isinstance(prepare_dataset([{"text": "a b"}], tokenizer, 16), SFTData)
