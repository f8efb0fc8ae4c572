"""LoRA/QLoRA against Hugging Face PEFT 0.21 as the oracle (issue 3).

For many configs, on tiny random Llamas (fp32, eager attention on the HF side):
- targeting and parameter counts equal PEFT's (`targeted_module_names`, `get_nb_trainable_parameters`);
- the initial adapter is drawn like PEFT's (which tensors are zero, spreads, exact copies);
- `save_pretrained` writes what `PeftModel.from_pretrained` consumes completely, with our logits, and an
  adapter_config.json equal to PEFT's for the same LoraConfig; an adapter PEFT saved loads here;
- `save_pretrained_merged` loads in transformers with the same logits (and equals PEFT's merge_and_unload);
- `FastLanguageModel.from_pretrained(adapter_dir)` reloads base + adapter;
- `peft_state_dict` (of the params and of their gradients) equals PEFT's state dict and gradients.
Then dropout, random_state, QLoRA against transformers + bitsandbytes, the Llama-3.2-1B count, and errors.
"""

import copy
import json
import re
import runpy
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import bnb_reference_path, rel_l2
from fastlora_jax import FastLanguageModel
from fastlora_jax.convert.peft import unties_head
from fastlora_jax.tiny import write_tiny_llama

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Unsloth's get_peft_model defaults, spelled out for PEFT's LoraConfig (whose own defaults differ).
UNSLOTH_DEFAULTS = dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=DEFAULT_TARGETS, bias="none",
                        init_lora_weights=True)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}

# Tiny Llamas. "biased" has attention/MLP biases (for bias="all"/"lora_only") and 3 layers (layer filters);
# "tied" ties lm_head to the embedding; "plain" is the QLoRA/dropout/error model (hidden 64: bnb blocks).
MODELS = {
    "biased": dict(seed=11, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "tied": dict(seed=12, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "plain": dict(seed=13, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}

ALL_FULL_NAMES = [f"model.layers.{i}.{m}" for i in range(3)
                  for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

# name -> (model, get_peft_model kwargs). Each is also a PEFT LoraConfig after UNSLOTH_DEFAULTS.
CASES = {
    "default": ("biased", dict()),
    "gaussian": ("biased", dict(r=8, init_lora_weights="gaussian")),
    "suffix_forms": ("biased", dict(r=4, lora_alpha=8, init_lora_weights=False,
                                    target_modules=["self_attn.q_proj", "mlp.down_proj", "layers.1.self_attn.v_proj",
                                                    "model.layers.2.mlp.up_proj"])),
    "regex": ("biased", dict(r=4, init_lora_weights=False, target_modules=r".*\.layers\.[02]\.self_attn\.(q|v)_proj")),
    "all_linear_untied": ("biased", dict(r=4, target_modules="all-linear", init_lora_weights=False)),
    "all_linear_tied": ("tied", dict(r=4, target_modules="all-linear", init_lora_weights=False)),
    "full_names_21": ("biased", dict(r=4, init_lora_weights=False, target_modules=ALL_FULL_NAMES)),
    "exclude_list": ("biased", dict(r=4, init_lora_weights=False, target_modules="all-linear",
                                    exclude_modules=["down_proj", "layers.0.self_attn.k_proj"])),
    "exclude_regex": ("biased", dict(r=4, init_lora_weights=False, exclude_modules=r".*layers\.1\..*")),
    "layers_int": ("biased", dict(r=4, init_lora_weights=False, layers_to_transform=1, layers_pattern="layers")),
    "layers_list": ("biased", dict(r=4, init_lora_weights=False, layers_to_transform=[0, 2], layers_pattern="layers")),
    "layers_list_no_pattern": ("biased", dict(r=4, init_lora_weights=False, layers_to_transform=[2],
                                              target_modules=["q_proj", "up_proj"])),
    "rslora": ("biased", dict(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False)),
    "rank_alpha_pattern": ("biased", dict(r=8, lora_alpha=16, init_lora_weights=False,
                                          rank_pattern={"q_proj": 4, "layers.2.mlp.down_proj": 2},
                                          alpha_pattern={"v_proj": 32, "layers.0.mlp.up_proj": 4})),
    "save_lm_head": ("biased", dict(r=4, init_lora_weights=False, modules_to_save=["lm_head"])),
    "save_embed_tokens": ("biased", dict(r=4, modules_to_save=["embed_tokens"])),
    "save_layernorm": ("biased", dict(r=4, init_lora_weights=False, modules_to_save=["post_attention_layernorm"])),
    "save_lm_head_tied": ("tied", dict(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["lm_head"])),
    "bias_all": ("biased", dict(r=4, init_lora_weights=False, bias="all", target_modules=["q_proj", "down_proj"])),
    "bias_lora_only": ("biased", dict(r=4, init_lora_weights=False, bias="lora_only",
                                      target_modules=["q_proj", "v_proj", "up_proj"])),
    "dora": ("biased", dict(r=4, use_dora=True, init_lora_weights=False)),
    "dora_init_true": ("biased", dict(r=4, use_dora=True, target_modules=["q_proj", "o_proj", "down_proj"])),
    "embedding_and_linear": ("biased", dict(r=4, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])),
    "embedding_init_true": ("biased", dict(r=4, target_modules=["embed_tokens"])),
    "embedding_tied": ("tied", dict(r=4, init_lora_weights=False, target_modules=["embed_tokens", "v_proj"])),
    "lm_head_tied": ("tied", dict(r=4, init_lora_weights=False, target_modules=["lm_head", "q_proj"])),
    "kitchen_sink": ("biased", dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, use_dora=True,
                                    bias="lora_only", modules_to_save=["embed_tokens", "input_layernorm"],
                                    rank_pattern={"o_proj": 2}, init_lora_weights=False)),
}


# ------------------------------------------------------------------------------------------ helpers


def lora_config(kwargs) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", **{**UNSLOTH_DEFAULTS, **copy.deepcopy(kwargs)})


def load_hf(model_dir, **kwargs) -> LlamaForCausalLM:
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager", **kwargs)
    if "quantization_config" in kwargs:
        bnb_reference_path(hf)
    return hf.eval()


def peft_reference(model_dir, kwargs, seed=0, **load_kwargs):
    """PEFT's model for the same config on a fresh transformers model (torch RNG seeded for its init)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(load_hf(model_dir, **load_kwargs), lora_config(kwargs))


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def peft_load(model_dir, adapter_dir, **kwargs):
    """PeftModel.from_pretrained, returning the model and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(load_hf(model_dir, **kwargs.pop("load_kwargs", {})), str(adapter_dir),
                                           **kwargs)
    return loaded.eval(), [str(w.message) for w in caught]


def state_numpy(state) -> dict:
    return {k: (v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32))
            for k, v in state.items()}


def shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def listing(directory) -> set:
    return {p.name for p in Path(directory).iterdir()}


def perturb_adapter(model, directory, seed):
    """Move the adapter away from its init (B = 0 leaves the output unchanged) through the files:
    save, add noise to every tensor, `load_adapter`. Stands in for training."""
    model.save_pretrained(directory)
    path = Path(directory) / "adapter_model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(seed)
    for key, value in tensors.items():
        noise = rng.standard_normal(value.shape).astype(np.float32)
        if key.endswith(".base_layer.weight"):  # PEFT's copy of a frozen embedding base: not trained
            continue
        if ".lora_" in key and "magnitude" not in key:
            tensors[key] = value + 0.1 * noise
        else:  # DoRA magnitudes, modules_to_save copies, trained biases
            tensors[key] = value * (1 + 0.1 * noise) + 0.01 * noise
    save_file(tensors, str(path), metadata={"format": "pt"})
    model.load_adapter(directory)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> base checkpoint dir, our fp32 base model, input ids and base logits."""
    out = {}
    rng = np.random.default_rng(2024)
    for name, spec in MODELS.items():
        spec = dict(spec)
        seed = spec.pop("seed")
        model_dir = write_tiny_llama(tmp_path_factory.mktemp(name) / "base", seed=seed, tokenizer=False, **spec)
        model, _ = FastLanguageModel.from_pretrained(str(model_dir), dtype="float32", load_in_4bit=False)
        ids = rng.integers(1, spec["vocab_size"], size=(2, 11))
        out[name] = SimpleNamespace(dir=model_dir, model=model, ids=ids, logits=np.asarray(model(ids).logits))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, bases, tmp_path_factory):
    """One config: our PEFT model moved off its init through `load_adapter` (B = 0 and copies equal to
    the base would hide mistakes), its initial PEFT state dict, its saved adapter and its logits."""
    name = request.param
    base_name, kwargs = CASES[name]
    base = bases[base_name]
    tmp = tmp_path_factory.mktemp(name)
    model = FastLanguageModel.get_peft_model(base.model, **copy.deepcopy(kwargs))
    initial = state_numpy(model.peft_state_dict())
    perturb_adapter(model, tmp / "perturbed", seed=len(name))
    adapter_dir = tmp / "adapter"
    model.save_pretrained(adapter_dir)
    logits = np.asarray(model(base.ids).logits)
    return SimpleNamespace(name=name, kwargs=kwargs, base=base, model=model, initial=initial, tmp=tmp,
                           adapter_dir=adapter_dir, logits=logits)


# ------------------------------------------------------------------------------------------ per config


def test_targets_and_counts_match_peft(case, capsys):
    ref = peft_reference(case.base.dir, case.kwargs)
    assert case.model.targeted_module_names == ref.targeted_module_names
    assert case.model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    capsys.readouterr()
    case.model.print_trainable_parameters()
    ours = capsys.readouterr().out
    ref.print_trainable_parameters()
    assert ours == capsys.readouterr().out


def peft_saved(case):
    """PeftModel.save_pretrained of PEFT's model for the same config, once per case: (config, tensors)."""
    directory = case.tmp / "peft_saved"
    if not directory.is_dir():
        ref = peft_reference(case.base.dir, case.kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.save_pretrained(directory)
    return (json.loads((directory / "adapter_config.json").read_text()),
            load_file(directory / "adapter_model.safetensors"))


def test_peft_state_dict_keys_and_shapes_match_peft(case):
    """`model.peft_state_dict()` has exactly the keys and shapes of PEFT's adapter state dict
    `get_peft_model_state_dict(peft_model)` for the same config (its trainable tensors: the embedding
    base copy that PEFT's file also carries is the next test's)."""
    ref = peft_reference(case.base.dir, case.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model_state_dict(ref, save_embedding_layers=False)
    assert shapes(case.model.peft_state_dict()) == shapes(theirs)


def test_adapter_file_holds_what_peft_writes(case):
    """Our adapter_model.safetensors has the keys, shapes and dtypes of PeftModel.save_pretrained's file
    for the same config (PEFT's default save_embedding_layers="auto" adds `<embedding>.base_layer.weight`
    when embed_tokens or lm_head is in a target_modules list)."""
    _, theirs = peft_saved(case)
    ours = load_file(case.adapter_dir / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}


def test_initial_adapter_is_drawn_like_peft(case):
    """Same tensors zero as PEFT's init; spreads within 25% of PEFT's draws (kaiming-uniform A,
    nn.Linear B when init=False, N(0, 1/r) A for "gaussian", normal embedding factors);
    modules_to_save and bias copies equal the base exactly, and so does DoRA's magnitude when B = 0
    (row norms of W)."""
    ref = peft_reference(case.base.dir, case.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(ref, save_embedding_layers=False))
    ours = case.initial
    assert shapes(ours) == shapes(theirs)
    for key in sorted(theirs):
        a, b = ours[key], theirs[key]
        if not ("lora_A" in key or "lora_B" in key or "lora_embedding" in key):
            if "magnitude" in key and case.kwargs.get("init_lora_weights", True) is False:
                continue  # depends on the random B·A
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=key)
            continue
        assert (a == 0).all() == (b == 0).all(), key
        if not (b == 0).all() and b.size >= 64:
            assert 0.75 < a.std() / b.std() < 1.33, (key, a.std(), b.std())
            assert abs(a.mean()) < 4 * b.std() / np.sqrt(b.size), (key, a.mean())


def test_saved_adapter_loads_in_peft_with_our_logits(case):
    """Every tensor of our file lands in the PEFT model (no missing, none left over), and PEFT's logits
    are ours within 1e-4 while the adapter really moves them (> 1e-3 from the base)."""
    assert listing(case.adapter_dir) == ADAPTER_FILES
    loaded, caught = peft_load(case.base.dir, case.adapter_dir)
    assert not [m for m in caught if "missing" in m.lower() or "unexpected" in m.lower()], caught
    ours = load_file(case.adapter_dir / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded))  # "auto": embedding base layers as PEFT saves them
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    expected = torch_logits(loaded, case.base.ids)
    assert rel_l2(case.logits, expected) < 1e-4
    assert rel_l2(case.base.logits, expected) > 1e-3


def test_adapter_config_matches_peft(case):
    """adapter_config.json equals what PeftModel.save_pretrained writes for the same LoraConfig, key by
    key (list-valued fields as sets: PEFT writes set order), and `peft_config["default"]` is its content."""
    theirs, _ = peft_saved(case)
    ours = json.loads((case.adapter_dir / "adapter_config.json").read_text())

    def norm(cfg):
        out = dict(cfg)
        for key in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(out.get(key), list):
                out[key] = sorted(out[key])
        return out

    ours_n, theirs_n = norm(ours), norm(theirs)
    assert sorted(ours_n) == sorted(theirs_n)
    diff = {k: (ours_n[k], theirs_n[k]) for k in theirs_n if ours_n[k] != theirs_n[k]}
    assert diff == {}
    assert case.model.peft_config == {"default": ours}


def test_peft_saved_adapter_loads_here(case):
    """The other direction: an adapter PEFT saved (random, init_lora_weights=False) loads with
    `load_adapter` and gives PEFT's logits within 1e-4."""
    kwargs = {**case.kwargs, "init_lora_weights": False}
    ref = peft_reference(case.base.dir, kwargs, seed=1)
    with torch.no_grad():  # move DoRA magnitudes and modules_to_save/bias copies off the base too
        for name, p in ref.named_parameters():
            if p.requires_grad and "lora_A" not in name and "lora_B" not in name and "lora_embedding" not in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(case.tmp / "peft_random")
    expected = torch_logits(ref.eval(), case.base.ids)
    model = FastLanguageModel.get_peft_model(case.base.model, **copy.deepcopy(kwargs))
    model.load_adapter(case.tmp / "peft_random")
    assert rel_l2(np.asarray(model(case.base.ids).logits), expected) < 1e-4




def test_merged_export_loads_in_transformers(case):
    """save_pretrained_merged: a plain checkpoint transformers loads with our logits (1e-4), equal to
    PEFT's merge_and_unload of our adapter; the directory holds no temporary files."""
    merged_dir = case.tmp / "merged"
    case.model.save_pretrained_merged(merged_dir)
    assert listing(merged_dir) == {"config.json", "model.safetensors"}
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    got = torch_logits(load_hf(merged_dir), case.base.ids)
    assert rel_l2(got, case.logits) < 1e-4
    if unties_head(case.model):
        # A tied model whose embedding or head is adapted is exported untied (PEFT's merge_and_unload would
        # write the change into the one shared matrix and alter the other side too): only the first check holds.
        assert config["tie_word_embeddings"] is False
        return
    loaded, _ = peft_load(case.base.dir, case.adapter_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = loaded.merge_and_unload()
    assert rel_l2(got, torch_logits(peft_merged, case.base.ids)) < 1e-4


RELOAD_CASES = ["default", "regex", "all_linear_tied", "full_names_21", "layers_list", "rank_alpha_pattern",
                "save_lm_head", "embedding_and_linear", "kitchen_sink"]


def reloaded(case):
    """`FastLanguageModel.from_pretrained(adapter_dir)`, once per case."""
    if not hasattr(case, "reloaded"):
        case.reloaded = FastLanguageModel.from_pretrained(str(case.adapter_dir), dtype="float32", load_in_4bit=False)
    return case.reloaded


@pytest.mark.parametrize("case", RELOAD_CASES, indirect=True)
def test_from_pretrained_adapter_dir_reloads_base_and_adapter(case):
    """An adapter directory whose adapter_config.json names the base loads base + adapter, with the same
    logits (same computation: 1e-6), targets, counts and adapter tensors."""
    assert json.loads((case.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(case.base.dir)
    model, tokenizer = reloaded(case)
    assert tokenizer is None
    assert model.targeted_module_names == case.model.targeted_module_names
    assert model.get_nb_trainable_parameters() == case.model.get_nb_trainable_parameters()
    np.testing.assert_allclose(np.asarray(model(case.base.ids).logits), case.logits, rtol=1e-6, atol=1e-6)
    first = {k: v for k, v in load_file(case.adapter_dir / "adapter_model.safetensors").items()
             if not k.endswith(".base_layer.weight")}  # PEFT's copy of a targeted embedding's frozen base
    again = state_numpy(model.peft_state_dict())
    assert shapes(again) == shapes(first)
    for key in first:
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)


@pytest.mark.parametrize("case", ["regex", "all_linear_tied", "kitchen_sink"], indirect=True)
def test_reloaded_adapter_keeps_its_config(case):
    """The reloaded model's peft_config is the file's: saving it again writes the same
    adapter_config.json (PeftModel.from_pretrained keeps every field, init_lora_weights included)."""
    model, _ = reloaded(case)
    written = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    now = model.peft_config["default"]
    assert {k: (now.get(k), v) for k, v in written.items() if now.get(k) != v} == {}


GRAD_CASES = ["layers_int", "rank_alpha_pattern", "save_lm_head_tied", "bias_all", "embedding_and_linear",
              "kitchen_sink"]


@pytest.mark.parametrize("case", GRAD_CASES, indirect=True)
def test_gradients_match_peft(case):
    """`peft_state_dict(grads)` of d(sum logits)/d(lora_params) equals PEFT's gradients of the same loss
    (our adapter loaded trainable), tensor by tensor within 1e-4 relative."""
    model = case.model
    ids = case.base.ids
    grads = jax.grad(lambda lp: model.apply(lp, ids).sum())(model.lora_params)  # apply: the logits array
    ours = state_numpy(model.peft_state_dict(grads))
    loaded, _ = peft_load(case.base.dir, case.adapter_dir, is_trainable=True)
    loaded(torch.tensor(ids)).logits.sum().backward()
    torch_grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    assert all(g is not None for g in torch_grads.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = state_numpy(get_peft_model_state_dict(loaded, state_dict=torch_grads, save_embedding_layers=False))
    assert shapes(ours) == shapes(theirs)
    for key in theirs:
        assert np.isfinite(ours[key]).all(), key
        if np.abs(theirs[key]).max() == 0:
            np.testing.assert_array_equal(ours[key], 0, err_msg=key)
        else:
            assert rel_l2(ours[key], theirs[key]) < 1e-4, key


# ------------------------------------------------------------------------------------------ single tests


def test_save_method_lora_writes_only_the_adapter(bases, tmp_path):
    base = bases["plain"]
    model = FastLanguageModel.get_peft_model(base.model, r=4, init_lora_weights=False)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained_merged(tmp_path / "b", save_method="lora")
    assert listing(tmp_path / "a") == listing(tmp_path / "b") == ADAPTER_FILES
    for name in ADAPTER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with pytest.raises(ValueError, match="save_method='merged_4bit_forced'"):
        model.save_pretrained_merged(tmp_path / "c", save_method="merged_4bit_forced")


def test_save_over_existing_directory_leaves_no_temp_files(bases, tmp_path):
    base = bases["plain"]
    model = FastLanguageModel.get_peft_model(base.model, r=4, init_lora_weights=False)
    (tmp_path / "keep.txt").write_text("user file")
    for _ in range(2):
        model.save_pretrained(tmp_path)
        model.save_pretrained_merged(tmp_path / "merged")
    assert listing(tmp_path) == ADAPTER_FILES | {"keep.txt", "merged"}
    assert listing(tmp_path / "merged") == {"config.json", "model.safetensors"}


def test_lora_dropout(bases, tmp_path):
    """With lora_dropout > 0: a dropout key gives training-mode outputs (different per key, the same for
    one key); without a key the call is deterministic and equals PEFT in eval mode."""
    base = bases["plain"]
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.25, init_lora_weights=False)
    model = FastLanguageModel.get_peft_model(base.model, **kwargs)
    ids = base.ids
    eval_logits = np.asarray(model(ids).logits)
    np.testing.assert_array_equal(np.asarray(model(ids).logits), eval_logits)
    np.testing.assert_array_equal(np.asarray(model.apply(model.lora_params, ids)), eval_logits)
    train0 = np.asarray(model.apply(model.lora_params, ids, dropout_key=jax.random.key(0)))
    train0_again = np.asarray(model.apply(model.lora_params, ids, dropout_key=jax.random.key(0)))
    train1 = np.asarray(model.apply(model.lora_params, ids, dropout_key=jax.random.key(1)))
    assert rel_l2(train0, eval_logits) > 1e-3
    assert rel_l2(train1, train0) > 1e-3
    np.testing.assert_array_equal(train0, train0_again)
    # dropout only touches the LoRA branch: without an adapter a key changes nothing
    np.testing.assert_array_equal(np.asarray(model.apply(None, ids, dropout_key=jax.random.key(0))), base.logits)

    model.save_pretrained(tmp_path / "adapter")
    loaded, _ = peft_load(base.dir, tmp_path / "adapter")
    assert loaded.peft_config["default"].lora_dropout == 0.25
    assert rel_l2(eval_logits, torch_logits(loaded, ids)) < 1e-4
    assert rel_l2(eval_logits, base.logits) > 1e-3


def test_random_state_reproducible(bases):
    base = bases["plain"]

    def leaves(seed, init=False):
        model = FastLanguageModel.get_peft_model(base.model, r=4, init_lora_weights=init, random_state=seed)
        return {k: np.asarray(v) for k, v in model.peft_state_dict().items()}

    a, b, c = leaves(7), leaves(7), leaves(8)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert not np.array_equal(a[key], c[key]), key
    d, e = leaves(7, init=True), leaves(8, init=True)
    for key in d:
        if "lora_A" in key:
            assert not np.array_equal(d[key], e[key]), key
        else:
            assert not d[key].any(), key


# ------------------------------------------------------------------------------------------ QLoRA


def bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def qlora(bases):
    base = bases["plain"]
    model, _ = FastLanguageModel.from_pretrained(str(base.dir), dtype="float32", load_in_4bit=True)
    assert model.is_4bit
    return model


@pytest.mark.parametrize("kwargs", [dict(), dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"])],
                         ids=["default", "all_linear_save_lm_head"])
def test_qlora_counts_and_adapter_match_peft_on_bnb(bases, qlora, tmp_path, kwargs):
    """4-bit on both sides: counts equal PEFT's on the bnb model (4-bit weights at logical size), and our
    adapter loaded into PEFT on the bnb model gives our logits within 1e-3."""
    base = bases["plain"]
    kwargs = {**kwargs, "init_lora_weights": False}
    model = FastLanguageModel.get_peft_model(qlora, **kwargs)
    ref = peft_reference(base.dir, kwargs, quantization_config=bnb_config(), device_map="cpu")
    assert model.targeted_module_names == ref.targeted_module_names
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    model.save_pretrained(tmp_path / "adapter")
    loaded, caught = peft_load(base.dir, tmp_path / "adapter",
                               load_kwargs=dict(quantization_config=bnb_config(), device_map="cpu"))
    assert not [m for m in caught if "missing" in m.lower()], caught
    expected = torch_logits(loaded, base.ids)
    logits = np.asarray(model(base.ids).logits)
    assert rel_l2(logits, expected) < 1e-3
    assert rel_l2(np.asarray(qlora(base.ids).logits), expected) > 1e-2


def test_qlora_merge_uses_original_16bit_weights(bases, qlora, tmp_path):
    """Merging a model quantized on load starts from the checkpoint's weights, not from NF4: the merged
    tensors equal PEFT's merge_and_unload on the fp32 model, and no dequantization warning is raised."""
    base = bases["plain"]
    model = FastLanguageModel.get_peft_model(qlora, r=8, init_lora_weights=False)
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained_merged(tmp_path / "merged")
    loaded, _ = peft_load(base.dir, tmp_path / "adapter")
    expected = {k: v.float().numpy() for k, v in loaded.merge_and_unload().state_dict().items()}
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(got) == set(expected)
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    merged = load_hf(tmp_path / "merged")
    assert rel_l2(torch_logits(merged, base.ids), torch_logits(loaded, base.ids)) < 1e-4


def test_merge_from_bnb_checkpoint_warns_and_dequantizes(bases, tmp_path):
    base = bases["plain"]
    hf4 = load_hf(base.dir, quantization_config=bnb_config(), device_map="cpu")
    hf4.save_pretrained(tmp_path / "bnb4")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "bnb4"), dtype="float32")
    assert model.weights_source == "bnb-4bit" and model.is_4bit
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False)
    with pytest.warns(UserWarning, match="dequantized"):
        model.save_pretrained_merged(tmp_path / "merged")
    logits = np.asarray(model(base.ids).logits)
    assert rel_l2(torch_logits(load_hf(tmp_path / "merged"), base.ids), logits) < 1e-4


# ------------------------------------------------------------------------------------------ big model


def test_llama_3_2_1b_default_counts_from_config(capsys):
    shapes_file = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes.py"
    shape = runpy.run_path(str(shapes_file))["SHAPES"]["llama-3.2-1b"]
    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    model = FastLanguageModel.from_config(config, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, random_state=3407)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == \
        "trainable params: 11,272,192 || all params: 1,247,086,592 || trainable%: 0.9039\n"


# ------------------------------------------------------------------------------------------ errors


def test_get_peft_model_twice(bases):
    base = bases["plain"]
    model = FastLanguageModel.get_peft_model(base.model, r=4)
    with pytest.warns(UserWarning, match="already has LoRA adapters"):
        assert FastLanguageModel.get_peft_model(model, r=4) is model
    with pytest.raises(ValueError, match="different config"):
        FastLanguageModel.get_peft_model(model, r=8)


BAD_ARGS = [
    (dict(r=0), ValueError, ["r", "0"]),
    (dict(r=1.5), TypeError, ["r", "1.5"]),
    (dict(r=True), TypeError, ["r", "True"]),
    (dict(lora_alpha=0), ValueError, ["lora_alpha", "0"]),
    (dict(lora_dropout=1.0), ValueError, ["lora_dropout", "1.0"]),
    (dict(lora_dropout=-0.1), ValueError, ["lora_dropout", "-0.1"]),
    (dict(bias="some"), ValueError, ["bias", "'some'"]),
    (dict(target_modules=["nope"]), ValueError, ["nope", "q_proj", "down_proj"]),
    (dict(layers_to_transform=[99]), ValueError, ["layers_to_transform", "99"]),
    (dict(bogus_option=1), TypeError, ["bogus_option"]),
    (dict(init_lora_weights="pissa"), NotImplementedError, ["init_lora_weights", "'pissa'"]),
    (dict(use_gradient_checkpointing="yes"), ValueError, ["use_gradient_checkpointing", "'yes'"]),
]


@pytest.mark.parametrize("kwargs, error, fragments", BAD_ARGS, ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))
                                                                   for k, _, _ in BAD_ARGS])
def test_bad_arguments_name_argument_and_value(bases, kwargs, error, fragments):
    with pytest.raises(error) as info:
        FastLanguageModel.get_peft_model(bases["plain"].model, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert re.search(rf"(?<![\w.]){re.escape(fragment)}(?![\w])", message), (fragment, message)


def test_loading_an_adapter_that_does_not_fit(bases, tmp_path):
    base = bases["plain"]
    r8 = FastLanguageModel.get_peft_model(base.model, r=8, init_lora_weights=False)
    r8.save_pretrained(tmp_path / "r8")
    r4 = FastLanguageModel.get_peft_model(base.model, r=4)
    before = r4.peft_state_dict()
    with pytest.raises(ValueError, match=r"lora_A\.weight.*shape \(8, 64\).*\(4, 64\)"):
        r4.load_adapter(tmp_path / "r8")
    for key, value in r4.peft_state_dict().items():  # a failed load leaves the adapter as it was
        np.testing.assert_array_equal(np.asarray(value), np.asarray(before[key]))
    # other targets: missing and unexpected keys are named
    qv = FastLanguageModel.get_peft_model(base.model, r=8, target_modules=["q_proj", "v_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"missing keys.*lm_head.*unexpected keys.*(k_proj|o_proj|mlp)"):
        qv.load_adapter(tmp_path / "r8")
    # adapter_config.json that says r=4 next to r=8 tensors
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    config["r"] = 4
    (tmp_path / "r8" / "adapter_config.json").write_text(json.dumps(config))
    # (our files carry a digest of the config's tensor fields: the pair is refused before any shape is read)
    with pytest.raises(ValueError, match=r"was written with a different adapter_config.json than the one beside it"):
        FastLanguageModel.from_pretrained(str(tmp_path / "r8"), dtype="float32", load_in_4bit=False)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        base.model.load_adapter(tmp_path / "r8")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        r4.load_adapter(tmp_path)


def test_merged_export_in_shards(tmp_path, rng):
    """A merged export larger than one shard: shards + index, no temporary files, same logits."""
    model_dir = write_tiny_llama(tmp_path / "m", seed=21, tokenizer=False)
    base, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(base, r=4, init_lora_weights=False)
    from fastlora_jax.convert.peft import save_merged
    save_merged(model, tmp_path / "merged", max_shard_bytes=50_000)
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert not [f for f in files if f.startswith(".")]
    ids = rng.integers(0, 512, (2, 12))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        got = hf(torch.tensor(ids)).logits.numpy()
    assert rel_l2(got, np.asarray(model(ids).logits)) < 1e-4
