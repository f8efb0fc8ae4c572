"""The sequence-tiled MLP (KernelOptions.mlp_tile_tokens, decoder.tiled_mlp_block; issue 15 item 2).

The oracle is the untiled decoder (itself tested against transformers in test_families.py): per token the MLP
is the same math, so tiled and untiled must agree on the loss and every LoRA gradient in fp32, in every
checkpointing mode, for a tile count >= 3 and for tiles that need padding. Plus what tiling is for: the
[tokens, intermediate] activations are no longer kept (False mode's residuals) nor alive all at once (the
compiled step's temporaries in the recomputing modes).
"""

import copy
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from family_cases import CASES, PHI3_TARGETS, SEVEN
from fastlora_jax.convert.load import random_base_params
from fastlora_jax.kernels import KernelOptions
from fastlora_jax.model import CausalLM
from fastlora_jax.models import decoder
from fastlora_jax.models.registry import family_for
from transformers import LlamaConfig

from fastlora_jax import FastLanguageModel

# Llama (separate gate/up, silu), Phi-3 (fused gate_up), Gemma 2 (sandwich norms, gelu-tanh, (1 + w) norms)
TILED_CASES = {"llama_control": SEVEN, "phi3": PHI3_TARGETS, "gemma2": SEVEN}
_MODELS: dict = {}


def _randomized(tree, rng, around_one: bool):
    """Every leaf redrawn (norm weights around their identity, 1 + 0.1 N or 0.1 N for (1 + w) norms)."""
    def draw(x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray((1.0 if around_one else 0.0) + 0.1 * noise, x.dtype)
    return jax.tree.map(draw, tree)


def _peft_model(name: str, hf=None):
    """The case's tiny model: NF4 base (random, norms randomized), fp32 compute, LoRA r=8 on its default modules
    with A and B random (PEFT's B=0 would zero every gradient of A), dropout 0. Built once per case."""
    if name in _MODELS:
        return _MODELS[name]
    case = CASES.get(name)
    hf = hf or case.hf_config()
    rng = np.random.default_rng(case.seed if case else 7)
    family = family_for(hf)
    cfg = family.config(hf)
    base = random_base_params(family, cfg, jnp.float32, True, seed=int(rng.integers(1 << 30)))
    layers = base["model"]["layers"]
    for norm in [k for k in layers if k.endswith("layernorm")]:
        layers[norm]["weight"] = _randomized(layers[norm]["weight"], rng, cfg.norm_offset == 0.0)
    model = CausalLM(hf, family, cfg, base, jnp.float32, name_or_path=name, max_seq_length=128)
    targets = list(TILED_CASES.get(name, SEVEN))
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=targets,
                                             use_gradient_checkpointing=True)
    model.lora_params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, x.dtype),
                                     model.lora_params)
    _MODELS[name] = model
    return model


def _batch(rng, vocab: int, batch: int, seq: int):
    ids = jnp.asarray(rng.integers(4, vocab, (batch, seq)), jnp.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[0, :3] = 0  # a left-padded row
    labels = np.where(mask == 1, np.asarray(ids), -100)
    return ids, jnp.asarray(labels, jnp.int32), jnp.asarray(mask)


def _loss_and_grads(model, mode, tile: int, ids, labels, mask):
    model.use_gradient_checkpointing = mode
    model.kernel_options = replace(model.kernel_options, mlp_tile_tokens=tile)
    loss = model.loss_sum_fn()
    fn = jax.jit(jax.value_and_grad(lambda lora: loss(model.base_params, lora, ids, labels, mask, None)[0]))
    return fn(model.lora_params)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:use_gradient_checkpointing='unsloth'")
@pytest.mark.parametrize("name, mode", [(name, mode) for name in TILED_CASES for mode in (True, False)] +
                         [("llama_control", "unsloth")])  # on the CPU "unsloth" recomputes as True does
def test_tiled_mlp_loss_and_lora_grads_equal_untiled(rng, name, mode):
    """batch 2 x 23 tokens: tiles of 16 tokens (3 tiles of 8 positions, one padded) and of 10 tokens (5 tiles
    of 5 positions, two padded) against the whole sequence, loss and every LoRA gradient within fp32."""
    model = _peft_model(name)
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 2, 23)
    assert decoder.mlp_tiles(2, 23, 16) == (3, 8) and decoder.mlp_tiles(2, 23, 10) == (5, 5)
    loss0, grads0 = _loss_and_grads(model, mode, 0, ids, labels, mask)
    mlp_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads0) if "mlp" in jax.tree_util.keystr(path)]
    assert mlp_grads and all(float(jnp.max(jnp.abs(g))) > 0 for g in mlp_grads)
    for tile in (16, 10):
        loss, grads = _loss_and_grads(model, mode, tile, ids, labels, mask)
        assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0)), (tile, loss, loss0)
        for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
            assert rel_l2(g, g0) < 1e-5, (tile, jax.tree_util.keystr(path), rel_l2(g, g0))


@pytest.mark.slow
def test_tiled_mlp_dividing_tiles_and_forward(rng):
    """Tiles that divide the sequence (1 x 24 in 4 tiles of 6) and the uncached forward's logits; tiles at least
    as large as the tokens leave the program untiled."""
    model = _peft_model("llama_control")
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 1, 24)
    assert decoder.mlp_tiles(1, 24, 6) == (4, 6)
    loss0, grads0 = _loss_and_grads(model, True, 0, ids, labels, mask)
    loss, grads = _loss_and_grads(model, True, 6, ids, labels, mask)
    assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        assert rel_l2(g, g0) < 1e-5
    model.kernel_options = KernelOptions()
    logits0 = model(np.asarray(ids)).logits
    model.kernel_options = KernelOptions(mlp_tile_tokens=6)
    assert rel_l2(model(np.asarray(ids)).logits, logits0) < 1e-5
    model.kernel_options = KernelOptions()


@pytest.mark.parametrize("value", [-1, 2.5, "8192", True])
def test_bad_mlp_tile_tokens_raises(value):
    with pytest.raises(ValueError, match=f"mlp_tile_tokens={value!r}.*0 \\(no tiling\\) or a positive int"):
        KernelOptions(mlp_tile_tokens=value)
    assert hash(KernelOptions(mlp_tile_tokens=8192)) == hash(KernelOptions(mlp_tile_tokens=8192))


def test_lora_dropout_tiled_is_finite_and_differs_per_tile(rng):
    """With LoRA dropout the tiles draw their own masks (the key folded with the tile index): a step still
    runs and gives a loss close to the untiled one's (same rate), but not the same masks."""
    model = _peft_model("llama_control")
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 1, 24)
    dropout = copy.copy(model)
    dropout.lora_layout = replace(model.lora_layout, spec=replace(model.lora_layout.spec, lora_dropout=0.25))
    key = jax.random.key(int(rng.integers(1 << 30)))
    dropout.use_gradient_checkpointing = True
    out = []
    for tile in (0, 6):
        dropout.kernel_options = KernelOptions(mlp_tile_tokens=tile)
        loss = dropout.loss_sum_fn()
        out.append(jax.jit(lambda lora: loss(dropout.base_params, lora, ids, labels, mask, key)[0])(dropout.lora_params))
    assert np.isfinite(float(out[1])) and float(out[1]) != float(out[0])


LONG = dict(vocab_size=256, hidden_size=64, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


def _long_model():
    hf = LlamaConfig(**LONG)
    hf.architectures = ["LlamaForCausalLM"]
    _MODELS.pop("long", None)
    return _peft_model("long", hf)


def test_tiled_mlp_keeps_no_intermediate_residuals_in_false_mode(rng):
    """use_gradient_checkpointing=False keeps gate/up ([tokens, intermediate]) untiled; tiled it keeps none
    (a tiled MLP is recomputed per tile), only arrays without the intermediate dimension."""
    model = _long_model()
    ids = jnp.asarray(rng.integers(4, 256, (1, 256)), jnp.int32)
    model.use_gradient_checkpointing = False
    shapes = {}
    for tile in (0, 64):
        model.kernel_options = KernelOptions(mlp_tile_tokens=tile)
        loss = model.loss_sum_fn()
        fn = jax.linearize(lambda lora: loss(model.base_params, lora, ids, ids, None, None)[0], model.lora_params)[1]
        shapes[tile] = [tuple(c.shape) for c in jax.tree.leaves(fn) if hasattr(c, "shape")]
    inter = LONG["intermediate_size"]
    assert (1, 1, 256, inter) in shapes[0]  # gate and up, stacked over the one layer
    assert not [s for s in shapes[64] if inter in s and int(np.prod(s)) >= 64 * inter], shapes[64]


@pytest.mark.slow
def test_tiled_mlp_lowers_the_compiled_working_set(rng):
    """XLA's buffer assignment for the whole gradient program (CPU), 1 x 1024 tokens, intermediate 4096: with the
    MLP in 8 tiles of 128 tokens the temporaries of the recomputing modes are smaller than untiled by more than
    one [1024, 4096] fp32 intermediate (16 MiB): untiled, the layer's backward holds several at once (measured:
    84 MiB untiled, 42 MiB tiled, the rest of the step's temporaries). Attention is the blockwise reference
    ("flash" on the CPU) so that no [heads, seq, seq] score matrix sets the peak instead. Mode True ("unsloth"
    is True on the CPU, which has no pinned host memory)."""
    model = _long_model()
    ids = jnp.asarray(rng.integers(4, 256, (1, 1024)), jnp.int32)
    model.use_gradient_checkpointing = True
    temp = {}
    for tile in (0, 128):
        model.kernel_options = KernelOptions(mlp_tile_tokens=tile, attention="flash")
        loss = model.loss_sum_fn()
        fn = jax.jit(jax.grad(lambda lora: loss(model.base_params, lora, ids, ids, None, None)[0]))
        temp[tile] = fn.lower(model.lora_params).compile().memory_analysis().temp_size_in_bytes
    one_intermediate = 1024 * LONG["intermediate_size"] * 4
    assert temp[128] < temp[0] - one_intermediate, temp


def test_from_pretrained_takes_kernel_options(tmp_path):
    """Users set the tiles at load time; the loss programs then run tiled (memory_lean added by the mode)."""
    from fastlora_jax.tiny import write_tiny_llama
    directory = write_tiny_llama(tmp_path / "tiny", tokenizer=False)
    options = KernelOptions(mlp_tile_tokens=8192)
    model, _ = FastLanguageModel.from_pretrained(str(directory), load_in_4bit=True, kernel_options=options)
    assert model.kernel_options == options
    assert FastLanguageModel.from_pretrained(str(directory))[0].kernel_options == KernelOptions()
    with pytest.raises(TypeError, match="kernel_options must be a fastlora_jax.kernels.KernelOptions or None; got dict"):
        FastLanguageModel.from_pretrained(str(directory), kernel_options={"mlp_tile_tokens": 8192})
