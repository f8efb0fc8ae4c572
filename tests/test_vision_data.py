"""The tiny offline Qwen-VL processors (fastlora_jax.tiny_vision) and the image + text collator (vision_data)."""

import numpy as np
import pytest

pytest.importorskip("PIL", reason="the Qwen-VL processors need pillow")
pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision (video processor)")

from PIL import Image
from transformers import AutoProcessor

from fastlora_jax.tiny_vision import (
    QWEN_VL_CHAT_TEMPLATE,
    QWEN_VL_SPECIAL_TOKENS,
    VARIANTS,
    qwen_vl_config_fields,
    write_tiny_qwen_vl_processor,
)
from fastlora_jax.vision_data import UnslothVisionDataCollator, VisionDataCollator

IGNORE = -100
END = "<|im_end|>"


@pytest.fixture(scope="module")
def proc_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vl")
    dirs = {v: root / v for v in VARIANTS}
    for variant, directory in dirs.items():
        write_tiny_qwen_vl_processor(directory, variant=variant)
    return dirs


@pytest.fixture(scope="module")
def processor(proc_dirs):
    return AutoProcessor.from_pretrained(proc_dirs["qwen2_5_vl"])


def image(rng, h, w):
    return Image.fromarray(rng.integers(1, 256, (h, w, 3), dtype=np.uint8))


def user(*parts):
    return {"role": "user", "content": list(parts)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def txt(t):
    return {"type": "text", "text": t}


def img_part(im=None):
    return {"type": "image"} if im is None else {"type": "image", "image": im}


def batch_examples(rng):
    """One image; no image (plain string content); two images from 'images' and two assistant turns."""
    return [
        {"messages": [user(img_part(image(rng, 56, 84)), txt("What is this?")), assistant("A red cat.")]},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]},
        {"messages": [user(img_part(), txt("Compare"), img_part()), assistant("They differ."),
                      user(txt("Sure?")), assistant("Yes.")],
         "images": [image(rng, 56, 56), image(rng, 30, 200)]},
    ]


REPLIES = [["A red cat."], ["Hello there!"], ["They differ.", "Yes."]]


def direct(processor, examples, images):
    """What the processor alone gives for the same chat-templated texts and images."""
    texts = [processor.apply_chat_template(
        [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
          [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]} for m in ex["messages"]],
        tokenize=False) for ex in examples]
    return processor(text=texts, images=images or None, padding=True, return_tensors="np")


def kept_text(processor, ids, labels):
    return processor.tokenizer.decode(ids[labels != IGNORE], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------ processor


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_saves_and_reloads(proc_dirs, variant):
    p = AutoProcessor.from_pretrained(proc_dirs[variant])
    assert type(p).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}[variant]
    assert type(p.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert p.chat_template == QWEN_VL_CHAT_TEMPLATE
    for i, token in enumerate(QWEN_VL_SPECIAL_TOKENS):
        assert p.tokenizer.convert_tokens_to_ids(token) == i
        assert p.tokenizer(token)["input_ids"] == [i]  # one atomic token
    fields = qwen_vl_config_fields(p)
    assert fields == qwen_vl_config_fields(proc_dirs[variant])  # from the directory too
    tok = p.tokenizer
    assert fields["image_token_id"] == p.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert fields["video_token_id"] == p.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert fields["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert fields["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert fields["text_config"]["vocab_size"] >= len(tok) and fields["text_config"]["vocab_size"] % 64 == 0
    assert fields["text_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert fields["text_config"]["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert fields["vision_config"] == {"in_channels": 3, "patch_size": 14, "temporal_patch_size": 2,
                                       "spatial_merge_size": 2}
    rng = np.random.default_rng(0)
    out = p.image_processor(images=[image(rng, 56, 56), image(rng, 20, 20), image(rng, 400, 300)], return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 4, 4], [1, 4, 4], [1, 8, 6]])  # min/max pixels hold
    assert out["pixel_values"].shape == (16 + 16 + 48, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="vocab_size=10"):
        qwen_vl_config_fields(p, vocab_size=10)


def test_processor_chat_template_renders_images_and_text(processor):
    text = processor.apply_chat_template([user(img_part(), txt("Hi")), assistant("Yo")], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n")
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_bad_variant(tmp_path):
    with pytest.raises(ValueError, match="variant='llava'"):
        write_tiny_qwen_vl_processor(tmp_path, variant="llava")


# ------------------------------------------------------------------------------------------ collator


def test_collator_equals_processor_and_labels_are_the_replies(processor):
    rng = np.random.default_rng(1)
    examples = batch_examples(rng)
    images = [examples[0]["messages"][0]["content"][0]["image"], *examples[2]["images"]]
    batch = VisionDataCollator(None, processor)(examples)
    ref = direct(processor, examples, images)
    assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(batch["mm_token_type_ids"], ref["mm_token_type_ids"])
    np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(batch["image_grid_thw"], ref["image_grid_thw"])
    assert batch["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 4, 6], [1, 4, 4], [1, 2, 14]])

    end_id = processor.tokenizer.convert_tokens_to_ids(END)
    for r, replies in enumerate(REPLIES):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        assert kept_text(processor, ids, labels) == "".join(reply + END for reply in replies)
        kept = labels != IGNORE
        np.testing.assert_array_equal(labels[kept], ids[kept])  # labels are the ids where kept, -100 elsewhere
        assert set(np.unique(labels[~kept])) == {IGNORE}
        # each kept run is one reply ending in <|im_end|>, right after '<|im_start|>assistant\n'
        edges = np.flatnonzero(np.diff(np.concatenate([[0], kept.astype(int), [0]])))
        runs = list(zip(edges[::2], edges[1::2]))
        assert len(runs) == len(replies)
        for (s, e), reply in zip(runs, replies):
            assert ids[e - 1] == end_id
            assert processor.tokenizer.decode(ids[s:e]) == reply + END
            assert processor.tokenizer.decode(ids[:s]).endswith("<|im_start|>assistant\n")
        assert not kept[batch["attention_mask"][r] == 0].any()


def test_image_token_runs_match_grids(processor):
    rng = np.random.default_rng(2)
    batch = VisionDataCollator(processor)(batch_examples(rng))
    ids = batch["input_ids"]
    image_id = processor.image_token_id
    fields = qwen_vl_config_fields(processor)
    start_id, end_id = fields["vision_start_token_id"], fields["vision_end_token_id"]
    runs = []
    for row in ids:
        is_img = (row == image_id).astype(int)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], is_img, [0]])))
        for s, e in zip(edges[::2], edges[1::2]):
            assert row[s - 1] == start_id and row[e] == end_id
            runs.append(e - s)
    merge = processor.image_processor.merge_size
    expected = [int(t * h * w) // merge ** 2 for t, h, w in batch["image_grid_thw"]]
    assert runs == expected == [6, 4, 7]
    assert batch["pixel_values"].shape == (int(batch["image_grid_thw"].prod(axis=1).sum()), 3 * 2 * 14 * 14)
    assert (batch["labels"][ids == image_id] == IGNORE).all()
    assert (batch["mm_token_type_ids"] == (ids == image_id)).all()


def test_instruction_and_response_parts_give_the_same_labels(processor):
    rng = np.random.default_rng(3)
    examples = batch_examples(rng)
    by_render = VisionDataCollator(processor)(examples)
    by_parts = UnslothVisionDataCollator(None, processor, instruction_part="<|im_start|>user\n",
                                         response_part="<|im_start|>assistant\n")(examples)
    for key in by_render:
        np.testing.assert_array_equal(by_render[key], by_parts[key])


def test_train_on_everything_but_padding_and_image_pads(processor):
    rng = np.random.default_rng(4)
    batch = VisionDataCollator(processor, train_on_responses_only=False)(batch_examples(rng))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].astype(bool)
    trained = mask & (ids != processor.image_token_id)
    np.testing.assert_array_equal(labels[trained], ids[trained])
    assert (labels[~trained] == IGNORE).all()


def test_text_only_batch(processor):
    examples = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                {"conversations": [{"from": "human", "value": "Tell me"}, {"from": "gpt", "value": "No"}]}]
    batch = VisionDataCollator(processor)(examples)
    assert batch["pixel_values"].shape == (0, 3 * 2 * 14 * 14) and batch["pixel_values"].dtype == np.float32
    assert batch["image_grid_thw"].shape == (0, 3)
    ref = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": u}, {"role": "assistant", "content": a}], tokenize=False)
        for u, a in (("Hi", "Yo"), ("Tell me", "No"))], padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    assert [kept_text(processor, batch["input_ids"][r], batch["labels"][r]) for r in range(2)] == \
        ["Yo" + END, "No" + END]


def test_images_as_paths_arrays_and_dataset_dicts(processor, tmp_path):
    rng = np.random.default_rng(5)
    pil = image(rng, 56, 84)
    path = tmp_path / "a.png"
    pil.save(path)
    with open(path, "rb") as f:
        as_bytes = {"bytes": f.read(), "path": None}
    forms = [pil, str(path), path, np.asarray(pil), as_bytes]
    outs = [VisionDataCollator(processor)([{"messages": [user(img_part(form), txt("What?")), assistant("A.")]}])
            for form in forms]
    for out in outs[1:]:
        for key in outs[0]:
            np.testing.assert_array_equal(out[key], outs[0][key])
    # a single image in 'image' (datasets with one image column), and formatting_func building the messages
    fmt = VisionDataCollator(processor, formatting_func=lambda r: {
        "messages": [user(img_part(), txt(r["q"])), assistant(r["a"])], "images": [r["img"]]})
    out = fmt([{"q": "What?", "a": "A.", "img": pil}])
    for key in outs[0]:
        np.testing.assert_array_equal(out[key], outs[0][key])


def test_padding_side_and_lengths(processor):
    rng = np.random.default_rng(6)
    examples = batch_examples(rng)
    right = VisionDataCollator(processor)(examples)
    left = VisionDataCollator(processor, padding_side="left")(examples)
    pad_id = processor.tokenizer.pad_token_id
    n = right["attention_mask"].sum(axis=1)
    seq = right["input_ids"].shape[1]
    assert n.max() == seq and n.min() < seq
    for r in range(len(examples)):
        assert (right["attention_mask"][r, :n[r]] == 1).all() and (right["attention_mask"][r, n[r]:] == 0).all()
        assert (left["attention_mask"][r, seq - n[r]:] == 1).all()
        assert (left["attention_mask"][r, :seq - n[r]] == 0).all()
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            np.testing.assert_array_equal(left[key][r, seq - n[r]:], right[key][r, :n[r]])
        assert (right["input_ids"][r, n[r]:] == pad_id).all() and (right["labels"][r, n[r]:] == IGNORE).all()
    np.testing.assert_array_equal(left["pixel_values"], right["pixel_values"])
    multiple = VisionDataCollator(processor, pad_to_multiple_of=32)(examples)
    assert multiple["input_ids"].shape[1] == -(-seq // 32) * 32
    np.testing.assert_array_equal(multiple["input_ids"][:, :seq], right["input_ids"])
    capped = VisionDataCollator(processor, pad_to_multiple_of=32, max_seq_length=seq + 1)(examples)
    assert capped["input_ids"].shape[1] == seq + 1  # rounding never goes past max_seq_length
    fixed = VisionDataCollator(processor, max_seq_length=200, padding="max_length")(examples)
    assert fixed["input_ids"].shape == (3, 200) and fixed["labels"].shape == (3, 200)
    np.testing.assert_array_equal(fixed["labels"][:, :seq], right["labels"])


def test_truncation_keeps_whole_images_only(processor):
    rng = np.random.default_rng(7)
    first, second = image(rng, 56, 56), image(rng, 56, 84)
    ex = [{"messages": [user(img_part(first), txt("One then")), user(img_part(second), txt("two")),
                        assistant("ok")]}]
    full = VisionDataCollator(processor)(ex)
    ids = full["input_ids"][0]
    fields = qwen_vl_config_fields(processor)
    starts = np.flatnonzero(ids == fields["vision_start_token_id"])
    ends = np.flatnonzero(ids == fields["vision_end_token_id"])
    assert len(starts) == len(ends) == 2
    # a cut through the second image's run (its start marker, a pad, its end marker) is an error
    for cut in (starts[1] + 1, starts[1] + 3, ends[1]):
        with pytest.raises(ValueError, match=rf"max_seq_length={cut} cuts through image 1 .*at least {ends[1] + 1}"):
            VisionDataCollator(processor, max_seq_length=int(cut))(ex)
    # a cut right before the second image drops it and its patches; right after it keeps both
    before = VisionDataCollator(processor, max_seq_length=int(starts[1]))(ex)
    np.testing.assert_array_equal(before["input_ids"][0], ids[:starts[1]])
    np.testing.assert_array_equal(before["image_grid_thw"], full["image_grid_thw"][:1])
    np.testing.assert_array_equal(before["pixel_values"], full["pixel_values"][:16])
    assert (before["labels"] == IGNORE).all()  # the reply was cut off
    after = VisionDataCollator(processor, max_seq_length=int(ends[1] + 1))(ex)
    np.testing.assert_array_equal(after["input_ids"][0], ids[:ends[1] + 1])
    np.testing.assert_array_equal(after["pixel_values"], full["pixel_values"])
    # truncating into the reply keeps the start of the reply's labels
    n = len(ids)
    cut = VisionDataCollator(processor, max_seq_length=n - 1)(ex)
    np.testing.assert_array_equal(cut["labels"][0], full["labels"][0, :n - 1])


def test_a_model_checks_the_processor_and_supplies_max_seq_length(processor):
    fields = qwen_vl_config_fields(processor)

    class Model:
        max_seq_length = 40
        config = {"image_token_id": fields["image_token_id"], "text_config": {"vocab_size": 512}}

    c = VisionDataCollator(Model(), processor)
    assert c.max_seq_length == 40
    Model.config = {"image_token_id": 99}
    with pytest.raises(ValueError, match="image_token_id=99"):
        VisionDataCollator(Model(), processor)
    Model.config = {"vocab_size": 100}
    with pytest.raises(ValueError, match="vocab_size is 100"):
        VisionDataCollator(Model(), processor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_model_consumes_the_batch(proc_dirs, variant):
    """A transformers Qwen-VL model built with qwen_vl_config_fields runs the collated batch (image features
    match the image tokens) and its loss is the mean cross-entropy over our labels."""
    torch = pytest.importorskip("torch")
    import transformers

    p = AutoProcessor.from_pretrained(proc_dirs[variant])
    f = qwen_vl_config_fields(p)
    text = dict(f["text_config"], hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3]})
    if variant == "qwen2_5_vl":
        vision = dict(f["vision_config"], depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                      out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])
        cls, config_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig
    else:
        vision = dict(f["vision_config"], depth=2, embed_dim=16, hidden_size=32, mlp_ratio=2, num_heads=2)
        cls, config_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
    torch.manual_seed(0)
    model = cls(config_cls(**{**f, "text_config": text, "vision_config": vision})).eval()
    batch = VisionDataCollator(model, p)(batch_examples(np.random.default_rng(8)))
    inputs = {k: torch.from_numpy(v if k == "pixel_values" else v.astype(np.int64)) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits.double().numpy()[:, :-1]
    targets = batch["labels"][:, 1:]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    keep = targets != IGNORE
    nll = -np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0][keep].mean()
    assert np.isfinite(out.loss.item())
    np.testing.assert_allclose(out.loss.item(), nll, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors


def test_clear_errors(processor, tmp_path):
    rng = np.random.default_rng(9)
    c = VisionDataCollator(processor)
    ok_reply = assistant("ok")
    cases = [
        ([{"text": "hi"}], r"examples\[0\] has keys \['text'\]; expected 'messages'"),
        ([{"messages": []}], "non-empty list"),
        ([{"messages": [user({"type": "video", "video": "v.mp4"}), ok_reply]}], r"type='video'.*'text' and 'image'"),
        ([{"messages": [user({"type": "audio"}), ok_reply]}], r"\[0\]\['content'\]\[0\] has type='audio'"),
        ([{"messages": [user(img_part(), txt("x")), ok_reply]}], r"image part without an image.*0 given"),
        ([{"messages": [user(txt("x")), ok_reply], "images": [image(rng, 56, 56)]}], r"holds 1 images but .* 0"),
        ([{"messages": [user(img_part(str(tmp_path / "missing.png"))), ok_reply]}], "is not a file"),
        ([{"messages": [user(txt("a <|image_pad|> b")), ok_reply]}], "placeholder token"),
        ([{"messages": [user(img_part(object())), ok_reply]}], "an image must be a PIL.Image"),
        ([{"messages": [{"role": "user", "content": 3}, ok_reply]}], r"\['content'\] is a int"),
        ({"messages": [ok_reply]}, "wrap it in a list"),
        ([], "non-empty list"),
    ]
    for examples, pattern in cases:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=pattern):
            c(examples)
    with pytest.raises(TypeError, match="got TokenizersBackend. A plain tokenizer cannot process images"):
        VisionDataCollator(None, processor.tokenizer)
    with pytest.raises(ValueError, match="needs a processor"):
        VisionDataCollator()
    with pytest.raises(ValueError, match="padding_side='middle'"):
        VisionDataCollator(processor, padding_side="middle")
    with pytest.raises(ValueError, match="padding='max_length' needs max_seq_length"):
        VisionDataCollator(processor, padding="max_length")
    with pytest.raises(ValueError, match="give both"):
        VisionDataCollator(processor, response_part="<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="max_seq_length must be"):
        VisionDataCollator(processor, max_seq_length=0)


def test_tokenizer_padding_side_does_not_matter_and_examples_are_not_changed(proc_dirs, processor):
    import copy

    rng = np.random.default_rng(10)
    examples = batch_examples(rng)
    snapshot = copy.deepcopy(examples)
    ref = VisionDataCollator(processor)(examples)
    left_tok = AutoProcessor.from_pretrained(proc_dirs["qwen2_5_vl"])
    left_tok.tokenizer.padding_side = "left"  # as set for generation
    out = VisionDataCollator(left_tok)(examples)
    for key in ref:
        np.testing.assert_array_equal(out[key], ref[key])
    assert [ex["messages"] for ex in examples] == [ex["messages"] for ex in snapshot]


def test_example_without_reply_warns(processor):
    rng = np.random.default_rng(11)
    examples = [{"messages": [user(img_part(image(rng, 56, 56)), txt("Only a question"))]},
                {"messages": [user(txt("Q")), assistant("A")]}]
    with pytest.warns(UserWarning, match="1 of 2 examples have no assistant reply"):
        batch = VisionDataCollator(processor)(examples)
    assert (batch["labels"][0] == IGNORE).all()
    assert kept_text(processor, batch["input_ids"][1], batch["labels"][1]) == "A" + END
