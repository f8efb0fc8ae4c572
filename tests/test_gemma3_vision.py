"""Gemma 3 vision (issue 19, `Gemma3ForConditionalGeneration`) against transformers 5.17, PEFT 0.21 and
bitsandbytes on the CPU.

A tiny random checkpoint written by transformers itself (`tiny_gemma3.write_tiny_gemma3_vl`: every parameter
redrawn, the zero-initialized (1 + w) norms and the projector included) with the tiny offline Gemma3Processor;
inputs are what that processor makes from chat-templated prompts: three images in a batch of two (two in one
row), 16 soft tokens each, sliding layers whose window (6) is shorter than an image's tokens and the prompts:
- the name table: module list == torch's `named_modules()`, checkpoint names == what save_pretrained wrote,
  Google's layout (`vision_tower.vision_model.*`) loads too; the checkpoint's features move transformers' logits
  (the image blocks' bidirectional mask, the window, the images themselves);
- fp32 logits (images and text, left/right padding; without token_type_ids: causal, as transformers; text
  only) within 1e-4 relative; image features within 1e-5; bf16 within 2e-2;
- 4-bit: quantized on load == transformers + bitsandbytes (bytes exactly, the same modules left unquantized;
  logits within 1e-3); a bnb-4bit checkpoint loads as stored;
- FastVisionModel.get_peft_model's 16 finetune_* combinations select what PEFT selects with our regex, counts and
  print_trainable_parameters equal PEFT's; our adapter loads in PeftModel with every tensor consumed and our
  logits; LoRA gradients (vision, language, biases) equal torch autograd through PEFT (1e-4);
- the KV cache (prefill with the image blocks, then decode) equals the full forward; greedy generation with
  images is token-identical to transformers + PEFT;
- the collator (Gemma 3's chat template, loss on replies) and train steps through it.
"""

import itertools
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")  # transformers' Gemma3ImageProcessor needs it
Image = pytest.importorskip("PIL.Image")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import bnb_reference_path, rel_l2  # noqa: E402
from family_cases import torch_module_list  # noqa: E402
from fastlora_jax import FastVisionModel, VisionCausalLM  # noqa: E402
from fastlora_jax.models import gemma3_vl  # noqa: E402
from fastlora_jax.models.registry import checkpoint_name, checkpoint_tensors  # noqa: E402
from fastlora_jax.quant import NF4Weight  # noqa: E402
from fastlora_jax.tiny_gemma3 import write_tiny_gemma3_vl  # noqa: E402

# Both stacks, a subset of each (the vision tower's out_proj and fc2 of one layer, two attention projections
# and the gate of every text layer) and the head.
REGEX = (r".*vision_tower\.encoder\.layers\.(0\.self_attn\.(q|out)_proj|1\.mlp\.fc2)"
         r"|.*language_model\.layers\.\d+\.(self_attn\.(k|v)_proj|mlp\.gate_proj)|lm_head")
FLAG_NAMES = ("finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules",
              "finetune_mlp_modules")


def load_hf(model_dir, **kwargs):
    from transformers import Gemma3ForConditionalGeneration
    kwargs.setdefault("dtype", torch.float32)
    hf = Gemma3ForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs).eval()
    return bnb_reference_path(hf) if "quantization_config" in kwargs else hf


def bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in
            ((60, 90, 3), (112, 112, 3), (40, 72, 3))]


PROMPTS = [
    [{"role": "user", "content": [{"type": "text", "text": "Describe this image."}, {"type": "image"},
                                  {"type": "text", "text": "What is in the picture?"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare the two images."},
                                  {"type": "image"}]}],
]


def make_batch(processor, padding_side="right", seed=0, generation_prompt=True):
    """Two chat-templated prompts, one image in the first, two in the second, padded to one length."""
    ims = images(seed)
    texts = [processor.apply_chat_template(m, add_generation_prompt=generation_prompt) for m in PROMPTS]
    processor.tokenizer.padding_side = padding_side
    try:
        return dict(processor(text=texts, images=[[ims[0]], [ims[1], ims[2]]], return_tensors="pt", padding=True))
    finally:
        processor.tokenizer.padding_side = "right"


def hf_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def ours(model, batch, lora=None) -> np.ndarray:
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in batch}
    if lora is None:
        return np.asarray(model(**args).logits.astype(jnp.float32))
    return np.asarray(model.apply(lora, **args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Checkpoint dir, our fp32 model, processor, transformers' fp32 model and a right-padded batch."""
    model_dir = write_tiny_gemma3_vl(tmp_path_factory.mktemp("gemma3_vl") / "base", seed=11)
    model, processor = FastVisionModel.from_pretrained(str(model_dir), load_in_4bit=False, dtype="float32",
                                                       max_seq_length=256)
    batch = make_batch(processor)
    return SimpleNamespace(dir=model_dir, model=model, processor=processor, hf=load_hf(model_dir), batch=batch,
                           keep=batch["attention_mask"].numpy().astype(bool), tmp=tmp_path_factory.mktemp("work"))


# ------------------------------------------------------------------------------------------ name table


def test_module_list_is_torch_named_modules(tiny):
    assert gemma3_vl.module_list(tiny.model.cfg) == torch_module_list(tiny.hf)


def test_checkpoint_names_and_shapes_are_what_save_pretrained_wrote(tiny):
    stored = load_file(tiny.dir / "model.safetensors")
    names = {checkpoint_name(gemma3_vl, n): shape for n, shape, _ in checkpoint_tensors(gemma3_vl, tiny.model.cfg)}
    assert names == {k: v.shape for k, v in stored.items()}
    assert "lm_head" not in tiny.model.base_params  # tied, as Gemma 3's
    assert tiny.model.stacks == {"model.vision_tower.encoder.layers": 2, "model.language_model.layers": 3}
    assert isinstance(tiny.model, VisionCausalLM) and type(tiny.processor).__name__ == "Gemma3Processor"


def test_google_layout_checkpoint_loads(tiny, tmp_path):
    """Google's files name the tower `vision_tower.vision_model.*`; transformers loads them, so do we."""
    import shutil
    target = tmp_path / "google"
    shutil.copytree(tiny.dir, target)
    tensors = load_file(target / "model.safetensors")
    renamed = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in tensors.items()}
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in renamed)
    save_file(renamed, str(target / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unused tensors" warning
        model, _ = FastVisionModel.from_pretrained(str(target), load_in_4bit=False, dtype="float32")
    expected = hf_logits(load_hf(target), tiny.batch)
    assert rel_l2(ours(model, tiny.batch)[tiny.keep], expected[tiny.keep]) < 1e-4


def test_checkpoint_exercises_its_features(tiny):
    """On transformers alone: the image blocks' bidirectional mask, the sliding window (shorter than an image's
    tokens) and the images each move the logits; two images in a row make two blocks."""
    batch, keep = tiny.batch, tiny.keep
    cfg = tiny.model.cfg
    assert cfg.text.sliding_window < cfg.mm_tokens_per_image < batch["input_ids"].shape[1]
    assert set(cfg.text.layer_types) == {"sliding_attention", "full_attention"}
    assert batch["pixel_values"].shape[0] == 3
    blocks = gemma3_vl.image_block_ids(batch["token_type_ids"].numpy())
    assert sorted(set(blocks[1].tolist())) == [-1, 0, 1] and sorted(set(blocks[0].tolist())) == [-1, 0]
    expected = hf_logits(tiny.hf, batch)
    causal = hf_logits(tiny.hf, {k: v for k, v in batch.items() if k != "token_type_ids"})
    assert rel_l2(causal[keep], expected[keep]) > 1e-2
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(tiny.dir)
    config.text_config.sliding_window = 512
    wide = load_hf(tiny.dir, config=config)
    assert rel_l2(hf_logits(wide, batch)[keep], expected[keep]) > 1e-2
    other = make_batch(tiny.processor, seed=1)
    assert rel_l2(hf_logits(tiny.hf, other)[keep], expected[keep]) > 1e-2


# ------------------------------------------------------------------------------------------ logits


def test_image_features_are_transformers(tiny):
    pixels = tiny.batch["pixel_values"]
    with torch.no_grad():
        theirs = tiny.hf.model.get_image_features(pixels).pooler_output.numpy()
    cfg = tiny.model.cfg
    features = gemma3_vl.image_features(cfg, tiny.model.base_params, pixels.numpy())
    assert features.shape == (theirs.shape[0] * theirs.shape[1], theirs.shape[2])
    assert rel_l2(np.asarray(features), theirs.reshape(features.shape)) < 1e-5


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_fp32_logits_image_and_text(tiny, padding_side):
    batch = make_batch(tiny.processor, padding_side)
    keep = batch["attention_mask"].numpy().astype(bool)
    assert not keep.all()  # the prompts differ in length: padding is exercised
    assert rel_l2(ours(tiny.model, batch)[keep], hf_logits(tiny.hf, batch)[keep]) < 1e-4


def test_fp32_logits_without_token_type_ids_are_causal_as_transformers(tiny):
    batch = {k: v for k, v in tiny.batch.items() if k != "token_type_ids"}
    assert rel_l2(ours(tiny.model, batch)[tiny.keep], hf_logits(tiny.hf, batch)[tiny.keep]) < 1e-4


def test_fp32_logits_text_only(tiny):
    ids = tiny.batch["input_ids"].clone()
    image = tiny.model.cfg.image_token_id
    ids[ids == image] = 20  # no image tokens left
    mask = tiny.batch["attention_mask"]
    with torch.no_grad():
        expected = tiny.hf(input_ids=ids, attention_mask=mask).logits.numpy()
        expected_nomask = tiny.hf(input_ids=ids).logits.numpy()
    assert rel_l2(np.asarray(tiny.model(ids, attention_mask=mask).logits)[tiny.keep], expected[tiny.keep]) < 1e-4
    assert rel_l2(np.asarray(tiny.model(ids).logits), expected_nomask) < 1e-4


def test_bf16_within_bf16_tolerance(tiny):
    model, _ = FastVisionModel.from_pretrained(str(tiny.dir), load_in_4bit=False, dtype="bfloat16")
    layers = model.base_params["model"]["vision_tower"]["encoder"]["layers"]
    assert layers["self_attn"]["q_proj"]["weight"].dtype == jnp.bfloat16
    hf = load_hf(tiny.dir, dtype=torch.bfloat16)
    batch = tiny.batch
    expected = hf_logits(hf, {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)})
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}).logits
    assert logits.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(logits.astype(jnp.float32))[tiny.keep], expected[tiny.keep]) < 2e-2


# ------------------------------------------------------------------------------------------ 4-bit


def nf4_state_of(hf_model, module_name):
    module = hf_model.get_submodule(module_name)
    state = module.weight.quant_state.as_dict(packed=True)
    return {"": module.weight.data.numpy(), **{k: v.numpy() for k, v in state.items()}}


def assert_same_nf4(ours_weight, theirs_state):
    mine = ours_weight.to_bnb()
    for key, value in NF4Weight.from_bnb(theirs_state).to_bnb().items():
        np.testing.assert_array_equal(np.asarray(mine[key]), np.asarray(value), err_msg=key)


def test_nf4_on_load_matches_transformers_bitsandbytes(tiny):
    """bitsandbytes quantizes every nn.Linear but lm_head (the SigLIP tower's included); the conv, the position
    embedding and the projector's parameter stay as they are, and so do ours."""
    model, _ = FastVisionModel.from_pretrained(str(tiny.dir), load_in_4bit=True, dtype="float32")
    hf = load_hf(tiny.dir, quantization_config=bnb_config(), device_map="cpu")
    theirs4 = {n for n, m in hf.named_modules() if type(m).__name__ == "Linear4bit"}
    linears = {n for n, k in gemma3_vl.module_list(model.cfg) if k == "linear"}
    assert theirs4 == linears - {"lm_head"}
    params = model.base_params
    tower = params["model"]["vision_tower"]
    assert_same_nf4(jax.tree.map(lambda x: x[1], tower["encoder"]["layers"]["mlp"]["fc1"]["weight"]),
                    nf4_state_of(hf, "model.vision_tower.encoder.layers.1.mlp.fc1"))
    assert_same_nf4(jax.tree.map(lambda x: x[0], tower["encoder"]["layers"]["self_attn"]["out_proj"]["weight"]),
                    nf4_state_of(hf, "model.vision_tower.encoder.layers.0.self_attn.out_proj"))
    lm = params["model"]["language_model"]
    assert_same_nf4(jax.tree.map(lambda x: x[2], lm["layers"]["self_attn"]["o_proj"]["weight"]),
                    nf4_state_of(hf, "model.language_model.layers.2.self_attn.o_proj"))
    for leaf in (tower["embeddings"]["patch_embedding"]["weight"], tower["embeddings"]["position_embedding"]["weight"],
                 params["model"]["multi_modal_projector"]["mm_input_projection_weight"], lm["embed_tokens"]["weight"]):
        assert not isinstance(leaf, NF4Weight)
    assert rel_l2(ours(model, tiny.batch)[tiny.keep], hf_logits(hf, tiny.batch)[tiny.keep]) < 1e-3


def test_bnb_4bit_checkpoint_loads_as_stored(tiny):
    hf = load_hf(tiny.dir, quantization_config=bnb_config(), device_map="cpu")
    saved = tiny.tmp / "bnb4"
    hf.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    model, _ = FastVisionModel.from_pretrained(str(saved), dtype="float32")
    assert model.weights_source == "bnb-4bit"
    q = model.base_params["model"]["vision_tower"]["encoder"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert_same_nf4(jax.tree.map(lambda x: x[1], q), nf4_state_of(hf, "model.vision_tower.encoder.layers.1.self_attn.q_proj"))
    reloaded = bnb_reference_path(load_hf(saved))
    assert rel_l2(ours(model, tiny.batch)[tiny.keep], hf_logits(reloaded, tiny.batch)[tiny.keep]) < 1e-3


# ------------------------------------------------------------------------------------------ LoRA vs PEFT


def peft_reference(tiny, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(load_hf(tiny.dir), LoraConfig(task_type="CAUSAL_LM", **{
            "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": REGEX, "init_lora_weights": False,
            **kwargs}))


def state_numpy(state) -> dict:
    return {k: (v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32))
            for k, v in state.items()}


@pytest.mark.parametrize("flags", list(itertools.product((True, False), repeat=4)),
                         ids=lambda f: "".join("VLAM"[i] if v else "-" for i, v in enumerate(f)))
def test_finetune_flags_select_what_peft_selects(tiny, flags):
    """Each of the 16 combinations: the regex FastVisionModel.get_peft_model records is what PEFT targets with it,
    and it is the rule's selection (repeated linear leaves; part by vision_tower / language_model, component by
    self_attn / mlp); both part flags or both component flags off is an error naming them."""
    kwargs = dict(zip(FLAG_NAMES, flags))
    vision, language, attention, mlp = flags
    if not (vision or language) or not (attention or mlp):
        with pytest.raises(ValueError, match="=False"):
            FastVisionModel.get_peft_model(tiny.model, r=4, **kwargs)
        return
    model = FastVisionModel.get_peft_model(tiny.model, r=4, **kwargs)
    regex = model.adapter_config()["target_modules"]
    assert isinstance(regex, str)
    expected = [n for n, k in gemma3_vl.module_list(tiny.model.cfg) if k == "linear" and n != "lm_head"
                and ((vision and ".vision_tower." in n) or (language and ".language_model." in n))
                and ((attention and ".self_attn." in n) or (mlp and ".mlp." in n))]
    assert model.targeted_module_names == expected
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(load_hf(tiny.dir), LoraConfig(r=4, target_modules=regex))
    assert model.targeted_module_names == ref.targeted_module_names
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("kwargs", [{}, {"bias": "all"}, {"modules_to_save": ["embed_tokens"]}],
                         ids=["plain", "bias_all", "save_embed"])
def test_targets_and_counts_match_peft(tiny, kwargs, capsys):
    model = FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, target_modules=REGEX,
                                           init_lora_weights=False, **kwargs)
    ref = peft_reference(tiny, **kwargs)
    assert model.targeted_module_names == ref.targeted_module_names
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    ref.print_trainable_parameters()
    ours_line, theirs_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model_state_dict(ref, save_embedding_layers=False)
    assert {k: tuple(v.shape) for k, v in model.peft_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.fixture(scope="module")
def adapted(tiny):
    """Our LoRA model (REGEX, bias="all": linear, conv and LayerNorm biases trained too) moved off its init
    through the adapter file, saved again."""
    model = FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, target_modules=REGEX,
                                           init_lora_weights=False, bias="all")
    directory = tiny.tmp / "adapter"
    model.save_pretrained(directory)
    path = directory / "adapter_model.safetensors"
    rng = np.random.default_rng(3)
    # the tied head's LoRA makes the file carry the embedding (PEFT's save_embedding_layers), kept as it is
    tensors = {k: v if "base_layer" in k else v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
               for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    model.load_adapter(directory)
    model.save_pretrained(directory)
    return SimpleNamespace(model=model, dir=directory)


def test_saved_adapter_loads_in_peft_with_our_logits(tiny, adapted):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(load_hf(tiny.dir), str(adapted.dir)).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    ours_file = load_file(adapted.dir / "adapter_model.safetensors")
    assert any(".vision_tower." in k for k in ours_file) and any("patch_embedding.bias" in k for k in ours_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded))
    assert set(theirs) == set(ours_file)
    for key, value in ours_file.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    expected = hf_logits(loaded, tiny.batch)
    assert rel_l2(ours(adapted.model, tiny.batch)[tiny.keep], expected[tiny.keep]) < 1e-4
    assert rel_l2(ours(tiny.model, tiny.batch)[tiny.keep], expected[tiny.keep]) > 1e-3  # the adapter moves them


def test_lora_gradients_match_peft_autograd(tiny, adapted):
    """d(loss)/d(LoRA and biases) through images and text equals torch autograd through PEFT (1e-4)."""
    batch = tiny.batch
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[batch["token_type_ids"] == 1] = -100
    model = adapted.model
    loss, grads = jax.value_and_grad(model.compute_loss)(
        model.lora_params, batch["input_ids"], labels.numpy(), batch["attention_mask"], batch["pixel_values"],
        batch["token_type_ids"])
    ours_grads = state_numpy(model.peft_state_dict(grads))
    loaded = PeftModel.from_pretrained(load_hf(tiny.dir), str(adapted.dir), is_trainable=True)
    out = loaded(**batch, labels=labels)
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-4 * abs(out.loss.item())
    torch_grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded, state_dict=torch_grads))
    assert set(ours_grads) == set(theirs)
    for key in theirs:
        if key.endswith("k_proj.bias"):  # zero: a key bias adds a constant to each query's scores (softmax ignores)
            assert np.abs(theirs[key]).max() < 1e-7 and np.abs(ours_grads[key]).max() < 1e-7, key
            continue
        assert np.abs(theirs[key]).max() > 1e-6, key
        assert rel_l2(ours_grads[key], theirs[key]) < 1e-4, key


def test_merged_export_loads_in_transformers_with_our_logits(tiny, adapted):
    out = adapted.model.save_pretrained_merged(tiny.tmp / "merged", tiny.processor)
    out = Path(out)
    stored = load_file(out / "model.safetensors")
    # transformers' own tensor names; the tied head has LoRA, so the export is untied (as the text path's)
    assert set(stored) == set(load_file(tiny.dir / "model.safetensors")) | {"language_model.lm_head.weight"}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = load_hf(out)
    assert rel_l2(hf_logits(merged, tiny.batch)[tiny.keep], ours(adapted.model, tiny.batch)[tiny.keep]) < 1e-4


def test_from_config_counts_like_the_loaded_model(tiny):
    abstract = FastVisionModel.from_config(tiny.hf.config, dtype="float32", load_in_4bit=True)
    assert isinstance(abstract, VisionCausalLM)
    a = FastVisionModel.get_peft_model(abstract, r=4, target_modules=REGEX)
    b = FastVisionModel.get_peft_model(tiny.model, r=4, target_modules=REGEX)
    assert a.get_nb_trainable_parameters() == b.get_nb_trainable_parameters()


# ------------------------------------------------------------------------------------------ errors


def test_bad_image_inputs_name_what_is_wrong(tiny):
    batch = tiny.batch
    with pytest.raises(ValueError, match="image tokens"):
        tiny.model(batch["input_ids"][:1], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        tiny.model(batch["input_ids"], pixel_values=batch["pixel_values"][:, :, :56])
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        tiny.model(batch["input_ids"], token_type_ids=batch["token_type_ids"][:, :-1])
    with pytest.raises(TypeError, match="image_grid_thw"):
        tiny.model(batch["input_ids"], image_grid_thw=np.zeros((1, 3)))


# ------------------------------------------------------------------------------------------ generation


def test_kv_cache_prefill_and_decode_match_the_full_forward(tiny):
    """forward_cached: a prefill with the images and their blocks, then one decode step, give the full forward's
    logits (positions as transformers' generate: the mask's cumsum)."""
    cfg, params = tiny.model.cfg, tiny.model.base_params
    batch = make_batch(tiny.processor, "left")
    prep = tiny.model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     batch["token_type_ids"])
    ids, mask = prep["input_ids"], prep["attention_mask"]
    pos, _, last = gemma3_vl.generation_inputs(cfg, ids, mask)
    b, s = ids.shape
    nxt = np.full((b, 1), 20, np.int32)
    full_pos = np.concatenate([pos, last[:, None] + 1], axis=1)
    types = np.concatenate([batch["token_type_ids"].numpy(), np.zeros((b, 1), np.int64)], axis=1)
    full = np.asarray(tiny.model(np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones_like(nxt)], 1),
                                 batch["pixel_values"], types, position_ids=full_pos).logits)
    max_len = s + 8
    mask_l = np.zeros((b, max_len), np.int32)
    mask_l[:, :s] = mask
    inv_freq, scaling = gemma3_vl.rope_tables(tiny.model.config, cfg, max_len)
    cache = gemma3_vl.init_cache(cfg, b, max_len)
    cos, sin = gemma3_vl.position_cos_sin(cfg, inv_freq, scaling, jnp.asarray(pos))
    logits, cache = gemma3_vl.forward_cached(cfg, params, jnp.asarray(ids), cos, sin, cache, 0, jnp.asarray(mask_l),
                                             vision=prep["vision"])
    keep = mask.astype(bool)
    assert rel_l2(np.asarray(logits)[keep], full[:, :s][keep]) < 1e-5
    mask_l[:, s] = 1
    cos, sin = gemma3_vl.position_cos_sin(cfg, inv_freq, scaling, jnp.asarray(full_pos[:, s:]))
    logits, _ = gemma3_vl.forward_cached(cfg, params, jnp.asarray(nxt), cos, sin, cache, s, jnp.asarray(mask_l))
    assert rel_l2(np.asarray(logits)[:, 0], full[:, s]) < 1e-5


def test_greedy_generation_with_images_is_transformers_through_peft(tiny, adapted):
    """Two left-padded prompts with three images: greedy ids equal transformers' generate of the same model with
    the same adapter (PeftModel), also when a row stops at eos early."""
    batch = make_batch(tiny.processor, "left")
    assert (batch["attention_mask"] == 0).any()
    hf = PeftModel.from_pretrained(load_hf(tiny.dir), str(adapted.dir)).eval()

    def theirs(**kwargs):
        with torch.no_grad():
            return hf.generate(**batch, do_sample=False, **kwargs).numpy()

    mine = adapted.model.generate(batch, max_new_tokens=12, do_sample=False)
    expected = theirs(max_new_tokens=12)
    np.testing.assert_array_equal(mine, expected)
    assert not np.array_equal(mine, tiny.model.generate(batch, max_new_tokens=12))  # the adapter changes them
    eos = int(expected[1, batch["input_ids"].shape[1] + 2])
    stopped = adapted.model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     batch["token_type_ids"], max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(stopped, theirs(max_new_tokens=12, eos_token_id=eos, pad_token_id=0))


# ------------------------------------------------------------------------------------------ collator, training

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def records(n, seed=0, two_images_every=2):
    """Chat records: solid-colour images (a little noise) and a question; the reply names the first colour.
    Every `two_images_every`-th record has two images."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        names = [list(COLORS)[(i + j) % len(COLORS)] for j in range(2 if i % two_images_every == 1 else 1)]
        parts = []
        for name in names:
            pixels = np.clip(np.array(COLORS[name]) + rng.integers(-20, 20, (48 + 8 * i, 64, 3)), 0, 255)
            parts.append({"type": "image", "image": Image.fromarray(pixels.astype(np.uint8))})
        out.append({"messages": [
            {"role": "user", "content": parts + [{"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {names[0]}."}]}]})
    return out


def test_collator_is_the_processors_batch_with_labels_on_the_replies(tiny):
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    data = records(3)
    batch = UnslothVisionDataCollator(tiny.model, tiny.processor)(data)
    texts = [tiny.processor.apply_chat_template(r["messages"]) for r in data]
    theirs = tiny.processor(text=texts, images=[[p["image"] for p in r["messages"][0]["content"] if "image" in p]
                                                for r in data], padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        np.testing.assert_array_equal(batch[key], theirs[key], err_msg=key)
    tok = tiny.processor.tokenizer
    for row, record in zip(range(3), data):
        trained = batch["labels"][row][batch["labels"][row] != -100]
        reply = record["messages"][1]["content"][0]["text"]
        assert tok.decode(trained) == reply + "<end_of_turn>"  # the reply and its end-of-turn marker
    assert not (batch["labels"][batch["token_type_ids"] == 1] != -100).any()


def test_collator_truncation_drops_images_after_the_cut_and_refuses_a_cut_through_one(tiny):
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    data = records(2)  # the second has two images
    full = UnslothVisionDataCollator(tiny.model, tiny.processor)(data[1:])
    boi = np.flatnonzero(full["input_ids"][0] == tiny.processor.tokenizer.boi_token_id)
    end_first = boi[0] + tiny.model.cfg.mm_tokens_per_image + 2  # one past the first image's <end_of_image>
    short = UnslothVisionDataCollator(tiny.model, tiny.processor, max_seq_length=int(end_first) + 1)(data[1:])
    assert short["pixel_values"].shape[0] == 1 and short["input_ids"].shape[1] == end_first + 1
    np.testing.assert_array_equal(short["pixel_values"][0], full["pixel_values"][0])
    tiny.model.prepare_training_batch(short)  # the tokens and the kept image agree
    with pytest.raises(ValueError, match="cuts through image 1"):
        UnslothVisionDataCollator(tiny.model, tiny.processor, max_seq_length=int(boi[1]) + 3)(data[1:])


def test_train_step_with_the_collator_matches_peft_autograd(tiny, tmp_path):
    """A collated batch (two rows, three images) through make_train_step: the token-averaged loss and the LoRA
    gradients of every linear both stacks have equal torch autograd through PEFT (1e-4)."""
    import optax

    from fastlora_jax import training
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    model = FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, random_state=0, init_lora_weights=False)
    assert any(".vision_tower." in n for n in model.targeted_module_names)
    assert any(".language_model." in n for n in model.targeted_module_names)
    batch = UnslothVisionDataCollator(model, tiny.processor)(records(2, seed=4))
    capture = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                           lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = training.make_train_step(model, capture)
    params = jax.tree.map(jnp.array, model.lora_params)
    _, grads, metrics = step(params, capture.init(params), [batch], None)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_hf(tiny.dir), str(tmp_path / "adapter"), is_trainable=True)
    torch_batch = {k: torch.from_numpy(np.asarray(v, np.float32 if k == "pixel_values" else np.int64))
                   for k, v in batch.items()}
    out = loaded(**torch_batch)
    out.loss.backward()
    assert float(metrics["loss"]) == pytest.approx(out.loss.item(), rel=1e-5)
    torch_grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded, state_dict=torch_grads, save_embedding_layers=False))
    ours_grads = state_numpy(model.peft_state_dict(grads))
    assert set(ours_grads) == set(theirs)
    for key in theirs:
        assert np.abs(theirs[key]).max() > 1e-6, key
        assert rel_l2(ours_grads[key], theirs[key]) < 1e-4, key


@pytest.mark.slow
def test_sft_trainer_with_the_collator_lowers_the_loss(tiny, tmp_path):
    from fastlora_jax.trainer import SFTConfig, SFTTrainer
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    model = FastVisionModel.get_peft_model(tiny.model, r=8, lora_alpha=16, random_state=0)
    collator = UnslothVisionDataCollator(model, tiny.processor, pad_to_multiple_of=16)
    data = records(4, seed=5)
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=6, learning_rate=3e-2,
                     lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                     remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                     disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, tokenizer=tiny.processor, data_collator=collator, train_dataset=data,
                             args=args)
        result = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h and "eval_loss" not in h]
    assert result.global_step == 6 and losses[-1] < losses[0] - 0.3, losses


# ------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_vl_train_step_benchmark_smoke_on_gemma3(capsys):
    """benchmarks/vl_train_step.py on its tiny Gemma 3 shape, both modes, in this process (16-bit base)."""
    import importlib.util
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("vl_train_step", root / "benchmarks" / "vl_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.main(["--shape", "tiny-gemma3", "--steps", "1", "--seq", "96", "--no-4bit", "--in-process"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["vision+language", "language-only"]
    for row in rows:
        assert row["family"] == "gemma3_vl" and row["tokens_per_s"] > 0 and np.isfinite(row["loss"])
        assert row["image_tokens"] == 16 and row["image_patches"] == 64 and row["seq"] == 96
    assert rows[0]["trainable_params"] > rows[1]["trainable_params"] > 0


# ------------------------------------------------------------------------------------------ notebook


@pytest.mark.slow
def test_vision_quickstart_notebook_runs_on_gemma3(tmp_path, monkeypatch):
    """notebooks/vision_quickstart.ipynb with FASTLORA_MODEL set to a tiny Gemma 3 checkpoint (its processor
    saved with it): 4-bit load, LoRA on both stacks, the collator, SFTTrainer, generate with an image, save."""
    nbformat = pytest.importorskip("nbformat")
    client = pytest.importorskip("nbclient").NotebookClient
    model_dir = write_tiny_gemma3_vl(tmp_path / "tiny-gemma3", seed=0)
    monkeypatch.setenv("FASTLORA_MODEL", str(model_dir))
    monkeypatch.setenv("FASTLORA_MAX_STEPS", "4")
    monkeypatch.setenv("FASTLORA_OUTPUT_DIR", str(tmp_path / "adapter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "vision_quickstart.ipynb", as_version=4)
    client(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trainable params:" in outputs and "model.vision_tower.encoder.layers.0.self_attn" in outputs
    assert "4 steps; logged losses:" in outputs and "token_type_ids" in outputs
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "vision_tower" in config["target_modules"] and "language_model" in config["target_modules"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
