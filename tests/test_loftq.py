"""init_lora_weights="loftq" against PEFT 0.21's own `loftq_init` (bitsandbytes NF4 on the CPU).

PEFT's `loftq_init` hard-codes its compute device to "cuda" (or "xpu"); the reference below is PEFT's
function source with only that line changed to "cpu" (bnb 0.50 quantizes NF4 on the CPU), run on the
same fp32 torch weights.
"""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from fastlora_jax.convert.hf_checkpoint import find_checkpoint_files, iter_tensors
from peft.utils import loftq_utils
from transformers import LlamaConfig

from fastlora_jax import FastLanguageModel, NF4Weight
from fastlora_jax.models import llama
from fastlora_jax.lora import build_lora, get_node, split_module
from fastlora_jax.lora_config import LoraSpec
from fastlora_jax.tiny import write_tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_loftq_init_cpu():
    source = inspect.getsource(loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in source, "PEFT's loftq_init changed: review the CPU reference"
    source = source.replace(line, 'compute_device = "cpu"').replace("@torch.no_grad()\n", "")
    namespace = dict(vars(loftq_utils))
    exec(source, namespace)  # noqa: S102 (PEFT's own function, device line changed)
    return torch.no_grad()(namespace["loftq_init"])


peft_loftq_init = _peft_loftq_init_cpu()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = write_tiny_llama(tmp_path_factory.mktemp("loftq") / "tiny", seed=7, tokenizer=False)
    cfg = llama.Config.from_hf(LlamaConfig.from_pretrained(directory))
    files = find_checkpoint_files(directory)
    originals = dict(iter_tensors(files))
    return directory, cfg, {k: np.asarray(v, np.float32) for k, v in originals.items()}


def _load(directory, load_in_4bit):
    model, _ = FastLanguageModel.from_pretrained(str(directory), dtype="float32", load_in_4bit=load_in_4bit)
    return model.base_params


def _weight(base, name):
    """Base weight of module `name` as float32 numpy (NF4 dequantized)."""
    path, index = split_module(name)
    leaf = get_node(base, path)["weight"]
    if index is not None:
        leaf = jax.tree.map(lambda x: x[index], leaf)
    if isinstance(leaf, NF4Weight):
        leaf = leaf.dequantize(jnp.float32)
    return np.asarray(leaf, np.float32)


def _adapter(lora, name):
    path, index = split_module(name)
    node = get_node(lora, path)
    return np.asarray(node["lora_A"][index]), np.asarray(node["lora_B"][index])


def _plain_nf4(w):
    return np.asarray(NF4Weight.quantize(jnp.asarray(w), blocksize=64, double_quant=False).dequantize(jnp.float32))


@pytest.mark.parametrize("loftq_iter", [1, 2])
def test_loftq_matches_peft_fp32_base(tiny, loftq_iter):
    directory, cfg, originals = tiny
    base = _load(directory, load_in_4bit=False)
    spec = LoraSpec.create(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": loftq_iter}, rank_pattern={"v_proj": 4})
    lora, _, layout, new_base = build_lora(llama, cfg, base, spec, 3407, return_base=True)
    assert new_base is not None and new_base is not base
    names = layout.targeted_module_names
    assert len(names) == 3 * cfg.num_layers
    for name in names:
        w = originals[f"{name}.weight"]
        r = 4 if name.endswith("v_proj") else 8
        q_ref, a_ref, b_ref = peft_loftq_init(torch.from_numpy(w.copy()), num_bits=4, reduced_rank=r,
                                              num_iter=loftq_iter)
        a, b = _adapter(lora, name)
        assert not a[r:].any() and not b[:, r:].any()  # rank padding stays zero
        assert rel_l2(b[:, :r] @ a[:r], (b_ref @ a_ref).numpy()) < 1e-4, name
        q = _weight(new_base, name)
        if loftq_iter == 1:  # quantizes W itself: bit-exact with bnb
            np.testing.assert_array_equal(q, q_ref.numpy(), err_msg=name)
        else:  # the residual comes through an SVD (jnp vs torch): absmax may differ in the last ulp
            np.testing.assert_allclose(q, q_ref.numpy(), rtol=0, atol=1e-6, err_msg=name)
        # the untouched input tree still holds the original weight
        np.testing.assert_array_equal(_weight(base, name), w)
    # untargeted modules keep their weights
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        np.testing.assert_array_equal(_weight(new_base, name), originals[f"{name}.weight"])


def test_loftq_reduces_quantization_error(tiny):
    directory, cfg, originals = tiny
    base = _load(directory, load_in_4bit=False)
    spec = LoraSpec.create(r=16, target_modules=TARGETS, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    lora, _, layout, new_base = build_lora(llama, cfg, base, spec, return_base=True)
    for name in layout.targeted_module_names:
        w = originals[f"{name}.weight"]
        a, b = _adapter(lora, name)
        err_loftq = np.linalg.norm(w - (_weight(new_base, name) + b @ a))
        err_plain = np.linalg.norm(w - _plain_nf4(w))
        assert err_loftq < err_plain, (name, err_loftq, err_plain)


def test_loftq_nf4_base_with_checkpoint_originals(tiny):
    directory, cfg, originals = tiny
    base = _load(directory, load_in_4bit=True)
    leaf = get_node(base, ("model", "layers", "self_attn", "q_proj"))["weight"]
    assert isinstance(leaf, NF4Weight) and leaf.double_quant
    spec = LoraSpec.create(r=8, target_modules=["q_proj"], layers_to_transform=[0], init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4})
    lora, _, _, new_base = build_lora(llama, cfg, base, spec, original_weight=lambda n: originals.get(n),
                                      return_base=True)
    new_leaf = get_node(new_base, ("model", "layers", "self_attn", "q_proj"))["weight"]
    assert isinstance(new_leaf, NF4Weight) and not new_leaf.double_quant
    assert new_leaf.stack_shape == (cfg.num_layers,) and new_leaf.dtype == leaf.dtype
    # layer 0: LoftQ'd, equal to PEFT's on the original weight; layer 1: plain NF4 of its original weight
    w0 = originals["model.layers.0.self_attn.q_proj.weight"]
    q_ref, a_ref, b_ref = peft_loftq_init(torch.from_numpy(w0.copy()), num_bits=4, reduced_rank=8, num_iter=1)
    np.testing.assert_array_equal(_weight(new_base, "model.layers.0.self_attn.q_proj"), q_ref.numpy())
    a, b = _adapter(lora, "model.layers.0.self_attn.q_proj")
    assert rel_l2(b @ a, (b_ref @ a_ref).numpy()) < 1e-4
    w1 = originals["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(_weight(new_base, "model.layers.1.self_attn.q_proj"), _plain_nf4(w1))
    # other projections keep their double-quantized leaves
    assert get_node(new_base, ("model", "layers", "mlp", "up_proj"))["weight"] is \
        get_node(base, ("model", "layers", "mlp", "up_proj"))["weight"]


def test_loftq_nf4_base_without_originals_warns(tiny):
    directory, cfg, _ = tiny
    base = _load(directory, load_in_4bit=True)
    spec = LoraSpec.create(r=8, target_modules=["v_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.warns(UserWarning, match="no original full-precision weight"):
        _, _, _, new_base = build_lora(llama, cfg, base, spec, return_base=True)
    assert not get_node(new_base, ("model", "layers", "self_attn", "v_proj"))["weight"].double_quant


def test_loftq_errors(tiny):
    directory, cfg, _ = tiny
    base = _load(directory, load_in_4bit=False)
    for bits in (2, 8):
        spec = LoraSpec.create(r=8, init_lora_weights="loftq", loftq_config={"loftq_bits": bits})
        with pytest.raises(NotImplementedError, match=f"loftq_bits'\\]={bits}"):
            build_lora(llama, cfg, base, spec, return_base=True)
    spec = LoraSpec.create(r=8, init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match="return_base=True"):
        build_lora(llama, cfg, base, spec)
    # the default init keeps the 3-tuple, and return_base=True gives None as the base
    plain = LoraSpec.create(r=8)
    assert len(build_lora(llama, cfg, base, plain)) == 3
    assert build_lora(llama, cfg, base, plain, return_base=True)[3] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_lora(llama, cfg, base, plain)


def test_loftq_through_get_peft_model_on_a_4bit_base(tmp_path):
    """The user's path: a 4-bit model from a 16-bit checkpoint, get_peft_model(init_lora_weights="loftq"):
    LoftQ reads the original weights, the adapter changes the output from the start toward W, and the
    adapter saves and reloads in PEFT's format."""
    import warnings as _warnings

    import numpy as _np

    from fastlora_jax import FastLanguageModel
    from fastlora_jax.tiny import write_tiny_llama as _write

    model_dir = _write(tmp_path / "m", seed=2, tokenizer=False)
    base, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    full, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=False)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # the originals are found: no "dequantized stand-in" warning
        model = FastLanguageModel.get_peft_model(base, r=8, lora_alpha=8, init_lora_weights="loftq",
                                                 loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    ids = _np.random.default_rng(0).integers(0, 512, (2, 16))
    exact = _np.asarray(full(ids).logits)
    plain_err = _np.linalg.norm(_np.asarray(base(ids).logits) - exact)
    loftq_err = _np.linalg.norm(_np.asarray(model(ids).logits) - exact)
    assert loftq_err < plain_err
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
