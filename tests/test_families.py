"""New model families against transformers 5.17 (eager attention) + PEFT 0.21 + bitsandbytes as the oracles (issue 13).

For every case of tests/family_cases.py (Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3/Phi-4), on a tiny
random checkpoint that transformers wrote:
- the checkpoint really exercises the case's features (on transformers alone: a sliding window or soft-cap that
  did not move transformers' logits would test nothing);
- the family's module list is torch's `named_modules()`;
- fp32 logits of left- and right-padded rows equal transformers' within 1e-4 (rel_l2 on non-padded positions);
  bf16 within 2e-2;
- NF4 quantized on load is bitsandbytes' (the same modules quantized, packed bytes and quant state exact; logits
  within 1e-3 of transformers running the weights bnb quantized), and a bnb-4bit checkpoint saved by
  transformers loads as stored (its bytes; logits within 1e-3);
- targets, trainable-parameter counts and print_trainable_parameters equal PEFT's, for the family's default
  target_modules (no argument) and for "all-linear";
- our adapter loads in PeftModel.from_pretrained with every tensor consumed, giving our logits (1e-4);
- compute_loss and its LoRA gradients equal torch autograd through PEFT (1e-5 / 1e-4) with B != 0;
- greedy generation with the adapter is token-identical to transformers + PEFT, each step's logits within 1e-4
  (prompt + new tokens longer than the sliding window, so the KV cache's window is exercised); a longrope case
  also generates across its short/long switch, against a cache-free transformers + PEFT greedy loop;
- save_pretrained_merged loads in transformers with our logits (1e-4).
Every random draw derives from the case name (family_cases.FamilyCase.seed). The `llama_control` case runs the
same checks on the family fastlora_jax supported before: if it fails, suspect the harness.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file

from conftest import bnb_modules, bnb_reference_path, decode_bnb_nf4, rel_l2
from family_cases import CASES, SEQ, WINDOW, padded_batch, torch_module_list, write_family_checkpoint
from fastlora_jax import FastLanguageModel, NF4Weight
from fastlora_jax.lora import get_node, split_module

ALL = sorted(CASES)
GENERATION = ALL
# The adapter every LoRA check uses: Unsloth's defaults (family default targets) with a random B (PEFT's
# init_lora_weights=False), so that it moves the logits and A's gradients are not zero.
ADAPTER = dict(r=8, lora_alpha=16, init_lora_weights=False, random_state=1234)
PEFT_DEFAULTS = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", init_lora_weights=True)


@pytest.fixture(scope="module", autouse=True)
def _torch_settings():
    """One torch thread (JAX's pool next to torch's makes tiny matmuls wait), and bnb's odd-shape dequantize
    fallback eager instead of torch.compile'd (the same math)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(disable=True):
        yield
    torch.set_num_threads(threads)


def load_hf(case, directory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = case.model_cls().from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager",
                                              **kwargs)
    return hf.eval()


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.float().numpy()


def bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module", params=ALL)
def fam(request, tmp_path_factory):
    """One case: its checkpoint, seeded padded inputs, transformers' fp32 model and logits, and a cache for
    what several tests share (our loaded models, the adapter, the bnb model)."""
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(case.name)
    directory = write_family_checkpoint(case, root / "base")
    ids, mask = padded_batch(case)
    hf = load_hf(case, directory)
    return SimpleNamespace(case=case, root=root, dir=directory, ids=ids, mask=mask, keep=mask.astype(bool), hf=hf,
                           hf_logits=torch_logits(hf, ids, mask), cache={})


def ours(fam, dtype="float32", load_in_4bit=False, directory=None):
    """FastLanguageModel.from_pretrained of the case's checkpoint (or `directory`), once per setting."""
    key = (dtype, load_in_4bit, str(directory))
    if key not in fam.cache:
        fam.cache[key] = FastLanguageModel.from_pretrained(str(directory or fam.dir), dtype=dtype,
                                                           load_in_4bit=load_in_4bit)
    return fam.cache[key]


def adapted(fam):
    """Our fp32 model with the ADAPTER (default targets), saved once; (model, adapter dir, padded logits)."""
    if "adapter" not in fam.cache:
        base, _ = ours(fam)
        model = FastLanguageModel.get_peft_model(base, **ADAPTER)
        adapter_dir = fam.root / "adapter"
        model.save_pretrained(adapter_dir)
        fam.cache["adapter"] = (model, adapter_dir, np.asarray(model(fam.ids, attention_mask=fam.mask).logits))
    return fam.cache["adapter"]


def peft_load(fam, adapter_dir, **kwargs):
    """PeftModel.from_pretrained on a fresh transformers model; returns (model, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(load_hf(fam.case, fam.dir), str(adapter_dir), **kwargs)
    return loaded.eval(), [str(w.message) for w in caught]


def hf_bnb(fam):
    """transformers + bitsandbytes NF4 (double quant, fp32 compute) of the case's checkpoint, on the CPU.

    Oracle trap: on a CPU with AVX512-BF16, bnb 0.50's Linear4bit in eval mode repacks its weight in place at
    the first forward (the bytes then read are another layout) and runs a fused bf16 kernel (activations and
    absmax cast to bf16) whatever bnb_4bit_compute_dtype says: logits carry bf16 error (~2e-3 here) that
    depends on the machine. That path is turned off (conftest.bnb_reference_path); the logits oracle is
    hf_decoded_logits anyway."""
    if "bnb" not in fam.cache:
        fam.cache["bnb"] = bnb_reference_path(load_hf(fam.case, fam.dir, quantization_config=bnb_config(),
                                                      device_map="cpu"))
    return fam.cache["bnb"]


# ------------------------------------------------------------------------------------------ the oracle itself


def hf_with(fam, **overrides) -> np.ndarray:
    """transformers' padded logits of the case's checkpoint with config attributes overridden."""
    return torch_logits(load_hf(fam.case, fam.dir, **overrides), fam.ids, fam.mask)


def moved(a, b, keep) -> float:
    return rel_l2(a[keep], b[keep])


def test_checkpoint_exercises_the_case_features(fam):
    """What each case claims to exercise is in transformers' config and moves transformers' logits (> 1e-2):
    parity at 1e-4 then proves the feature is implemented, not merely ignored by both sides."""
    case, cfg, hf = fam.case, fam.hf.config, fam.hf
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    for feature in case.features:
        if feature == "gqa":
            assert kv_heads < heads and heads % kv_heads == 0
        elif feature == "head_dim":
            assert cfg.head_dim != cfg.hidden_size // heads
        elif feature in ("tied", "untied"):
            assert bool(cfg.tie_word_embeddings) is (feature == "tied")
            stored = load_file(fam.dir / "model.safetensors")
            assert ("lm_head.weight" in stored) is (feature == "untied"), sorted(stored)
        elif feature == "bias":
            biases = [k for k in state if k.endswith("proj.bias")]
            assert biases and all(np.abs(state[k]).min() > 0 for k in biases), biases
        elif feature == "qk_norm":
            norms = [k for k in state if k.endswith(("q_norm.weight", "k_norm.weight"))]
            assert len(norms) == 2 * cfg.num_hidden_layers
            identity = 0.0 if "gemma" in case.family else 1.0  # Gemma's norms scale by (1 + w)
            assert all(np.abs(state[k] - identity).max() > 0.05 for k in norms)
        elif feature == "sliding_window":
            assert cfg.sliding_window == WINDOW < SEQ
            if layer_types:
                assert "sliding_attention" in layer_types, layer_types
            assert moved(hf_with(fam, sliding_window=4096), fam.hf_logits, fam.keep) > 1e-2
        elif feature == "mixed_layer_types":
            assert set(layer_types) == {"sliding_attention", "full_attention"}, layer_types
        elif feature == "rope_per_layer_type":
            rope = cfg.rope_parameters
            assert set(rope) == {"sliding_attention", "full_attention"}
            assert rope["sliding_attention"] != rope["full_attention"]
            same = {t: dict(rope["sliding_attention"]) for t in rope}
            assert moved(hf_with(fam, rope_parameters=same), fam.hf_logits, fam.keep) > 1e-2
        elif feature == "attn_softcap":
            assert cfg.attn_logit_softcapping
            assert moved(hf_with(fam, attn_logit_softcapping=None), fam.hf_logits, fam.keep) > 1e-2
        elif feature == "final_softcap":
            assert cfg.final_logit_softcapping
            assert np.abs(fam.hf_logits).max() > 0.5 * cfg.final_logit_softcapping  # tanh bends the logits
            assert moved(hf_with(fam, final_logit_softcapping=None), fam.hf_logits, fam.keep) > 1e-2
        elif feature == "fused_projections":
            assert {"qkv_proj", "gate_up_proj"} <= {n.rsplit(".", 1)[-1] for n, _ in hf.named_modules()}
        elif feature == "partial_rotary":
            factor = cfg.rope_parameters["partial_rotary_factor"]
            assert 0 < factor < 1
            rotary_dim = int((cfg.hidden_size // heads) * factor)
            assert hf.model.rotary_emb.inv_freq.numel() * 2 == rotary_dim
        elif feature == "longrope":
            rope = cfg.rope_parameters
            assert rope["rope_type"] == "longrope" and rope["long_factor"] != rope["short_factor"]
            assert rope["original_max_position_embeddings"] < SEQ  # the long factors are the ones in use
            short = dict(rope, long_factor=list(rope["short_factor"]))
            assert moved(hf_with(fam, rope_parameters=short), fam.hf_logits, fam.keep) > 1e-2
            # and within original_max_position_embeddings the short factors are the ones in use
            ids = fam.ids[2:, :rope["original_max_position_embeddings"]]
            long = load_hf(case, fam.dir, rope_parameters=dict(rope, short_factor=list(rope["long_factor"])))
            assert rel_l2(torch_logits(long, ids), torch_logits(hf, ids)) > 1e-2
        else:
            raise AssertionError(f"unknown feature {feature!r}")
    # the padding really changes the unpadded positions of the left-padded row
    assert rel_l2(torch_logits(hf, fam.ids)[0, 5:], fam.hf_logits[0, 5:]) > 1e-3


# ------------------------------------------------------------------------------------------ structure


def test_module_list_is_torch_named_modules(fam):
    model, _ = ours(fam)
    assert model.config.architectures == [fam.case.model_class]
    assert model.family.module_list(model.cfg) == torch_module_list(fam.hf)


# ------------------------------------------------------------------------------------------ logits


def test_fp32_padded_logits_match_transformers(fam):
    model, tokenizer = ours(fam)
    assert tokenizer is not None
    logits = np.asarray(model(fam.ids, attention_mask=fam.mask).logits)
    assert logits.shape == fam.hf_logits.shape and logits.dtype == np.float32
    assert rel_l2(logits[fam.keep], fam.hf_logits[fam.keep]) < 1e-4
    # and the unpadded call equals transformers' unpadded call
    full = torch_logits(fam.hf, fam.ids)
    assert rel_l2(np.asarray(model(fam.ids).logits), full) < 1e-4
    if "longrope" in fam.case.features:  # a sequence within original_max_position_embeddings: the short factors
        short = fam.ids[2:, :fam.hf.config.rope_parameters["original_max_position_embeddings"]]
        assert rel_l2(np.asarray(model(short).logits), torch_logits(fam.hf, short)) < 1e-4


def test_bf16_logits_within_bf16_tolerance(fam):
    model, _ = ours(fam, dtype="bfloat16")
    logits = model(fam.ids, attention_mask=fam.mask).logits
    assert logits.dtype == jnp.bfloat16
    logits = np.asarray(logits.astype(jnp.float32))
    assert rel_l2(logits[fam.keep], fam.hf_logits[fam.keep]) < 2e-2


# ------------------------------------------------------------------------------------------ NF4


def nf4_leaves(model) -> dict:
    """{module name: NF4Weight of one layer} of every quantized weight of our model."""
    out = {}
    for tensor in model.tensor_names():
        path, index = split_module(tensor, model.stacks)
        leaf = get_node(model.base_params, path)
        if isinstance(leaf, NF4Weight):
            out[tensor.removesuffix(".weight")] = leaf if index is None else jax.tree.map(lambda x: x[index], leaf)
    return out


def assert_same_nf4(ours_by_name: dict, theirs_by_name: dict):
    assert sorted(ours_by_name) == sorted(theirs_by_name)
    for name, theirs in theirs_by_name.items():
        mine = ours_by_name[name].to_bnb()
        expected = NF4Weight.from_bnb(theirs).to_bnb()  # bnb's tensors in the same (numpy) form
        assert list(mine) == list(expected), name
        for key in expected:
            a, b = np.asarray(mine[key]), np.asarray(expected[key])
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (name, key)


def hf_decoded_logits(fam, modules: dict) -> np.ndarray:
    """transformers' fp32 eager logits with each quantized module's weight replaced by its decoded NF4."""
    hf = load_hf(fam.case, fam.dir)
    with torch.no_grad():
        for name, tensors in modules.items():
            hf.get_submodule(name).weight.copy_(torch.from_numpy(decode_bnb_nf4(tensors)))
    return torch_logits(hf, fam.ids, fam.mask)


def test_nf4_on_load_matches_transformers_bitsandbytes(fam):
    """The same modules quantized, with bnb's bytes, absmax and nested state exactly; logits within 1e-3 of
    transformers running the weights bnb quantized (decode_bnb_nf4 says why not bnb's CPU forward)."""
    model, _ = ours(fam, load_in_4bit=True)
    theirs = bnb_modules(hf_bnb(fam))
    assert_same_nf4(nf4_leaves(model), theirs)
    import bitsandbytes.functional as F
    for name, tensors in theirs.items():  # the decoder is bnb's dequantize where that one is right
        module = hf_bnb(fam).get_submodule(name)
        if module.in_features % 64 == 0:
            reference = F.dequantize_4bit(module.weight.data, module.weight.quant_state, quant_type="nf4")
            np.testing.assert_array_equal(decode_bnb_nf4(tensors), reference.numpy(), err_msg=name)
    expected = hf_decoded_logits(fam, theirs)
    logits = np.asarray(model(fam.ids, attention_mask=fam.mask).logits)
    assert rel_l2(logits[fam.keep], expected[fam.keep]) < 1e-3
    assert rel_l2(expected[fam.keep], fam.hf_logits[fam.keep]) > 1e-3  # NF4 really differs from fp32


def test_bnb_4bit_checkpoint_loads_as_stored(fam):
    """A checkpoint transformers saved with bnb 4-bit weights loads as stored: the file's bytes are our NF4
    leaves, and the logits are transformers' with those weights (decoded) within 1e-3."""
    hf = hf_bnb(fam)
    saved = fam.root / "bnb4"
    hf.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    stored = load_file(saved / "model.safetensors")
    from_file = {name: {k.removeprefix(name + ".weight").removeprefix("."): v for k, v in stored.items()
                        if k.startswith(name + ".weight")} for name in bnb_modules(hf)}
    model, _ = ours(fam, load_in_4bit=True, directory=saved)
    assert model.weights_source == "bnb-4bit" and model.is_4bit
    assert_same_nf4(nf4_leaves(model), from_file)
    expected = hf_decoded_logits(fam, from_file)
    logits = np.asarray(model(fam.ids, attention_mask=fam.mask).logits)
    assert rel_l2(logits[fam.keep], expected[fam.keep]) < 1e-3


# ------------------------------------------------------------------------------------------ PEFT


@pytest.mark.parametrize("targets", ["family_default", "all-linear"])
def test_targets_and_counts_match_peft(fam, targets, capsys):
    """get_peft_model without target_modules targets the family's defaults (Unsloth's seven projections;
    Phi-3's fused ones), as PEFT does when given that list; "all-linear" as PEFT resolves it."""
    base, _ = ours(fam)
    if targets == "family_default":
        model = FastLanguageModel.get_peft_model(base)
        target_modules = list(fam.case.default_targets)
    else:
        model = FastLanguageModel.get_peft_model(base, r=4, target_modules="all-linear")
        target_modules = "all-linear"
    config = LoraConfig(task_type="CAUSAL_LM", **{**PEFT_DEFAULTS, "r": 16 if targets == "family_default" else 4},
                        target_modules=target_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(load_hf(fam.case, fam.dir), config)
    assert model.targeted_module_names == ref.targeted_module_names
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    capsys.readouterr()
    model.print_trainable_parameters()
    line = capsys.readouterr().out
    ref.print_trainable_parameters()
    assert line == capsys.readouterr().out


def test_adapter_loads_in_peft_with_our_logits(fam):
    """Every tensor of our file lands in PEFT's model (no missing or unexpected keys), and PEFT's padded logits
    are ours within 1e-4, while the adapter really moves them."""
    model, adapter_dir, logits = adapted(fam)
    assert {p.name for p in Path(adapter_dir).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    loaded, caught = peft_load(fam, adapter_dir)
    assert not [m for m in caught if "missing" in m.lower() or "unexpected" in m.lower()], caught
    file = load_file(adapter_dir / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = {k: v.detach().float().numpy() for k, v in get_peft_model_state_dict(loaded).items()}
    assert sorted(theirs) == sorted(file)
    for key, value in file.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    assert sorted(n.removeprefix("base_model.model.") for n in loaded.base_model.targeted_module_names) \
        == sorted(model.targeted_module_names)
    expected = torch_logits(loaded, fam.ids, fam.mask)
    assert rel_l2(logits[fam.keep], expected[fam.keep]) < 1e-4
    assert rel_l2(fam.hf_logits[fam.keep], expected[fam.keep]) > 1e-2


def test_lora_gradients_match_peft_autograd(fam):
    """compute_loss on padded rows with an ignored prompt equals PEFT's `.loss` (1e-5), and its gradients
    w.r.t. every LoRA tensor equal torch autograd's (rel_l2 1e-4), none of them zero."""
    model, adapter_dir, _ = adapted(fam)
    ids, mask = fam.ids, fam.mask
    labels = np.where(mask == 1, ids, -100)
    labels[2, :6] = -100  # a prompt that is not trained on
    # Oracle trap: the label after the left padding is predicted from a pad position, whose attention row is all
    # masked. transformers adds the mask's minimum to those scores (the q·k term is absorbed in fp32) and autograd
    # still sends gradient through q·k: torch's gradients then differ from the derivative of the very function
    # it computes. No real loss is predicted from a pad position, so none is here.
    labels[:, 1:][mask[:, :-1] == 0] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unsloth" checkpointing on the CPU: recompute instead of offload
        loss, grads = jax.value_and_grad(lambda lp: model.compute_loss(lp, ids, labels, mask))(model.lora_params)
    ours_grads = {k: np.asarray(v) for k, v in model.peft_state_dict(grads).items()}
    loaded, _ = peft_load(fam, adapter_dir, is_trainable=True)
    out = loaded(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5 * abs(out.loss.item())
    theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in loaded.named_parameters() if p.requires_grad}
    assert sorted(ours_grads) == sorted(theirs)
    for key, value in theirs.items():
        assert np.linalg.norm(value) > 0, key
        assert rel_l2(ours_grads[key], value) < 1e-4, key


# ------------------------------------------------------------------------------------------ generation


NEW = 13


def prompts(case, length: int = 7):
    """Two prompts, the second left-padded by 3; with 7 tokens, 7 + 13 = 20 > WINDOW (and > a longrope
    case's original_max_position_embeddings of 16: generation crosses the short/long switch)."""
    rng = np.random.default_rng(case.seed + length)
    ids = rng.integers(4, 512, size=(2, length)).astype(np.int64)
    ids[1, :3] = 0
    return ids, (ids != 0).astype(np.int64)


def hf_generate(loaded, ids, mask):
    """transformers + PEFT greedy generate (eos and pad from the config, as ours): (sequences, the raw logits of
    each step [batch, new, vocab], min top-2 gap)."""
    with torch.no_grad():
        out = loaded.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                              max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True)
    logits = np.stack([s.float().numpy() for s in out.logits], 1)
    top = np.sort(logits, -1)
    return out.sequences.numpy(), logits, float((top[..., -1] - top[..., -2]).min())


def hf_stepwise_greedy(loaded, ids, mask):
    """Greedy decoding with transformers + PEFT and no cache: each token is the argmax of a full forward of
    the sequence so far (positions as generate makes them: cumsum of the mask - 1). No eos stopping.

    Oracle trap: transformers 5.17's Phi-3 `generate` is not this function once a longrope model crosses
    original_max_position_embeddings: prepare_inputs_for_generation drops the cache to recompute it with the
    long factors, but then feeds only the last token, so the token after the switch is predicted from that one
    token alone. This loop is what generate means there."""
    seq, m = ids.copy(), mask.copy()
    steps = []
    with torch.no_grad():
        for _ in range(NEW):
            pos = np.where(m == 1, np.cumsum(m, -1) - 1, 1)
            logits = loaded(torch.tensor(seq), attention_mask=torch.tensor(m),
                            position_ids=torch.tensor(pos)).logits[:, -1].numpy()
            steps.append(logits)
            seq = np.concatenate([seq, logits.argmax(-1)[:, None]], 1)
            m = np.concatenate([m, np.ones((len(m), 1), m.dtype)], 1)
    logits = np.stack(steps, 1)
    top = np.sort(logits, -1)
    return seq, logits, float((top[..., -1] - top[..., -2]).min())


@pytest.mark.parametrize("fam", GENERATION, indirect=True)
def test_greedy_generation_matches_transformers_peft(fam):
    """Greedy tokens with the adapter equal transformers + PEFT generate; prompt + new tokens are longer than
    the sliding window. A longrope case also generates across its short/long switch, against the
    cache-free oracle (hf_stepwise_greedy), and from a prompt already past the switch, against generate."""
    model, adapter_dir, _ = adapted(fam)
    loaded, _ = peft_load(fam, adapter_dir)
    longrope = "longrope" in fam.case.features
    original = fam.hf.config.rope_parameters.get("original_max_position_embeddings", 0) if longrope else 0
    ids, mask = prompts(fam.case, length=original + 2 if longrope else 7)
    expected, expected_logits, gap = hf_generate(loaded, ids, mask)
    assert expected.shape[1] > WINDOW + 2  # decoding went past the window
    assert gap > 1e-4  # every greedy choice is far from a tie
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict=True)
    np.testing.assert_array_equal(out.sequences, expected)
    eos = fam.hf.config.eos_token_id
    if not np.isin(expected[:, ids.shape[1]:], eos).any():  # no row finished: every step's logits compare
        assert rel_l2(np.asarray(out.logits), expected_logits) < 1e-4
    with loaded.disable_adapter(), torch.no_grad():  # the adapter matters
        plain = loaded.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=NEW)
    assert plain.shape != expected.shape or (plain.numpy() != expected).any()
    if longrope:
        ids, mask = prompts(fam.case)
        assert ids.shape[1] <= original < ids.shape[1] + NEW
        expected, expected_logits, gap = hf_stepwise_greedy(loaded, ids, mask)
        assert gap > 1e-4
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], return_dict=True)
        np.testing.assert_array_equal(out.sequences, expected)
        assert rel_l2(np.asarray(out.logits), expected_logits) < 1e-4


# ------------------------------------------------------------------------------------------ merged export


def test_merged_export_loads_in_transformers_with_our_logits(fam):
    model, _, logits = adapted(fam)
    _, tokenizer = ours(fam)
    merged = fam.root / "merged"
    model.save_pretrained_merged(merged, tokenizer)
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == [fam.case.model_class] and "quantization_config" not in config
    assert (merged / "tokenizer.json").is_file()
    got = torch_logits(load_hf(fam.case, merged), fam.ids, fam.mask)
    assert rel_l2(got[fam.keep], logits[fam.keep]) < 1e-4
