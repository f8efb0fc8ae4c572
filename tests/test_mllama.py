"""Llama 3.2 Vision (Mllama, issue 14) against transformers 5.17 (eager attention), PEFT 0.21 and bitsandbytes.

One tiny random checkpoint written by transformers itself (`write_tiny_mllama`: every parameter random, the tanh
gates included, which transformers initializes to zero) and the tiny offline `MllamaProcessor`, loaded through
`FastVisionModel.from_pretrained`. The batch is what that processor makes from two prompts: one image of aspect
ratio (1, 2) after some text, and two images, (1, 1) and (2, 1), the first at the start; padded to one length.
- the name table: module list == torch's `named_modules()`, checkpoint names == what save_pretrained wrote, and
  transformers loads a file written with the module names too (both conventions); stack positions name the HF
  layers (`registry.StackMap`: the self- and cross-attention stacks share `model.language_model.layers`);
- the masks: our vision padding and cross-attention biases == transformers' `_prepare_*_mask` functions;
- fp32 vision features and logits (images; images without cross_attention_mask; text only) within 1e-4
  relative: the computation is the same sequence of fp32 ops, so the differences are summation order (~1e-7);
  1e-4 leaves room for a different BLAS, not for a wrong op (images move the logits by ~25%);
- 4-bit on load: our NF4 bytes == bitsandbytes' for the same tensors; logits within 1e-3 of transformers +
  bitsandbytes (same NF4 weights, dequantized in a different order). The tiny model's linears all have
  in_features % 64 == 0: bitsandbytes 0.50's CPU dequantize_4bit is wrong otherwise (a 32x32 weight round-trips
  with 37% error against NF4's ~9%, while its stored bytes are exactly ours). bnb-4bit checkpoints that
  transformers saved load as stored, with what `llm_int8_skip_modules` left 16-bit kept 16-bit;
- FastVisionModel.get_peft_model: for all 16 finetune_* combinations the regex selects what PEFT wraps with it,
  our targets and counts are PEFT's, and invalid combinations raise; with an explicit regex over every stack
  (both cross-attention positions) and the projector: targets, counts and file shapes equal PEFT's, our adapter
  loads in PeftModel with every tensor consumed and our logits, loss gradients equal torch autograd through
  PEFT (1e-4), and the merged export loads in transformers with our logits;
- generation: the KV cache (vision keys/values kept from the prefill) gives the full forward's logits, and greedy
  ids with images equal transformers' generate through PEFT;
- training: the collator's batch is MllamaProcessor's (labels on the replies only), train-step gradients over
  micro-batches with different image counts equal torch autograd through PEFT, the checkpointing modes agree
  (False recomputes no base matmul: its traced backward has those of no checkpointing),
  SFTTrainer lowers the loss in each mode; benchmarks/vl_train_step.py runs its tiny Mllama shape.
The tests marked slow (compiling whole train steps and generation) are about 5 of this file's ~8 CPU minutes.
"""

import itertools
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")  # transformers' MllamaImageProcessor needs it
Image = pytest.importorskip("PIL.Image")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import bnb_reference_path, rel_l2  # noqa: E402
from fastlora_jax import FastVisionModel, VisionCausalLM  # noqa: E402
from fastlora_jax.lora_config import LoraSpec, resolve_targets, vision_target_modules  # noqa: E402
from fastlora_jax.models import mllama  # noqa: E402
from fastlora_jax.models.registry import _rename, checkpoint_tensors, stack_depths  # noqa: E402
from fastlora_jax.quant import NF4Weight  # noqa: E402
from fastlora_jax.tiny_mllama import IMAGE_TOKEN, write_tiny_mllama  # noqa: E402

FLAG_NAMES = ("finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules", "finetune_mlp_modules")
VISION_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
# Every stack (the cross-attention stack at both of its positions), the projector, and gate_proj in every text
# layer of both kinds.
REGEX = (r".*vision_model\.(transformer\.layers\.[02]\.(self_attn\.q_proj|mlp\.fc1)"
         r"|global_transformer\.layers\.0\.self_attn\.v_proj)|.*multi_modal_projector"
         r"|.*language_model\.layers\.(1\.cross_attn\.o_proj|4\.cross_attn\.k_proj|\d+\.mlp\.gate_proj"
         r"|3\.self_attn\.q_proj)")


def load_hf(model_dir, **kwargs):
    from transformers import MllamaForConditionalGeneration
    kwargs.setdefault("dtype", torch.float32)
    hf = MllamaForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs).eval()
    return bnb_reference_path(hf) if "quantization_config" in kwargs or _is_bnb(model_dir) else hf


def _is_bnb(model_dir) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def bnb_config(**kwargs):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, **kwargs)


def make_batch(processor, padding_side="right", seed=0):
    """Row 0: text, then one (1, 2) image. Row 1: a (1, 1) image first, text, a (2, 1) image, text."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
              for shape in ((20, 50, 3), (28, 28, 3), (60, 30, 3))]
    texts = [f"Describe {IMAGE_TOKEN} this image.", f"{IMAGE_TOKEN}What is{IMAGE_TOKEN} in the picture?"]
    processor.tokenizer.padding_side = padding_side
    try:
        return dict(processor(text=texts, images=[[images[0]], [images[1], images[2]]], return_tensors="pt",
                              padding=True))
    finally:
        processor.tokenizer.padding_side = "right"


def hf_logits(model, batch) -> np.ndarray:
    """A bitsandbytes model goes through conftest.bnb_reference_path first (load_hf does it: on an AVX512-bf16
    CPU, Linear4bit under no_grad otherwise repacks its weight for a bf16 kernel)."""
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def ours(model, batch, lora=None) -> np.ndarray:
    args = {k: batch[k] for k in ("input_ids", "attention_mask", *VISION_KEYS) if k in batch}
    if lora is None:
        return np.asarray(model(**args).logits.astype(jnp.float32))
    return np.asarray(model.apply(lora, **args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_mllama(tmp_path_factory.mktemp("mllama") / "base", seed=11)
    model, processor = FastVisionModel.from_pretrained(str(model_dir), load_in_4bit=False, dtype="float32")
    return SimpleNamespace(dir=model_dir, model=model, cfg=model.cfg, params=model.base_params,
                           hf_config=model.config, processor=processor, hf=load_hf(model_dir),
                           batch=make_batch(processor), tmp=tmp_path_factory.mktemp("mllama_work"))


def keep_of(batch):
    return batch["attention_mask"].numpy().astype(bool)


# ------------------------------------------------------------------------------------------ the checkpoint


def test_tiny_checkpoint_is_what_the_tests_need(tiny):
    """Image token id == vocab size, embedding vocab + 8 rows, every gate non-zero (or images would not matter),
    the batch has two aspect ratios, a padding image slot, text before the first image and padding."""
    cfg, batch = tiny.cfg, tiny.batch
    assert tiny.processor.image_token_id == cfg.image_token_id == cfg.vocab_size
    assert tiny.params["model"]["language_model"]["embed_tokens"]["weight"].shape[0] == cfg.vocab_size + 8
    gates = {n: p.detach().numpy() for n, p in tiny.hf.named_parameters() if "gate" in n.rsplit(".", 1)[-1]}
    assert len(gates) == 3 + 2 * cfg.vision.num_global_layers + 2 * len(cfg.cross_attention_layers)
    assert all(np.abs(g).min() > 0.05 for g in gates.values())
    assert set(batch["aspect_ratio_ids"].numpy().ravel()) == {0, 1, 2, 3}
    assert batch["cross_attention_mask"][0, 0].sum() == 0  # row 0 starts with text
    assert not batch["attention_mask"].numpy().all()
    assert cfg.vision.padded_patches > cfg.vision.num_patches  # the vision padding is exercised


def test_processor_and_model_come_back(tiny):
    assert type(tiny.processor).__name__ == "MllamaProcessor"
    assert isinstance(tiny.model, VisionCausalLM) and tiny.model.family is mllama
    assert "mllama" in repr(tiny.model) and "language_model.cross_attention_layers=2" in repr(tiny.model)


# ------------------------------------------------------------------------------------------ name table


def test_module_list_is_torch_named_modules(tiny):
    kinds = {"Linear": "linear", "Embedding": "embedding"}
    theirs = [(n, kinds.get(type(m).__name__, "other")) for n, m in tiny.hf.named_modules() if n]
    assert mllama.module_list(tiny.cfg) == theirs


def test_checkpoint_names_and_shapes_are_what_save_pretrained_wrote(tiny):
    stored = load_file(tiny.dir / "model.safetensors")
    names = checkpoint_tensors(mllama, tiny.cfg)
    assert {_rename(mllama.CHECKPOINT_RENAMES, n): shape for n, shape, _ in names} == \
        {k: v.shape for k, v in stored.items()}
    # the module names are torch's parameter names (what PEFT and the runtime model see)
    assert {n for n, _, _ in names} == {n for n, _ in tiny.hf.named_parameters()}
    assert {_rename(mllama.LOAD_RENAMES, k) for k in stored} == {n for n, _ in tiny.hf.named_parameters()}


def test_both_naming_conventions_load(tiny):
    """transformers loads a file written with the module names as well; so do we, to the same weights."""
    stored = load_file(tiny.dir / "model.safetensors")
    other = tiny.tmp / "module_names"
    shutil.copytree(tiny.dir, other)
    save_file({_rename(mllama.LOAD_RENAMES, k): v for k, v in stored.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    hf = load_hf(other)
    for name, p in tiny.hf.state_dict().items():
        torch.testing.assert_close(hf.state_dict()[name], p, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unused tensors" warning
        model, _ = FastVisionModel.from_pretrained(str(other), load_in_4bit=False, dtype="float32")
    jax.tree.map(np.testing.assert_array_equal, model.base_params, tiny.params)


def test_stack_positions_name_hf_layers(tiny):
    cfg, stacks = tiny.cfg, stack_depths(mllama, tiny.cfg)
    assert mllama.text_layer_runs(cfg) == [(mllama.TEXT_STACK, 0, 1), (mllama.CROSS_STACK, 0, 1),
                                           (mllama.TEXT_STACK, 1, 3), (mllama.CROSS_STACK, 1, 2)]
    assert dict(stacks) == {mllama.VISION_STACK: 3, mllama.GLOBAL_STACK: 1, mllama.TEXT_STACK: 3,
                            mllama.CROSS_STACK: 2} == tiny.model.stacks
    assert stacks.layer_count == 5  # layers_to_transform indices go up to the last HF text layer
    assert stacks.module_name(mllama.CROSS_STACK, 1, "cross_attn.q_proj") == \
        "model.language_model.layers.4.cross_attn.q_proj"
    assert stacks.locate("model.language_model.layers.3.mlp.up_proj.weight") == \
        (mllama.TEXT_STACK, 2, "mlp.up_proj.weight")
    assert stacks.locate("model.language_model.layers.1.cross_attn_mlp_gate") == \
        (mllama.CROSS_STACK, 0, "cross_attn_mlp_gate")
    assert stacks.locate("model.multi_modal_projector.weight") is None
    lm = tiny.params["model"]["language_model"]
    assert lm["layers"]["self_attn"]["q_proj"]["weight"].shape[0] == 3
    assert lm["cross_attention_layers"]["cross_attn"]["q_norm"]["weight"].shape == (2, cfg.text.head_dim)
    np.testing.assert_array_equal(  # stack position 2 of the self-attention layers is HF layer 3
        np.asarray(lm["layers"]["mlp"]["up_proj"]["weight"][2]),
        tiny.hf.model.language_model.layers[3].mlp.up_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tiny.model.base_tensor("model.language_model.layers.4.cross_attn.k_norm.weight"),
                                  tiny.hf.model.language_model.layers[4].cross_attn.k_norm.weight.detach().numpy())


def test_config_errors_name_the_field(tiny):
    bad = tiny.hf_config.__class__.from_dict(tiny.hf_config.to_dict())
    bad.vision_config.vision_output_dim = 64
    with pytest.raises(ValueError, match="vision_output_dim=64"):
        mllama.Config.from_hf(bad)
    with pytest.raises(ValueError, match=r"pixel_values has \[tiles, channels, height, width\]"):
        mllama.vision_model(tiny.cfg, tiny.params, np.zeros((1, 1, 2, 3, 14, 14), np.float32), np.ones((1, 1), int),
                            np.ones((1, 1, 2), int))


def test_bad_image_inputs_name_what_is_wrong(tiny):
    b = tiny.batch
    with pytest.raises(ValueError, match="needs aspect_ratio_ids and aspect_ratio_mask"):
        tiny.model(b["input_ids"], b["attention_mask"], b["pixel_values"])
    with pytest.raises(ValueError, match=r"given without pixel_values"):
        tiny.model(b["input_ids"], cross_attention_mask=b["cross_attention_mask"])
    with pytest.raises(ValueError, match="cross_attention_mask has shape"):
        tiny.model(b["input_ids"][:, :-1], pixel_values=b["pixel_values"], aspect_ratio_ids=b["aspect_ratio_ids"],
                   aspect_ratio_mask=b["aspect_ratio_mask"], cross_attention_mask=b["cross_attention_mask"])
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must be in \[0, 3\]"):
        tiny.model(b["input_ids"], pixel_values=b["pixel_values"], aspect_ratio_ids=b["aspect_ratio_ids"] + 3,
                   aspect_ratio_mask=b["aspect_ratio_mask"])
    with pytest.raises(TypeError, match="image_grid_thw.*image inputs are"):
        tiny.model(b["input_ids"], image_grid_thw=np.ones((1, 3), int))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, \d+\)"):
        tiny.model(np.full((1, 3), tiny.cfg.embedding_rows))


# ------------------------------------------------------------------------------------------ masks


def test_vision_padding_mask_is_transformers(tiny):
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask
    v = tiny.cfg.vision
    ratio_mask = tiny.batch["aspect_ratio_mask"].reshape(-1, v.max_num_tiles)
    theirs = _prepare_aspect_ratio_attention_mask(ratio_mask, v.num_patches, v.padded_patches, torch.float32)
    pad = np.asarray(mllama.vision_padding(v, ratio_mask.numpy()))
    ours_ = np.where(pad[:, :, None] & pad[:, None, :], np.finfo(np.float32).min, 0.0)
    np.testing.assert_array_equal(ours_, theirs[:, 0].numpy())


def test_cross_attention_mask_is_transformers(tiny):
    """transformers' additive bias is 0 exactly where ours allows a key, finfo.min elsewhere."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    mask = tiny.batch["cross_attention_mask"]
    bias, row = _prepare_cross_attention_mask(mask, tiny.cfg.vision.num_patches, torch.float32)
    ours_allowed, ours_row = mllama.cross_attention_allowed(tiny.cfg, mask.numpy(), jnp.float32)
    theirs = bias[:, 0].numpy()
    assert set(np.unique(theirs)) <= {0.0, np.finfo(np.float32).min}
    np.testing.assert_array_equal(np.asarray(ours_allowed), theirs == 0)
    assert not np.asarray(ours_allowed).all()  # some keys are masked here
    np.testing.assert_array_equal(np.asarray(ours_row), row[:, 0, :, 0].numpy())
    assert not np.asarray(ours_row)[0, 0]  # text before the first image: an empty row, zero bias, MLP masked


# ------------------------------------------------------------------------------------------ logits


def test_vision_features_are_transformers(tiny):
    b = tiny.batch
    with torch.no_grad():
        theirs = tiny.hf.model.vision_model(b["pixel_values"], b["aspect_ratio_ids"],
                                            b["aspect_ratio_mask"]).last_hidden_state.numpy()
    features = mllama.vision_model(tiny.cfg, tiny.params, b["pixel_values"].numpy(), b["aspect_ratio_ids"].numpy(),
                                   b["aspect_ratio_mask"].numpy())
    assert features.shape == theirs.shape == (2, 2, 2, tiny.cfg.vision.num_patches, tiny.cfg.vision.vision_output_dim)
    assert rel_l2(np.asarray(features), theirs) < 1e-4


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_fp32_logits_with_images(tiny, padding_side):
    batch = tiny.batch if padding_side == "right" else make_batch(tiny.processor, padding_side)
    keep = keep_of(batch)
    expected = hf_logits(tiny.hf, batch)
    assert rel_l2(ours(tiny.model, batch)[keep], expected[keep]) < 1e-4
    text_only = hf_logits(tiny.hf, {k: batch[k] for k in ("input_ids", "attention_mask")})
    assert rel_l2(text_only[keep], expected[keep]) > 1e-2  # the images matter: the parity is not vacuous


def test_fp32_logits_images_without_cross_attention_mask(tiny):
    """Without cross_attention_mask every token attends to every vision token and no MLP row is masked."""
    batch = {k: v for k, v in tiny.batch.items() if k != "cross_attention_mask"}
    keep = keep_of(batch)
    assert rel_l2(ours(tiny.model, batch)[keep], hf_logits(tiny.hf, batch)[keep]) < 1e-4


def test_fp32_logits_text_only_skip_cross_layers(tiny):
    batch = tiny.processor(text=["What is in the picture?", "Describe this."], return_tensors="pt", padding=True)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    keep = keep_of(batch)
    assert rel_l2(ours(tiny.model, batch)[keep], hf_logits(tiny.hf, batch)[keep]) < 1e-4
    no_mask = {"input_ids": batch["input_ids"][:1]}
    assert rel_l2(ours(tiny.model, no_mask), hf_logits(tiny.hf, no_mask)) < 1e-4


def test_bf16_within_bf16_tolerance(tiny):
    """bf16 weights and activations on both sides: 2e-2 relative (bf16 has 8 bits of mantissa, ~4e-3 per
    rounding, and nine layers of them)."""
    model, _ = FastVisionModel.from_pretrained(str(tiny.dir), load_in_4bit=False, dtype="bfloat16")
    assert model.base_params["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["weight"].dtype == \
        jnp.bfloat16
    hf = load_hf(tiny.dir, dtype=torch.bfloat16)
    batch = tiny.batch
    keep = keep_of(batch)
    expected = hf_logits(hf, {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)})
    logits = model(**batch).logits
    assert logits.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(logits.astype(jnp.float32))[keep], expected[keep]) < 2e-2


# ------------------------------------------------------------------------------------------ 4-bit


def assert_same_nf4(hf, weight, module_name):
    module = hf.get_submodule(module_name)
    assert type(module).__name__ == "Linear4bit", module_name
    theirs = {"": module.weight.data.numpy(),
              **{k: v.numpy() for k, v in module.weight.quant_state.as_dict(packed=True).items()}}
    mine = weight.to_bnb()
    for key, value in NF4Weight.from_bnb(theirs).to_bnb().items():
        np.testing.assert_array_equal(np.asarray(mine[key]), np.asarray(value), err_msg=f"{module_name} {key}")


def at(w, i):
    return jax.tree.map(lambda x: x[i], w)


def test_4bit_on_load_matches_transformers_bitsandbytes(tiny):
    """bitsandbytes quantizes every nn.Linear but lm_head: both vision transformers, the cross-attention layers
    and the projector; not the patch Conv2d, the embeddings or the gates."""
    hf = load_hf(tiny.dir, quantization_config=bnb_config(), device_map="cpu")
    model, _ = FastVisionModel.from_pretrained(str(tiny.dir), load_in_4bit=True, dtype="float32")
    assert model.is_4bit and model.weights_source == "16bit"
    params = model.base_params
    vm, lm = params["model"]["vision_model"], params["model"]["language_model"]
    assert_same_nf4(hf, at(vm["global_transformer"]["layers"]["mlp"]["fc1"]["weight"], 0),
                    "model.vision_model.global_transformer.layers.0.mlp.fc1")
    assert_same_nf4(hf, at(lm["cross_attention_layers"]["cross_attn"]["k_proj"]["weight"], 1),
                    "model.language_model.layers.4.cross_attn.k_proj")
    assert_same_nf4(hf, at(lm["layers"]["self_attn"]["o_proj"]["weight"], 2),
                    "model.language_model.layers.3.self_attn.o_proj")
    assert_same_nf4(hf, params["model"]["multi_modal_projector"]["weight"], "model.multi_modal_projector")
    assert not isinstance(vm["patch_embedding"]["weight"], NF4Weight)
    assert not isinstance(params["lm_head"]["weight"], NF4Weight)
    keep = keep_of(tiny.batch)
    assert rel_l2(ours(model, tiny.batch)[keep], hf_logits(hf, tiny.batch)[keep]) < 1e-3


@pytest.mark.parametrize("skip", [None, ["lm_head", "multi_modal_projector", "model.vision_model",
                                         "language_model.layers.3.mlp.down_proj"]], ids=["default", "skip_modules"])
def test_loads_bnb_4bit_checkpoint_as_stored(tiny, skip):
    """A bnb-4bit checkpoint transformers + bitsandbytes saved: 4-bit what they quantized (its bytes), 16-bit what
    they left alone (lm_head; with `llm_int8_skip_modules`, Unsloth-style, the vision model, the projector and one
    layer's down_proj, whose stack is then kept dequantized); logits within 1e-3 of transformers loading the same
    files."""
    kwargs = {} if skip is None else {"llm_int8_skip_modules": skip}
    quantized = load_hf(tiny.dir, quantization_config=bnb_config(**kwargs), device_map="cpu")
    saved = tiny.tmp / f"bnb4_{'skip' if skip else 'default'}"
    quantized.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["llm_int8_skip_modules"] == skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor = FastVisionModel.from_pretrained(str(saved), dtype="float32")
    assert not [w for w in caught if "not used by the model" in str(w.message)]
    assert model.weights_source == "bnb-4bit" and processor is None  # the processor was not saved there
    hf = load_hf(saved, device_map="cpu")
    params = model.base_params
    vm, lm = params["model"]["vision_model"], params["model"]["language_model"]
    assert_same_nf4(hf, at(lm["cross_attention_layers"]["cross_attn"]["q_proj"]["weight"], 0),
                    "model.language_model.layers.1.cross_attn.q_proj")
    assert_same_nf4(hf, at(lm["layers"]["self_attn"]["k_proj"]["weight"], 1), "model.language_model.layers.2.self_attn.k_proj")
    assert not isinstance(params["lm_head"]["weight"], NF4Weight)
    down = lm["layers"]["mlp"]["down_proj"]["weight"]
    if skip is None:
        assert_same_nf4(hf, params["model"]["multi_modal_projector"]["weight"], "model.multi_modal_projector")
        assert_same_nf4(hf, at(vm["transformer"]["layers"]["mlp"]["fc2"]["weight"], 1),
                        "model.vision_model.transformer.layers.1.mlp.fc2")
        assert isinstance(down, NF4Weight)
    else:
        for name in ("model.multi_modal_projector", "model.vision_model.transformer.layers.1.mlp.fc2",
                     "model.language_model.layers.3.mlp.down_proj"):
            assert type(hf.get_submodule(name)).__name__ == "Linear", name
        assert not isinstance(params["model"]["multi_modal_projector"]["weight"], NF4Weight)
        assert not isinstance(vm["transformer"]["layers"]["mlp"]["fc2"]["weight"], NF4Weight)
        assert not isinstance(down, NF4Weight)  # layers 0 and 2 are 4-bit in the file, layer 3 is not
        np.testing.assert_array_equal(np.asarray(down[2]),
                                      hf.model.language_model.layers[3].mlp.down_proj.weight.detach().numpy())
    keep = keep_of(tiny.batch)
    assert rel_l2(ours(model, tiny.batch)[keep], hf_logits(hf, tiny.batch)[keep]) < 1e-3


# ------------------------------------------------------------------------------------------ finetune_* flags


def in_vision(name):
    return name.startswith("model.vision_model.")


def in_language(name):
    return name.startswith("model.language_model.")


def is_attention(name):  # cross-attention counts as attention
    return name.rsplit(".", 1)[0].endswith((".self_attn", ".cross_attn"))


def is_mlp(name):
    return name.rsplit(".", 1)[0].endswith(".mlp")


@pytest.mark.parametrize("flags", list(itertools.product((True, False), repeat=4)),
                         ids=lambda f: "".join("VLAM"[i] if v else "-" for i, v in enumerate(f)))
def test_finetune_flags_select_what_peft_wraps(tiny, flags):
    """The rule's selection (written here with this layout's predicates) == our regex's == PEFT's wrapped modules
    with it == FastVisionModel.get_peft_model's targets; our counts == PEFT's."""
    from transformers import MllamaForConditionalGeneration

    ml = mllama.module_list(tiny.cfg)
    kwargs = dict(zip(FLAG_NAMES, flags))
    vision, language, attention, mlp = flags
    if not (vision or language) or not (attention or mlp):
        with pytest.raises(ValueError, match="=False"):
            vision_target_modules(ml, **kwargs)
        with pytest.raises(ValueError, match="=False"):
            FastVisionModel.get_peft_model(tiny.model, r=2, **kwargs)
        return
    linear = [n for n, k in ml if k == "linear"]
    repeated = Counter(n.rsplit(".", 1)[-1] for n in linear)
    expected = [n for n in linear if repeated[n.rsplit(".", 1)[-1]] > 1
                and ((vision and in_vision(n)) or (language and in_language(n)))
                and ((attention and is_attention(n)) or (mlp and is_mlp(n)))]
    assert expected and "model.multi_modal_projector" not in expected and "lm_head" not in expected
    regex = vision_target_modules(ml, **kwargs)
    assert [n for n, _ in ml if re.fullmatch(regex, n)] == expected
    assert [t.name for t in resolve_targets(LoraSpec.create(target_modules=regex), ml, tiny.cfg.num_layers)] == expected
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(MllamaForConditionalGeneration(tiny.hf_config),
                                    LoraConfig(r=2, lora_alpha=4, target_modules=regex))
    assert [n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)] == expected
    model = FastVisionModel.get_peft_model(tiny.model, r=2, lora_alpha=4, **kwargs)
    assert model.targeted_module_names == expected
    assert model.adapter_config()["target_modules"] == regex
    assert model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


def test_print_trainable_parameters_is_peft(tiny, capsys):
    """The default selection (every flag on), printed as PEFT prints it for the same model and regex."""
    model = FastVisionModel.get_peft_model(tiny.model, r=8, lora_alpha=8)
    model.print_trainable_parameters()
    ours_ = capsys.readouterr().out
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(load_hf(tiny.dir), LoraConfig(r=8, lora_alpha=8,
                                                           target_modules=model.adapter_config()["target_modules"]))
    ref.print_trainable_parameters()
    assert ours_ == capsys.readouterr().out and "trainable params:" in ours_


def test_layers_to_transform_counts_hf_layers(tiny):
    """layers_to_transform is an HF layer index (PEFT parses it from the names): layer 4 is a cross-attention
    layer, layer 3 a self-attention one (stack position 2)."""
    leaves = ["q_proj", "down_proj"]
    for layers in ([4], [3], [0, 4]):
        model = FastVisionModel.get_peft_model(tiny.model, r=2, target_modules=leaves, layers_to_transform=layers)
        torch.manual_seed(0)
        ref = get_peft_model(load_hf(tiny.dir), LoraConfig(r=2, target_modules=leaves, layers_to_transform=layers))
        assert model.targeted_module_names == ref.targeted_module_names, layers
        assert any(f"layers.{layers[-1]}." in n for n in model.targeted_module_names)


# ------------------------------------------------------------------------------------------ LoRA vs PEFT


def peft_reference(tiny, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(load_hf(tiny.dir), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=REGEX, init_lora_weights=False, **kwargs))


def state_numpy(state) -> dict:
    return {k: (v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32))
            for k, v in state.items()}


@pytest.fixture(scope="module")
def adapted(tiny):
    """Our LoRA model (explicit regex; bias="all": linear and LayerNorm biases trained too) moved off its init
    through the adapter file, saved again."""
    model = FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, target_modules=REGEX,
                                           init_lora_weights=False, bias="all")
    directory = tiny.tmp / "adapter"
    model.save_pretrained(directory)
    path = directory / "adapter_model.safetensors"
    rng = np.random.default_rng(3)
    tensors = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    model.load_adapter(directory)
    model.save_pretrained(directory)
    return SimpleNamespace(model=model, dir=directory)


@pytest.mark.parametrize("kwargs", [{}, {"bias": "all"}, {"modules_to_save": ["lm_head"]}],
                         ids=["plain", "bias_all", "save_lm_head"])
def test_targets_and_counts_match_peft(tiny, kwargs):
    model = FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, target_modules=REGEX,
                                           init_lora_weights=False, **kwargs)
    ref = peft_reference(tiny, **kwargs)
    assert model.targeted_module_names == ref.targeted_module_names
    for part in ("vision_model.transformer.layers.", "vision_model.global_transformer.layers.",
                 "language_model.layers.1.cross_attn.", "language_model.layers.4.cross_attn.",
                 "language_model.layers.3.self_attn.", "multi_modal_projector"):
        assert any(part in n for n in model.targeted_module_names), part
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model_state_dict(ref, save_embedding_layers=False)
    assert {k: tuple(v.shape) for k, v in model.peft_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.items()}


def test_saved_adapter_loads_in_peft_with_our_logits(tiny, adapted):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(load_hf(tiny.dir), str(adapted.dir)).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    ours_file = load_file(adapted.dir / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded))
    assert set(theirs) == set(ours_file)
    for key, value in ours_file.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    keep = keep_of(tiny.batch)
    expected = hf_logits(loaded, tiny.batch)
    assert rel_l2(ours(adapted.model, tiny.batch)[keep], expected[keep]) < 1e-4
    assert rel_l2(ours(tiny.model, tiny.batch)[keep], expected[keep]) > 1e-3  # the adapter moves the logits


@pytest.mark.slow
def test_loss_gradients_match_peft(tiny, adapted):
    """d(loss)/d(LoRA, biases) through images and text equals torch autograd through PEFT, tensor by tensor (1e-4):
    adapters in both vision transformers, both cross-attention layers (k_proj reads the vision tokens), a
    self-attention layer, the MLPs of both kinds of text layer and the projector."""
    batch = tiny.batch
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels >= tiny.cfg.vocab_size)] = -100  # the image token has no logit
    model = adapted.model
    loss, grads = jax.value_and_grad(model.compute_loss)(
        model.lora_params, batch["input_ids"], labels.numpy(), batch["attention_mask"], batch["pixel_values"],
        batch["aspect_ratio_ids"], batch["aspect_ratio_mask"], batch["cross_attention_mask"])
    ours_grads = state_numpy(model.peft_state_dict(grads))
    loaded = PeftModel.from_pretrained(load_hf(tiny.dir), str(adapted.dir), is_trainable=True)
    out = loaded(**batch, labels=labels)
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-4 * abs(out.loss.item())
    torch_grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded, state_dict=torch_grads, save_embedding_layers=False))
    assert set(ours_grads) == set(theirs)
    for key in theirs:
        assert np.abs(theirs[key]).max() > 0, key
        assert rel_l2(ours_grads[key], theirs[key]) < 1e-4, key


def test_merged_export_loads_in_transformers(tiny, adapted):
    out = adapted.model.save_pretrained_merged(tiny.tmp / "merged", tiny.processor)
    stored = load_file(Path(out) / "model.safetensors")
    assert set(stored) == set(load_file(tiny.dir / "model.safetensors"))  # transformers' own tensor names
    merged = load_hf(out)
    keep = keep_of(tiny.batch)
    assert rel_l2(hf_logits(merged, tiny.batch)[keep], ours(adapted.model, tiny.batch)[keep]) < 1e-4
    assert (Path(out) / "processor_config.json").is_file() or (Path(out) / "preprocessor_config.json").is_file()


def test_from_config_counts_like_the_loaded_model(tiny):
    abstract = FastVisionModel.from_config(tiny.hf.config, dtype="float32", load_in_4bit=True)
    assert isinstance(abstract, VisionCausalLM)
    a = FastVisionModel.get_peft_model(abstract, r=4, target_modules=REGEX)
    b = FastVisionModel.get_peft_model(tiny.model, r=4, target_modules=REGEX)
    assert a.get_nb_trainable_parameters() == b.get_nb_trainable_parameters()


def test_random_base_params_for_benchmarks(tiny):
    from fastlora_jax.convert.load import abstract_base_params, random_base_params
    params = random_base_params(mllama, tiny.cfg, jnp.float32, load_in_4bit=False)
    abstract = abstract_base_params(mllama, tiny.cfg, jnp.float32, load_in_4bit=False)
    assert jax.tree.structure(params) == jax.tree.structure(abstract) == jax.tree.structure(tiny.params)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(params)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [(x.shape, x.dtype) for x in jax.tree.leaves(tiny.params)]


# ------------------------------------------------------------------------------------------ generation


def test_kv_cache_prefill_and_decode_match_the_full_forward(tiny):
    """forward_cached: a prefill with the images (which stores each cross-attention layer's vision keys/values and
    the last cross-attention mask row) and two decode steps give the logits of the whole forward pass over the
    prompt and the new tokens, whose cross-attention mask rows repeat the prompt's last (transformers' rule)."""
    cfg, params = tiny.cfg, tiny.params
    batch = make_batch(tiny.processor, "left")
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    b, s = ids.shape
    new = np.array([[100, 7], [55, 300]], np.int32)
    cross = batch["cross_attention_mask"].numpy()
    full_cross = np.concatenate([cross, np.repeat(cross[:, -1:], 2, axis=1)], axis=1)
    full_ids, full_mask = np.concatenate([ids, new], 1), np.concatenate([mask, np.ones_like(new)], 1)
    positions = np.where(full_mask == 1, np.cumsum(full_mask, axis=1) - 1, 0)
    full = np.asarray(tiny.model(full_ids, full_mask, batch["pixel_values"], batch["aspect_ratio_ids"],
                                 batch["aspect_ratio_mask"], full_cross, position_ids=positions).logits)
    max_len = s + 8
    mask_l = np.zeros((b, max_len), np.int32)
    mask_l[:, :s] = mask
    prep = tiny.model.prepare_inputs(ids, mask, *(batch[k] for k in VISION_KEYS))
    cache = mllama.init_cache(cfg, b, max_len)
    cos, sin = tiny.model.rotary_cos_sin(positions[:, :s])
    logits, cache = mllama.forward_cached(cfg, params, jnp.asarray(ids), cos, sin, cache, 0, jnp.asarray(mask_l),
                                          vision=prep["vision"])
    assert set(cache) == {"k", "v", "cross_k", "cross_v", "cross_allowed", "cross_row"}
    assert cache["cross_k"].shape[:3] == (2, b, 2 * cfg.vision.max_num_tiles * cfg.vision.num_patches)
    keep = mask.astype(bool)
    assert rel_l2(np.asarray(logits)[keep], full[:, :s][keep]) < 1e-5
    for step in range(2):
        mask_l[:, s + step] = 1
        cos, sin = tiny.model.rotary_cos_sin(positions[:, s + step:s + step + 1])
        logits, cache = mllama.forward_cached(cfg, params, jnp.asarray(new[:, step:step + 1]), cos, sin, cache,
                                              s + step, jnp.asarray(mask_l))
        assert rel_l2(np.asarray(logits)[:, 0], full[:, s + step]) < 1e-5, step


def generation_batch(processor):
    """Two left-padded chat prompts: an image of aspect ratio (2, 1) before the question; text, then a (1, 1)
    image."""
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (60, 30, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))]
    texts = [f"{IMAGE_TOKEN}Describe this image.", f"What is in the picture? Say it {IMAGE_TOKEN}"]
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=texts, images=[[images[0]], [images[1]]], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "right"
    assert (batch["attention_mask"] == 0).any()
    return batch


@pytest.mark.slow
def test_greedy_generation_with_images_is_transformers_through_peft(tiny):
    """Greedy ids with images (vision and language adapters, so the image's cross-attention keys/values carry
    LoRA) equal transformers' generate of the same model with the same adapter (PeftModel), also when a row stops
    at eos early; text-only prompts (cross-attention layers skipped) too."""
    model = FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
    assert any("cross_attn.k_proj" in n for n in model.targeted_module_names)
    adapter = tiny.tmp / "generation_adapter"
    model.save_pretrained(adapter)
    hf = PeftModel.from_pretrained(load_hf(tiny.dir), str(adapter)).eval()
    batch = generation_batch(tiny.processor)

    def theirs(inputs, **kwargs):
        with torch.no_grad():
            return hf.generate(**inputs, do_sample=False, **kwargs).numpy()

    expected = theirs(batch, max_new_tokens=10)
    got = model.generate(batch, max_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(got, expected)
    with torch.no_grad():  # the adapter changes the output: the parity is not the base model's
        assert not np.array_equal(expected, tiny.hf.generate(**batch, do_sample=False, max_new_tokens=10).numpy())
    # a row that emits eos is padded afterwards, as transformers does
    eos = int(expected[1, batch["input_ids"].shape[1] + 2])
    stopped = model.generate(batch["input_ids"], batch["attention_mask"], *(batch[k] for k in VISION_KEYS),
                             max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(stopped, theirs(batch, max_new_tokens=10, eos_token_id=eos, pad_token_id=0))
    tiny.processor.tokenizer.padding_side = "left"
    try:
        text = tiny.processor(text=["What is in the picture?", "Say it"], return_tensors="pt", padding=True)
    finally:
        tiny.processor.tokenizer.padding_side = "right"
    text = {k: text[k] for k in ("input_ids", "attention_mask")}
    np.testing.assert_array_equal(model.generate(text, max_new_tokens=6), theirs(text, max_new_tokens=6))


# ------------------------------------------------------------------------------------------ training

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def records(n, sizes=((28, 28),), seed=0, images_per=1):
    """Chat records: solid-colour images (a little noise) and a question; the reply names the first colour."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        parts = []
        for j in range(images_per):
            h, w = sizes[(i + j) % len(sizes)]
            pixels = np.clip(np.array(COLORS[name]) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            parts.append({"type": "image", "image": Image.fromarray(pixels)})
        out.append({"messages": [
            {"role": "user", "content": [*parts, {"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]})
    return out


def without_images(messages):
    """The messages with each image part as a bare {"type": "image"} (what the chat template renders)."""
    return [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                            for p in m["content"]]} for m in messages]


def rendered_inputs(processor, data):
    """(texts, nested images) as the collator hands them to the processor."""
    texts = [processor.apply_chat_template(without_images(r["messages"]), tokenize=False) for r in data]
    images = [[p["image"] for m in r["messages"] for p in m["content"] if p["type"] == "image"] for r in data]
    return texts, images


def test_collator_batch_is_the_processors(tiny):
    """Untruncated, padded on the processor's side: every array is MllamaProcessor's for the chat-rendered texts;
    labels are the tokens after the rendered prompt (the reply and its <|eot_id|>), -100 elsewhere."""
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    data = records(1, sizes=((20, 50),), images_per=1) + records(1, sizes=((28, 28), (60, 30)), seed=1,
                                                                    images_per=2)
    batch = UnslothVisionDataCollator(tiny.model, tiny.processor)(data)
    texts, images = rendered_inputs(tiny.processor, data)
    theirs = tiny.processor(text=texts, images=images, padding=True, return_tensors="np")
    assert set(batch) == {"input_ids", "attention_mask", "labels", *VISION_KEYS}
    for key in ("input_ids", "attention_mask", *VISION_KEYS):
        np.testing.assert_array_equal(batch[key], theirs[key], err_msg=key)
    assert batch["pixel_values"].shape[1:3] == (2, 2) and set(batch["aspect_ratio_ids"].ravel()) == {0, 1, 2, 3}
    for i, record in enumerate(data):
        prompt = tiny.processor.apply_chat_template(without_images(record["messages"][:1]), tokenize=False,
                                                    add_generation_prompt=True)
        start = len(tiny.processor.tokenizer(prompt)["input_ids"])
        n = int(batch["attention_mask"][i].sum())
        expected = np.full(batch["labels"].shape[1], -100)
        expected[start:n] = batch["input_ids"][i, start:n]
        np.testing.assert_array_equal(batch["labels"][i], expected)
        assert tiny.processor.tokenizer.decode(batch["input_ids"][i, start:n]).endswith("<|eot_id|>")


def test_collator_truncation_drops_the_images_after_the_cut(tiny):
    """max_seq_length just before an example's second <|image|>: that image is dropped, and the row is what the
    processor makes of the text up to the cut with the first image; a padding slot stays as the image processor
    pads (zero pixels, id 0, first tile marked)."""
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    data = records(1, sizes=((28, 28), (60, 30)), images_per=2)
    texts, images = rendered_inputs(tiny.processor, data)
    full = tiny.processor(text=texts, images=images, return_tensors="np")
    cut = int(np.flatnonzero(full["input_ids"][0] == tiny.cfg.image_token_id)[1])
    batch = UnslothVisionDataCollator(tiny.model, tiny.processor, max_seq_length=cut)(data)
    second = texts[0].index(IMAGE_TOKEN, texts[0].index(IMAGE_TOKEN) + 1)
    theirs = tiny.processor(text=[texts[0][:second]], images=[images[0][:1]], return_tensors="np")
    for key in ("input_ids", *VISION_KEYS):
        np.testing.assert_array_equal(batch[key], theirs[key], err_msg=key)
    two = UnslothVisionDataCollator(tiny.model, tiny.processor, max_seq_length=cut)(data + records(1, seed=2))
    assert two["pixel_values"].shape[1] == 1  # no row keeps a second image
    with pytest.raises(ValueError, match="all have images, or none do"):
        UnslothVisionDataCollator(tiny.model, tiny.processor)(data + [{"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}])


def training_model(tiny, mode=True, dropout=0.0, **kwargs):
    """LoRA on every linear the finetune_* flags select (all on), B random so that A gets gradients."""
    return FastVisionModel.get_peft_model(tiny.model, r=4, lora_alpha=8, lora_dropout=dropout, random_state=0,
                                          use_gradient_checkpointing=mode, init_lora_weights=False, **kwargs)


def capture_gradients():
    """An optax transformation whose state after a step is that step's (token-averaged) gradients."""
    import optax
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_gradients(model, micro_batches):
    from fastlora_jax import training
    step = training.make_train_step(model, capture_gradients())
    params = jax.tree.map(jnp.array, model.lora_params)
    _, grads, metrics = step(params, capture_gradients().init(params), micro_batches, None)
    return grads, metrics


@pytest.mark.slow
def test_train_step_gradients_with_images_match_peft(tiny):
    """Two micro-batches (one image per row; two images of other aspect ratios per row) accumulated in one step:
    the loss and the LoRA gradients of every stack equal torch autograd through PEFT of the token-averaged loss."""
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    model = training_model(tiny)
    collator = UnslothVisionDataCollator(model, tiny.processor)
    parts = [collator(records(2, sizes=((28, 28), (20, 50)), seed=1)),
             collator(records(1, sizes=((60, 30), (28, 28)), seed=2, images_per=2))]
    assert parts[0]["pixel_values"].shape[1] != parts[1]["pixel_values"].shape[1]
    grads, metrics = step_gradients(model, parts)
    model.save_pretrained(tiny.tmp / "train_adapter")
    loaded = PeftModel.from_pretrained(load_hf(tiny.dir), str(tiny.tmp / "train_adapter"), is_trainable=True)
    total, count = 0.0, 0
    for part in parts:
        batch = {k: torch.from_numpy(np.asarray(v, np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer)
                                                else np.float32)) for k, v in part.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        out = loaded(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
        total = total + out.loss * n
        count += n
    loss = total / count
    loss.backward()
    assert int(metrics["tokens"]) == count
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    torch_grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded, state_dict=torch_grads, save_embedding_layers=False))
    ours_grads = state_numpy(model.peft_state_dict(grads))
    assert set(ours_grads) == set(theirs)
    assert any("vision_model" in k for k in theirs) and any("cross_attn" in k for k in theirs)
    for key in theirs:
        assert np.abs(theirs[key]).max() > 0, key
        assert rel_l2(ours_grads[key], theirs[key]) < 1e-4, key


@pytest.mark.slow
def test_checkpointing_modes_give_the_same_gradients(tiny):
    """Recomputing every layer (True) and saving the matmul outputs (False) give the same gradients through the
    vision, self- and cross-attention stacks. ("unsloth" runs as True on the CPU, which has no pinned host memory
    to offload to; the SFTTrainer test below runs it.)"""
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    batch = [UnslothVisionDataCollator(tiny.model, tiny.processor)(records(2, sizes=((28, 28), (20, 50))))]
    results = {mode: [np.asarray(x) for x in jax.tree.leaves(step_gradients(training_model(tiny, mode), batch)[0])]
               for mode in (True, False)}
    for a, b in zip(results[False], results[True]):  # the same math; XLA may fuse (and so round) differently
        assert np.abs(b).max() > 0 and rel_l2(a, b) < 1e-6


def test_false_mode_recomputes_no_matmul_with_images(tiny, monkeypatch):
    """use_gradient_checkpointing=False keeps every base matmul output the backward needs, in the vision encoder and
    in both kinds of text layer: the traced loss-and-grad of a collator's batch with images (through the train
    step's micro-batch and loss) has as many base-projection matmuls, shape by shape, as the same loss without
    checkpointing. The cross-attention layers' q_norm and k_norm read the projections' outputs: with q and k kept
    normed, q_proj and k_proj (over every vision token) ran again in the backward of each cross-attention scan.
    Not counted: the LoRA factors' products (a side of at most 3 * r), which False recomputes with the norms."""
    from fastlora_jax import training
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    from test_host_offload_budget import _dot_shapes
    model = training_model(tiny, False)
    mb = training.prepare_micro_batch(model, UnslothVisionDataCollator(model, tiny.processor)(
        records(2, sizes=((28, 28), (20, 50)))))
    args = (mb["input_ids"], mb["labels"], mb["attention_mask"], None)
    group_rank = 3 * int(model.lora_layout.spec.r)  # q/k/v's A's side by side

    def matmuls():
        loss = model.loss_sum_fn()
        fn = jax.grad(lambda lora: loss(model.base_params, lora, *args, mb["position_ids"], mb["vision"])[0])
        return _dot_shapes(fn, model.lora_params, min_side=group_rank + 1)

    kept = matmuls()
    monkeypatch.setattr(training, "remat_policy", lambda mode, options=None: None)  # no checkpointing: nothing recomputed
    plain = matmuls()
    t = tiny.cfg.text
    vision_rows = mb["vision"]["pixel_values"].shape[1] * tiny.cfg.vision.max_num_tiles * tiny.cfg.vision.num_patches
    k_proj = ((mb["input_ids"].shape[0] * vision_rows, t.hidden_size), (t.num_kv_heads * t.head_dim, t.hidden_size))
    assert plain[k_proj] > 0, plain  # the images went through: the cross-attention k_proj/v_proj over them
    assert kept == plain, {s: (kept[s], plain[s]) for s in kept.keys() | plain.keys() if kept[s] != plain[s]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["unsloth", True, False])
def test_sft_trainer_with_the_vision_collator_lowers_the_loss(tiny, mode):
    """Unsloth's vision-notebook SFTConfig in each checkpointing mode: 6 steps lower the loss; before training
    the trainer's eval loss is compute_loss's."""
    from fastlora_jax.trainer import SFTConfig, SFTTrainer
    from fastlora_jax.vision_data import UnslothVisionDataCollator
    model = training_model(tiny, mode, finetune_vision_layers=mode is not False)  # language-only in one mode
    collator = UnslothVisionDataCollator(model, tiny.processor, pad_to_multiple_of=16)
    data = records(4, sizes=((28, 28), (20, 50)))
    out = tiny.tmp / f"sft_{mode}"
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=6,
                     learning_rate=3e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     optim="adamw_8bit", weight_decay=0.01, seed=3407, report_to="none", save_strategy="no",
                     remove_unused_columns=False, dataset_text_field="",
                     dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, tokenizer=tiny.processor, data_collator=collator, train_dataset=data,
                             eval_dataset=data[:2], args=args)
        before = trainer.evaluate()
        batch = collator(data[:2])
        direct = model.compute_loss(model.lora_params, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    *(batch[k] for k in VISION_KEYS))
        assert before["eval_loss"] == pytest.approx(float(direct), rel=1e-5)
        result = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h and "eval_loss" not in h]
    assert len(losses) == 6 and result.global_step == 6
    assert losses[-1] < losses[0] - 0.2, losses
    assert result.metrics["eval_loss"] < before["eval_loss"] - 0.2
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == model.adapter_config()["target_modules"]
    assert ("vision_model" in config["target_modules"]) == (mode is not False)


# ------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_vl_train_step_benchmark_smoke_mllama(capsys):
    """benchmarks/vl_train_step.py on its tiny Mllama shape, both modes, in this process (16-bit base: NF4 for this
    family is tested above); the GPU runs the same code at --shape llama-3.2-11b-vision."""
    import importlib.util
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("vl_train_step", root / "benchmarks" / "vl_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.main(["--shape", "tiny-mllama", "--steps", "1", "--seq", "128", "--no-4bit", "--in-process"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["vision+language", "language-only"]
    for row in rows:
        assert row["family"] == "mllama" and row["tokens_per_s"] > 0 and np.isfinite(row["loss"])
        assert row["seq"] == 128 and row["image_tiles"] == 2 and row["image_tokens"] == 2 * 17
    assert rows[0]["trainable_params"] > rows[1]["trainable_params"] > 0
