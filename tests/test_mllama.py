"""Llama 3.2 Vision (Mllama, issue 14) against transformers 5.17 (eager attention), PEFT 0.21 and bitsandbytes.

One tiny random checkpoint written by transformers itself (`write_tiny_mllama`: every parameter random, the tanh
gates included, which transformers initializes to zero) and the tiny offline `MllamaProcessor`. The batch is what
that processor makes from two prompts: one image of aspect ratio (1, 2) after some text, and two images, (1, 1)
and (2, 1), the first at the start; padded to one length.
- the name table: module list == torch's `named_modules()`, checkpoint names == what save_pretrained wrote, and
  transformers loads a file written with the module names too (both conventions);
- the masks: our vision padding and cross-attention biases == transformers' `_prepare_*_mask` functions;
- fp32 vision features and logits (images; images without cross_attention_mask; text only) within 1e-4
  relative: the computation is the same sequence of fp32 ops, so the differences are summation order (~1e-7);
  1e-4 leaves room for a different BLAS, not for a wrong op (images move the logits by ~25%);
- 4-bit on load: our NF4 bytes == bitsandbytes' for the same tensors; logits within 1e-3 of transformers +
  bitsandbytes (same NF4 weights, dequantized in a different order). The tiny model's linears all have
  in_features % 64 == 0: bitsandbytes 0.50's CPU dequantize_4bit is wrong otherwise (a 32x32 weight round-trips
  with 37% error against NF4's ~9%, while its stored bytes are exactly ours);
- FastVisionModel's finetune_* flags: for all 16 combinations, the regex selects what PEFT wraps with it.
"""

import itertools
import re
import warnings
from collections import Counter
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")  # transformers' MllamaImageProcessor needs it
Image = pytest.importorskip("PIL.Image")

from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import bnb_reference_path, rel_l2  # noqa: E402
from fastlora_jax.models import mllama  # noqa: E402
from fastlora_jax.models.registry import _rename  # noqa: E402
from fastlora_jax.lora_config import LoraSpec, resolve_targets, vision_target_modules  # noqa: E402
from fastlora_jax.quant import NF4Weight  # noqa: E402
from fastlora_jax.tiny_mllama import IMAGE_TOKEN, write_tiny_mllama  # noqa: E402

FLAG_NAMES = ("finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules", "finetune_mlp_modules")
VISION_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def load_hf(model_dir, **kwargs):
    from transformers import MllamaForConditionalGeneration
    kwargs.setdefault("dtype", torch.float32)
    return MllamaForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs).eval()


def make_batch(processor, padding_side="right", seed=0):
    """Row 0: text, then one (1, 2) image. Row 1: a (1, 1) image first, text, a (2, 1) image, text."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
              for shape in ((20, 50, 3), (28, 28, 3), (60, 30, 3))]
    texts = [f"Describe {IMAGE_TOKEN} this image.", f"{IMAGE_TOKEN}What is{IMAGE_TOKEN} in the picture?"]
    processor.tokenizer.padding_side = padding_side
    return dict(processor(text=texts, images=[[images[0]], [images[1], images[2]]], return_tensors="pt",
                          padding=True))


def hf_logits(model, batch) -> np.ndarray:
    """A bitsandbytes model goes through conftest.bnb_reference_path first (on an AVX512-bf16 CPU, Linear4bit
    under no_grad otherwise repacks its weight for a bf16 kernel)."""
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def ours(tiny, batch, params=None, with_images=True, with_cross_mask=True) -> np.ndarray:
    ids = batch["input_ids"].numpy()
    mask = batch["attention_mask"].numpy() if "attention_mask" in batch else None
    cos, sin = mllama.text_cos_sin(tiny.hf_config, np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    vision = None
    if with_images:
        vision = {k: batch[k].numpy() for k in VISION_KEYS if k in batch}
        if not with_cross_mask:
            vision.pop("cross_attention_mask")
    logits = _forward(tiny.cfg, tiny.params if params is None else params, ids, cos, sin, mask, vision=vision)
    return np.asarray(logits.astype(jnp.float32))


_forward = jax.jit(mllama.forward, static_argnums=0, static_argnames="compute_dtype")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoConfig, AutoProcessor
    model_dir = write_tiny_mllama(tmp_path_factory.mktemp("mllama") / "base", seed=11)
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    cfg = mllama.Config.from_hf(hf_config)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return SimpleNamespace(dir=model_dir, hf_config=hf_config, cfg=cfg, params=mllama.load_params(model_dir, cfg),
                           processor=processor, hf=load_hf(model_dir), batch=make_batch(processor),
                           tmp=tmp_path_factory.mktemp("mllama_work"))


# ------------------------------------------------------------------------------------------ the checkpoint


def test_tiny_checkpoint_is_what_the_tests_need(tiny):
    """Image token id == vocab size, embedding vocab + 8 rows, every gate non-zero (or images would not matter),
    the batch has two aspect ratios, a padding image slot, text before the first image and padding."""
    cfg, batch = tiny.cfg, tiny.batch
    assert tiny.processor.image_token_id == cfg.image_token_id == cfg.text.vocab_size
    assert tiny.params["model"]["language_model"]["embed_tokens"]["weight"].shape[0] == cfg.text.vocab_size + 8
    gates = {n: p.detach().numpy() for n, p in tiny.hf.named_parameters() if "gate" in n.rsplit(".", 1)[-1]}
    assert len(gates) == 3 + 2 * cfg.vision.num_global_layers + 2 * len(cfg.text.cross_attention_layers)
    assert all(np.abs(g).min() > 0.05 for g in gates.values())
    assert set(batch["aspect_ratio_ids"].numpy().ravel()) == {0, 1, 2, 3}
    assert batch["cross_attention_mask"][0, 0].sum() == 0  # row 0 starts with text
    assert not batch["attention_mask"].numpy().all()
    assert cfg.vision.padded_patches > cfg.vision.num_patches  # the vision padding is exercised


# ------------------------------------------------------------------------------------------ name table


def test_module_list_is_torch_named_modules(tiny):
    kinds = {"Linear": "linear", "Embedding": "embedding"}
    theirs = [(n, kinds.get(type(m).__name__, "other")) for n, m in tiny.hf.named_modules() if n]
    assert mllama.module_list(tiny.cfg) == theirs


def test_checkpoint_names_and_shapes_are_what_save_pretrained_wrote(tiny):
    stored = load_file(tiny.dir / "model.safetensors")
    ours_ = {_rename(mllama.CHECKPOINT_RENAMES, n): shape for n, shape, _ in mllama.checkpoint_tensors(tiny.cfg)}
    assert ours_ == {k: v.shape for k, v in stored.items()}
    # the module names are torch's parameter names (what PEFT and the runtime model see)
    assert {n for n, _, _ in mllama.checkpoint_tensors(tiny.cfg)} == {n for n, _ in tiny.hf.named_parameters()}
    assert {_rename(mllama.LOAD_RENAMES, k) for k in stored} == {n for n, _ in tiny.hf.named_parameters()}


def test_both_naming_conventions_load(tiny):
    """transformers loads a file written with the module names as well; so do we, to the same weights."""
    stored = load_file(tiny.dir / "model.safetensors")
    other = tiny.tmp / "module_names"
    other.mkdir()
    save_file({_rename(mllama.LOAD_RENAMES, k): v for k, v in stored.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    (other / "config.json").write_text((tiny.dir / "config.json").read_text())
    hf = load_hf(other)
    for name, p in tiny.hf.state_dict().items():
        torch.testing.assert_close(hf.state_dict()[name], p, rtol=0, atol=0)
    params = mllama.load_params(other, tiny.cfg)
    jax.tree.map(np.testing.assert_array_equal, params, tiny.params)


def test_stack_positions_name_hf_layers(tiny):
    cfg = tiny.cfg
    assert mllama.text_layer_runs(cfg.text) == [(mllama.TEXT_STACK, 0, 1), (mllama.CROSS_STACK, 0, 1),
                                                (mllama.TEXT_STACK, 1, 3), (mllama.CROSS_STACK, 1, 2)]
    assert mllama.module_name(cfg, mllama.CROSS_STACK, 1, "cross_attn.q_proj") == \
        "model.language_model.layers.4.cross_attn.q_proj"
    assert mllama.split_module_name(cfg, "model.language_model.layers.3.mlp.up_proj.weight") == \
        (mllama.TEXT_STACK, 2, "mlp.up_proj.weight")
    assert mllama.split_module_name(cfg, "model.language_model.layers.1.cross_attn_mlp_gate") == \
        (mllama.CROSS_STACK, 0, "cross_attn_mlp_gate")
    assert mllama.split_module_name(cfg, "model.multi_modal_projector.weight") is None
    lm = tiny.params["model"]["language_model"]
    assert lm["layers"]["self_attn"]["q_proj"]["weight"].shape[0] == 3
    assert lm["cross_attention_layers"]["cross_attn"]["q_norm"]["weight"].shape == (2, cfg.text.head_dim)
    np.testing.assert_array_equal(  # stack position 2 of the self-attention layers is HF layer 3
        np.asarray(lm["layers"]["mlp"]["up_proj"]["weight"][2]),
        tiny.hf.model.language_model.layers[3].mlp.up_proj.weight.detach().numpy())


def test_config_errors_name_the_field(tiny):
    bad = tiny.hf_config.__class__.from_dict(tiny.hf_config.to_dict())
    bad.vision_config.vision_output_dim = 64
    with pytest.raises(ValueError, match="vision_output_dim=64"):
        mllama.Config.from_hf(bad)
    with pytest.raises(ValueError, match=r"pixel_values has \[tiles, channels, height, width\]"):
        mllama.vision_model(tiny.cfg, tiny.params, np.zeros((1, 1, 2, 3, 14, 14), np.float32), np.ones((1, 1), int),
                            np.ones((1, 1, 2), int))


# ------------------------------------------------------------------------------------------ masks


def test_vision_padding_mask_is_transformers(tiny):
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask
    v = tiny.cfg.vision
    ratio_mask = tiny.batch["aspect_ratio_mask"].reshape(-1, v.max_num_tiles)
    theirs = _prepare_aspect_ratio_attention_mask(ratio_mask, v.num_patches, v.padded_patches, torch.float32)
    pad = np.asarray(mllama.vision_padding(v, ratio_mask.numpy()))
    ours_ = np.where(pad[:, :, None] & pad[:, None, :], np.finfo(np.float32).min, 0.0)
    np.testing.assert_array_equal(ours_, theirs[:, 0].numpy())


def test_cross_attention_bias_is_transformers(tiny):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    mask = tiny.batch["cross_attention_mask"]
    bias, row = _prepare_cross_attention_mask(mask, tiny.cfg.vision.num_patches, torch.float32)
    ours_bias, ours_row = mllama.cross_attention_bias(tiny.cfg, mask.numpy(), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours_bias), bias[:, 0].numpy())
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
    keep = batch["attention_mask"].numpy().astype(bool)
    expected = hf_logits(tiny.hf, batch)
    assert rel_l2(ours(tiny, batch)[keep], expected[keep]) < 1e-4
    text_only = hf_logits(tiny.hf, {k: batch[k] for k in ("input_ids", "attention_mask")})
    assert rel_l2(text_only[keep], expected[keep]) > 1e-2  # the images matter: the parity is not vacuous


def test_fp32_logits_images_without_cross_attention_mask(tiny):
    """Without cross_attention_mask every token attends to every vision token and no MLP row is masked."""
    batch = {k: v for k, v in tiny.batch.items() if k != "cross_attention_mask"}
    keep = batch["attention_mask"].numpy().astype(bool)
    assert rel_l2(ours(tiny, batch)[keep], hf_logits(tiny.hf, batch)[keep]) < 1e-4


def test_fp32_logits_text_only_skip_cross_layers(tiny):
    batch = tiny.processor(text=["What is in the picture?", "Describe this."], return_tensors="pt", padding=True)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    keep = batch["attention_mask"].numpy().astype(bool)
    assert rel_l2(ours(tiny, batch, with_images=False)[keep], hf_logits(tiny.hf, batch)[keep]) < 1e-4
    no_mask = {"input_ids": batch["input_ids"][:1]}
    assert rel_l2(ours(tiny, no_mask, with_images=False), hf_logits(tiny.hf, no_mask)) < 1e-4


# ------------------------------------------------------------------------------------------ 4-bit on load


def test_4bit_on_load_matches_transformers_bitsandbytes(tiny):
    """bitsandbytes quantizes every nn.Linear but lm_head: both vision transformers, the cross-attention layers
    and the projector; not the patch Conv2d, the embeddings or the gates."""
    from transformers import BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    hf = bnb_reference_path(load_hf(tiny.dir, quantization_config=quant, device_map="cpu"))
    params = mllama.load_params(tiny.dir, tiny.cfg, load_in_4bit=True)

    def assert_same_nf4(weight, module_name):
        module = hf.get_submodule(module_name)
        assert type(module).__name__ == "Linear4bit"
        theirs = {"": module.weight.data.numpy(),
                  **{k: v.numpy() for k, v in module.weight.quant_state.as_dict(packed=True).items()}}
        mine = weight.to_bnb()
        for key, value in NF4Weight.from_bnb(theirs).to_bnb().items():
            np.testing.assert_array_equal(np.asarray(mine[key]), np.asarray(value), err_msg=f"{module_name} {key}")

    vm, lm = params["model"]["vision_model"], params["model"]["language_model"]
    at = lambda w, i: jax.tree.map(lambda x: x[i], w)  # noqa: E731
    assert_same_nf4(at(vm["global_transformer"]["layers"]["mlp"]["fc1"]["weight"], 0),
                    "model.vision_model.global_transformer.layers.0.mlp.fc1")
    assert_same_nf4(at(lm["cross_attention_layers"]["cross_attn"]["k_proj"]["weight"], 1),
                    "model.language_model.layers.4.cross_attn.k_proj")
    assert_same_nf4(at(lm["layers"]["self_attn"]["o_proj"]["weight"], 2), "model.language_model.layers.3.self_attn.o_proj")
    assert_same_nf4(params["model"]["multi_modal_projector"]["weight"], "model.multi_modal_projector")
    assert not isinstance(vm["patch_embedding"]["weight"], NF4Weight)
    assert not isinstance(params["lm_head"]["weight"], NF4Weight)
    keep = tiny.batch["attention_mask"].numpy().astype(bool)
    assert rel_l2(ours(tiny, tiny.batch, params)[keep], hf_logits(hf, tiny.batch)[keep]) < 1e-3


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
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import MllamaForConditionalGeneration

    ml = mllama.module_list(tiny.cfg)
    kwargs = dict(zip(FLAG_NAMES, flags))
    vision, language, attention, mlp = flags
    if not (vision or language) or not (attention or mlp):
        with pytest.raises(ValueError, match="=False"):
            vision_target_modules(ml, **kwargs)
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
    model = MllamaForConditionalGeneration(tiny.hf_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=regex)).base_model.model
    assert [n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)] == expected


# ------------------------------------------------------------------------------------------ LoRA through the stacks

# One module in each stack (the cross-attention stack twice, at both of its positions) and the projector.
LORA_TARGETS = ("model.vision_model.transformer.layers.1.mlp.fc1",
                "model.vision_model.global_transformer.layers.0.self_attn.v_proj",
                "model.language_model.layers.1.cross_attn.o_proj",
                "model.language_model.layers.4.cross_attn.k_proj",
                "model.language_model.layers.3.self_attn.q_proj",
                "model.multi_modal_projector")
LORA_R, LORA_ALPHA = 2, 4


def with_lora(cfg, params, lora):
    """The combined tree: each target's base module dict plus `lora_A`/`lora_B`/`scaling`, stacked modules
    holding zeros (scaling 0) at the other positions of their stack, as lora.py lays them out."""
    params = jax.tree.map(lambda x: x, params)  # a fresh nest of dicts; leaves shared
    for name, (a, b) in lora.items():
        where = mllama.split_module_name(cfg, name + ".weight")
        if where is None:
            path, extra = name.split("."), {"lora_A": a, "lora_B": b, "scaling": jnp.float32(LORA_ALPHA / LORA_R)}
        else:
            stack, position, rel = where
            depth = mllama.layer_stacks(cfg)[stack][0]
            path = stack.split(".") + rel.split(".")[:-1]
            extra = {"lora_A": jnp.zeros((depth, *a.shape)).at[position].set(a),
                     "lora_B": jnp.zeros((depth, *b.shape)).at[position].set(b),
                     "scaling": jnp.zeros((depth,)).at[position].set(LORA_ALPHA / LORA_R)}
        node = params
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[path[-1]] = {**node[path[-1]], **extra}
    return params


def test_lora_logits_and_gradients_match_peft(tiny):
    """Adapters on every stack and the projector route to the right HF layers: PEFT's logits with the same A/B,
    and d(loss)/d(A, B) from torch autograd through PEFT, within 1e-4 (fp32; loss = <logits, fixed random>)."""
    from peft import LoraConfig, get_peft_model
    rng = np.random.default_rng(1414)
    shapes = {n: tiny.hf.get_submodule(n).weight.shape for n in LORA_TARGETS}
    lora = {n: (rng.standard_normal((LORA_R, s[1])).astype(np.float32) * 0.3,
                rng.standard_normal((s[0], LORA_R)).astype(np.float32) * 0.3) for n, s in shapes.items()}
    batch = tiny.batch
    keep = batch["attention_mask"].numpy().astype(bool)
    probe = rng.standard_normal((int(keep.sum()), tiny.cfg.vocab_size)).astype(np.float32)

    peft_model = get_peft_model(load_hf(tiny.dir), LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA,
                                                              target_modules=list(LORA_TARGETS)))
    wrapped = peft_model.base_model.model
    with torch.no_grad():
        for n, (a, b) in lora.items():
            wrapped.get_submodule(n).lora_A["default"].weight.copy_(torch.from_numpy(a))
            wrapped.get_submodule(n).lora_B["default"].weight.copy_(torch.from_numpy(b))
    logits = peft_model(**batch).logits
    (logits[torch.from_numpy(keep)] * torch.from_numpy(probe)).sum().backward()
    theirs = logits.detach().numpy()

    ids = batch["input_ids"].numpy()
    cos, sin = mllama.text_cos_sin(tiny.hf_config, np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    vision = {k: batch[k].numpy() for k in VISION_KEYS}

    def loss(lora_):
        h = mllama.hidden_states(tiny.cfg, with_lora(tiny.cfg, tiny.params, lora_), ids, cos, sin,
                                 batch["attention_mask"].numpy(), vision=vision)
        out = mllama._linear(h, mllama.lm_head_module(tiny.cfg, tiny.params))
        return jnp.sum(out[keep] * probe), out

    (_, ours_logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    assert rel_l2(np.asarray(ours_logits)[keep], theirs[keep]) < 1e-4
    assert rel_l2(theirs[keep], hf_logits(tiny.hf, batch)[keep]) > 1e-2  # the adapters matter
    for n in LORA_TARGETS:
        module = wrapped.get_submodule(n)
        for ours_g, theirs_p in zip(grads[n], (module.lora_A["default"].weight, module.lora_B["default"].weight)):
            assert rel_l2(np.asarray(ours_g), theirs_p.grad.numpy()) < 1e-4, n


def test_bf16_within_bf16_tolerance(tiny):
    """bf16 weights and activations on both sides: 2e-2 relative (bf16 has 8 bits of mantissa, ~4e-3 per
    rounding, and nine layers of them)."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny.params)
    hf = load_hf(tiny.dir, dtype=torch.bfloat16)
    batch = tiny.batch
    keep = batch["attention_mask"].numpy().astype(bool)
    expected = hf_logits(hf, {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)})
    ids = batch["input_ids"].numpy()
    cos, sin = mllama.text_cos_sin(tiny.hf_config, np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    logits = _forward(tiny.cfg, params, ids, cos, sin, batch["attention_mask"].numpy(), compute_dtype=jnp.bfloat16,
                      vision={k: batch[k].numpy() for k in VISION_KEYS})
    assert logits.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(logits.astype(jnp.float32))[keep], expected[keep]) < 2e-2
