"""The hot-path ops with hand-written VJPs against their references: the LoRA linear (kernels/lora_op.py),
its one-pass NF4 dequantization, the fused output-layer cross-entropy, and what the False checkpointing
mode keeps for the backward pass."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from fastlora_jax.convert.load import random_base_params
from fastlora_jax.kernels import KernelOptions, lora_op, reference
from transformers import LlamaConfig

from fastlora_jax import FastLanguageModel
from fastlora_jax.models import llama
from fastlora_jax.model import CausalLM
from fastlora_jax import training
from fastlora_jax.quant import NF4Weight
from fastlora_jax.training import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    fused_head_cross_entropy,
)


@pytest.mark.parametrize("shape", [(96, 128), (40, 192), (33, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
# the table lookup as an indexed load ("auto" outside the memory-lean modes, "table") or a select tree ("auto" in
# them, "select")
@pytest.mark.parametrize("lean, lookup", [(False, "auto"), (True, "auto"), (True, "table"), (False, "select")])
def test_one_pass_dequantize_is_bit_exact(rng, shape, double_quant, dtype, lean, lookup):
    w = NF4Weight.quantize(jnp.asarray(rng.standard_normal(shape) * 0.05, jnp.float32), double_quant=double_quant)
    options = KernelOptions(memory_lean=lean, nf4_lookup=lookup)
    fast = np.asarray(jax.jit(lora_op.dense_base_weight, static_argnums=(1, 2))(w, dtype, options)).view(np.uint8)
    ref = np.asarray(w.dequantize(dtype)).view(np.uint8)
    assert np.array_equal(fast, ref)
    # and the path taken is the one asked for: a gather of the table, or the select tree's bit tests and no gather
    eqns = jax.make_jaxpr(lora_op.dense_base_weight, static_argnums=(1, 2))(w, dtype, options).eqns
    prims = {eqn.primitive.name for eqn in eqns}
    indexed = lookup == "table" or (lookup == "auto" and not lean)
    assert ("ne" in prims) == (not indexed), prims
    table_gathers = [e for e in eqns if e.primitive.name == "gather" and e.invars[0].aval.shape == (16,)]
    assert bool(table_gathers) == indexed


# what each (memory_lean, nf4_lookup) takes: the folded group (gate/up: outputs >= input, q/k/v, o), and a module
# multiplied on its own (down_proj), forward and backward; True = the table's indexed load (a gather)
_LOOKUP_PATHS = {(False, "auto"): (True, True), (True, "auto"): (True, False), (False, "table"): (True, True),
                 (True, "table"): (True, True), (False, "select"): (False, False), (True, "select"): (False, False)}


@pytest.mark.parametrize("lean, lookup", list(_LOOKUP_PATHS))
def test_nf4_lookup_reaches_every_dequantize(rng, lean, lookup):
    """The traced loss-and-grad of a folded bf16 group and of a lone NF4 linear gathers the table exactly where the
    option says (the folded weights kept the indexed load in every mode before the option existed: "auto" does)."""
    folded_gathers, alone_gathers = _LOOKUP_PATHS[(lean, lookup)]
    options = KernelOptions(memory_lean=lean, nf4_lookup=lookup)
    group = [_module(rng, True, False, out=96, inp=64) for _ in range(2)]
    assert lora_op.folds_into_base(64, group, options)
    alone = _module(rng, True, False, out=64, inp=128)
    assert not lora_op.folds_into_base(128, [alone], options)

    from test_host_offload_budget import _equations

    def gathers(fn, *args):  # from the 16-entry NF4 table (the double-quantized scales gather from 256 entries)
        return any(eqn.primitive.name == "gather" and eqn.invars[0].aval.shape == (16,)
                   for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr))

    def bf16_lora(m):  # bf16 compute: the one-pass words path
        return {k: (v.astype(jnp.bfloat16) if k in ("lora_A", "lora_B") else v) for k, v in m.items()}

    x16 = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.bfloat16)
    group16 = [bf16_lora(m) for m in group]
    assert gathers(jax.grad(lambda x: sum(y.astype(jnp.float32).sum() for y in lora_op.lora_linear_group(
        x, group16, options=options))), x16) == folded_gathers
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.bfloat16)
    alone16 = bf16_lora(alone)
    assert gathers(jax.grad(lambda x: lora_op.lora_linear(x, alone16, options=options).astype(jnp.float32).sum()),
                   x) == alone_gathers


@pytest.mark.parametrize("value", ["gather", None, True])
def test_bad_nf4_lookup_raises(value):
    with pytest.raises(ValueError, match=rf"nf4_lookup={value!r} is not one of \('auto', 'table', 'select'\)"):
        KernelOptions(nf4_lookup=value)


def _lean_options(lean) -> KernelOptions:
    """`lean`: False, True, or "tiled" (memory-lean with every NF4 weight dequantized in row tiles of 8 rows
    here: `lora_op.lean_row_tiles` with a 4 KiB limit)."""
    if lean == "tiled":
        return KernelOptions(memory_lean=True, lean_weight_tile_bytes=4096)
    return KernelOptions(memory_lean=lean)


def _module(rng, nf4: bool, bias: bool, out=96, inp=128, r=8):
    w = jnp.asarray(rng.standard_normal((out, inp)) * 0.05, jnp.float32)
    module = {"weight": NF4Weight.quantize(w) if nf4 else w,
              "lora_A": jnp.asarray(rng.standard_normal((r, inp)) * 0.1, jnp.float32),
              "lora_B": jnp.asarray(rng.standard_normal((out, r)) * 0.1, jnp.float32),
              "scaling": jnp.float32(rng.uniform(0.5, 2.0))}
    if bias:
        module["bias"] = jnp.asarray(rng.standard_normal(out), jnp.float32)
    return module


@pytest.mark.parametrize("nf4", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lean", [False, True, "tiled"])  # NF4 + no dropout: dx in one gemm (_dx_with_lora)
def test_lora_linear_value_and_gradients_match_reference(rng, nf4, dropout, bias, lean):
    module = _module(rng, nf4, bias)
    options = _lean_options(lean)
    x = jnp.asarray(rng.standard_normal((2, 7, 128)), jnp.float32)
    key = jax.random.PRNGKey(int(rng.integers(1 << 30))) if dropout else None
    probe = jnp.asarray(rng.standard_normal((2, 7, 96)), jnp.float32)

    def loss(op, x, a, b, bias_o):
        m = dict(module, lora_A=a, lora_B=b, **({"bias": bias_o} if bias else {}))
        return jnp.sum(jnp.tanh(op(x, m, key, dropout)) * probe)

    args = (x, module["lora_A"], module["lora_B"], module.get("bias", jnp.zeros(96)))
    op = partial(lora_op.lora_linear, options=options)
    got = jax.value_and_grad(lambda *a: loss(op, *a), argnums=(0, 1, 2, 3))(*args)
    want = jax.value_and_grad(lambda *a: loss(reference.lora_linear, *a), argnums=(0, 1, 2, 3))(*args)
    # The outputs in a norm, the probe-weighted sum (which cancels) against the sum of its terms' magnitudes.
    assert rel_l2(lora_op.lora_linear(x, module, key, dropout), reference.lora_linear(x, module, key, dropout)) < 1e-5
    assert abs(got[0] - want[0]) <= 1e-5 * float(jnp.sum(jnp.abs(jnp.tanh(reference.lora_linear(x, module, key, dropout)) * probe)))
    for g, w in zip(got[1][:3 + bias], want[1][:3 + bias]):
        assert rel_l2(g, w) < 1e-5


@pytest.mark.parametrize("lean", [False, True])
def test_unfolded_nf4_backward_computes_dx_in_one_gemm(rng, lean):
    """A down_proj-like NF4 linear (out < in: not folded into its base matmul) computes the backward's dx as ONE
    gemm over `[g | gb]` and `[[deq(W)]; [A]]` (contraction out + r) in every mode; with lora_fold=False,
    `g @ deq(W)` and `gb @ A` apart."""
    from test_host_offload_budget import _equations

    module = _module(rng, True, False, out=96, inp=128, r=8)
    module = {k: (v.astype(jnp.bfloat16) if k in ("lora_A", "lora_B") else v) for k, v in module.items()}
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.bfloat16)
    for fold in (True, False):
        options = KernelOptions(memory_lean=lean, lora_fold=fold)
        jaxpr = jax.make_jaxpr(jax.grad(
            lambda x: lora_op.lora_linear(x, module, options=options).astype(jnp.float32).sum()))(x).jaxpr
        contractions = [eqn.invars[0].aval.shape[eqn.params["dimension_numbers"][0][0][0]]
                        for eqn in _equations(jaxpr) if eqn.primitive.name == "dot_general"]
        assert (96 + 8 in contractions) == fold, contractions
        assert lora_op._folds_lora_into_dx(module["weight"], x, options) == fold


@pytest.mark.parametrize("lean", [False, True, "tiled"])
def test_lora_linear_bf16_close_to_fp32_reference(rng, lean):
    """bf16 values and gradients (x, A, B) against the fp32 reference; the backward's dx is one gemm over `[g | gb]`
    and `[[deq(W)]; [A]]` (out < in: not folded into the base matmul), written as packed 32-bit words in every mode
    ("tiled": per row tile of W)."""
    module = _module(rng, True, False, out=128, inp=256, r=16)
    options = _lean_options(lean)
    x = jnp.asarray(rng.standard_normal((4, 64, 256)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((4, 64, 128)), jnp.float32)

    def loss(op, dtype, x, a, b):
        m = dict(module, lora_A=a.astype(dtype), lora_B=b.astype(dtype))
        return jnp.sum(op(x.astype(dtype), m).astype(jnp.float32) * probe)

    args = (x, module["lora_A"], module["lora_B"])
    got = jax.grad(lambda *a: loss(partial(lora_op.lora_linear, options=options), jnp.bfloat16, *a), (0, 1, 2))(*args)
    want = jax.grad(lambda *a: loss(reference.lora_linear, jnp.float32, *a), (0, 1, 2))(*args)
    m16 = dict(module, lora_A=module["lora_A"].astype(jnp.bfloat16), lora_B=module["lora_B"].astype(jnp.bfloat16))
    y = lora_op.lora_linear(x.astype(jnp.bfloat16), m16, options=options)
    assert rel_l2(y.astype(jnp.float32), reference.lora_linear(x, module)) < 1e-2
    for g, w in zip(got, want):
        assert rel_l2(g.astype(jnp.float32), w) < 2e-2


@pytest.mark.parametrize("chunk", [5, 16, 64])
@pytest.mark.parametrize("vocab_tiles", [1, 2, 5])  # the online softmax over vocabulary tiles
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fused_cross_entropy_matches_checkpointed_chunks(rng, chunk, vocab_tiles, softcap):
    n, d, vocab = 37, 24, 50
    h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((vocab, d)) * 0.3, jnp.float32)
    t = rng.integers(0, vocab, n)
    t[rng.random(n) < 0.3] = IGNORE_INDEX
    t = jnp.asarray(t, jnp.int32)

    def logits_fn(x):  # the oracle: plain logits (capped as HF caps them), autodiff for the gradient
        z = x @ w.T
        return z if softcap is None else softcap * jnp.tanh(z / softcap)

    fused = jax.value_and_grad(lambda h: fused_head_cross_entropy(h, w, t, chunk, softcap, vocab_tiles)[0])(h)
    plain = jax.value_and_grad(lambda h: chunked_cross_entropy(h, t, logits_fn, chunk)[0])(h)
    assert rel_l2(fused[0], plain[0]) < 1e-6
    assert rel_l2(fused[1], plain[1]) < 1e-5
    assert int(fused_head_cross_entropy(h, w, t, chunk, softcap, vocab_tiles)[1]) == int(jnp.sum(t != IGNORE_INDEX))


def test_fused_cross_entropy_bf16_tiles_close_to_fp32(rng):
    """bf16 hidden states and head, vocabulary in 8 tiles: loss and dh within bf16's 2e-2 of the fp32 math."""
    n, d, vocab = 96, 64, 1024
    h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((vocab, d)) * 0.2, jnp.float32)
    t = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    got = jax.value_and_grad(lambda h: fused_head_cross_entropy(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), t,
                                                                32, None, 8)[0])(h)
    want = jax.value_and_grad(lambda h: chunked_cross_entropy(h, t, lambda x: x @ w.T, 32)[0])(h)
    assert rel_l2(got[0], want[0]) < 2e-2
    assert rel_l2(got[1].astype(jnp.float32), want[1]) < 2e-2


def test_head_vocab_tiles_rule():
    """Memory-lean: the tiles divide the vocabulary, each tile's head rows are at most 128 MiB in bf16, and
    there are as few tiles as that allows; tiles under 256 rows are refused (one tile); other modes: one."""
    for vocab, hidden in [(151936, 4096), (100352, 5120), (128256, 4096), (262144, 1152), (256000, 3584),
                          (152064, 3584), (512, 64)]:
        tiles = training.head_vocab_tiles(vocab, hidden, True)
        rows = vocab // tiles
        assert vocab % tiles == 0 and rows * hidden * 2 <= 2 ** 27
        assert not any(vocab % k == 0 and (vocab // k) * hidden * 2 <= 2 ** 27 for k in range(1, tiles))
        assert training.head_vocab_tiles(vocab, hidden, False) == 1
    assert training.head_vocab_tiles(1031, 2 ** 20, True) == 1  # a prime vocabulary: 1-row tiles are refused
    with pytest.raises(ValueError, match="vocab_tiles"):
        fused_head_cross_entropy(jnp.ones((4, 8)), jnp.ones((10, 8)), jnp.zeros(4, jnp.int32), 4, None, 3)


def test_false_mode_keeps_no_dequantized_weight():
    """use_gradient_checkpointing=False: the backward pass keeps activations, never [out, in] weights."""
    hf = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    hf.architectures = ["LlamaForCausalLM"]
    cfg = llama.Config.from_hf(hf)
    base = random_base_params(llama, cfg, jnp.bfloat16, True)
    model = CausalLM(hf, llama, cfg, base, jnp.bfloat16, name_or_path="probe", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    loss = model.loss_sum_fn()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 32)), jnp.int32)
    fn = jax.linearize(lambda lora: loss(model.base_params, lora, ids, ids, None, None)[0], model.lora_params)[1]
    residual_shapes = [tuple(c.shape) for c in jax.tree.leaves(fn) if hasattr(c, "shape")]
    weight_shapes = {(192, 64), (64, 192), (64, 64), (32, 64)}
    weight_shapes |= {(2,) + s for s in weight_shapes}
    assert not weight_shapes & set(residual_shapes), residual_shapes
    assert (2, 1, 32, 192) in residual_shapes  # the gate/up outputs are kept, stacked over the 2 layers


@pytest.mark.parametrize("nf4", [True, False])
@pytest.mark.parametrize("lean", [False, True, "tiled"])  # NF4: folded (one gemm per group, or per module when lean)
def test_grouped_lora_linears_match_separate_ones(rng, nf4, lean):
    """q/k/v-style modules sharing x, different output sizes and ranks, one with a bias."""
    options = _lean_options(lean)
    mods = [_module(rng, nf4, bias=False, out=96, r=8), _module(rng, nf4, bias=True, out=32, r=4),
            _module(rng, nf4, bias=False, out=64, r=8)]
    x = jnp.asarray(rng.standard_normal((2, 9, 128)), jnp.float32)
    probes = [jnp.asarray(rng.standard_normal((2, 9, m["lora_B"].shape[0])), jnp.float32) for m in mods]

    def loss(grouped, x, lora):
        ms = [dict(m, lora_A=a, lora_B=b) for m, (a, b) in zip(mods, lora)]
        ys = lora_op.lora_linear_group(x, ms, options=options) if grouped else [reference.lora_linear(x, m) for m in ms]
        return sum(jnp.sum(jnp.tanh(y) * p) for y, p in zip(ys, probes))

    lora = [(m["lora_A"], m["lora_B"]) for m in mods]
    got = jax.value_and_grad(lambda x, lora: loss(True, x, lora), argnums=(0, 1))(x, lora)
    want = jax.value_and_grad(lambda x, lora: loss(False, x, lora), argnums=(0, 1))(x, lora)
    magnitude = sum(float(jnp.sum(jnp.abs(jnp.tanh(reference.lora_linear(x, m)) * p))) for m, p in zip(mods, probes))
    assert abs(got[0] - want[0]) <= 1e-5 * magnitude  # a sum that cancels: bounded by its terms
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel_l2(g, w) < 1e-5


@pytest.mark.parametrize("outs_ranks", [[(160, 8)], [(96, 8), (32, 4), (64, 16)], [(192, 16), (192, 16)]])
@pytest.mark.parametrize("lean", [False, True, "tiled"])  # one folded gemm per group, per module, per row tile
def test_lora_folded_into_nf4_matmul_matches_reference(rng, outs_ranks, lean):
    """NF4 linears whose outputs are at least as wide as the input run with B folded into the base matmul's
    extra contraction columns (lora_op._folded_core): values and all gradients as PEFT's math, in fp32."""
    mods = [_module(rng, True, bias=i == 0, out=out, r=r) for i, (out, r) in enumerate(outs_ranks)]
    assert lora_op.folds_into_base(128, mods)
    x = jnp.asarray(rng.standard_normal((2, 9, 128)), jnp.float32)
    probes = [jnp.asarray(rng.standard_normal((2, 9, out)), jnp.float32) for out, _ in outs_ranks]

    def loss(op, x, lora):
        ms = [dict(m, lora_A=a, lora_B=b) for m, (a, b) in zip(mods, lora)]
        return sum(jnp.sum(jnp.tanh(y) * p) for y, p in zip(op(x, ms), probes))

    options = _lean_options(lean)

    def folded(x, ms):
        if len(ms) > 1:
            return lora_op.lora_linear_group(x, ms, options=options)
        return [lora_op.lora_linear(x, ms[0], options=options)]

    def ref(x, ms):
        return [reference.lora_linear(x, m) for m in ms]

    lora = [(m["lora_A"], m["lora_B"]) for m in mods]
    got = jax.value_and_grad(lambda x, lora: loss(folded, x, lora), argnums=(0, 1))(x, lora)
    want = jax.value_and_grad(lambda x, lora: loss(ref, x, lora), argnums=(0, 1))(x, lora)
    magnitude = sum(float(jnp.sum(jnp.abs(jnp.tanh(y) * p))) for y, p in zip(ref(x, mods), probes))
    assert abs(got[0] - want[0]) <= 1e-4 * magnitude  # fp32; the folded gemm sums in another order
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel_l2(g, w) < 1e-4


# (5, 3, 8): odd ranks, an even total (no pad); (5, 4, 8): an odd total, so the folded width gets a zero column
# (the 32-bit words); lean: the memory-lean modes fold per module, each with its own padded weight
@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("ranks", [(16, 16, 16), (5, 3, 8), (5, 4, 8)])
def test_lora_folded_bf16_close_to_fp32_reference(rng, ranks, lean):
    options = _lean_options(lean)
    mods = [_module(rng, True, False, out=out, inp=256, r=r) for out, r in zip((256, 64, 64), ranks)]
    x = jnp.asarray(rng.standard_normal((4, 64, 256)), jnp.float32)
    probes = [jnp.asarray(rng.standard_normal((4, 64, m["lora_B"].shape[0])), jnp.float32) for m in mods]

    def loss(op, dtype, x, lora):
        ms = [dict(m, lora_A=a.astype(dtype), lora_B=b.astype(dtype)) for m, (a, b) in zip(mods, lora)]
        return sum(jnp.sum(y.astype(jnp.float32) * p) for y, p in zip(op(x.astype(dtype), ms), probes))

    lora = [(m["lora_A"], m["lora_B"]) for m in mods]
    group = partial(lora_op.lora_linear_group, options=options)
    got = jax.value_and_grad(lambda x, l: loss(group, jnp.bfloat16, x, l), argnums=(0, 1))(x, lora)
    want = jax.value_and_grad(lambda x, l: loss(lambda x, ms: [reference.lora_linear(x, m) for m in ms],
                                                jnp.float32, x, l), argnums=(0, 1))(x, lora)
    assert lora_op.folds_into_base(256, mods, options)
    ms16 = [dict(m, lora_A=m["lora_A"].astype(jnp.bfloat16), lora_B=m["lora_B"].astype(jnp.bfloat16)) for m in mods]
    for y, m in zip(lora_op.lora_linear_group(x.astype(jnp.bfloat16), ms16, options=options), mods):
        assert rel_l2(y.astype(jnp.float32), reference.lora_linear(x, m)) < 1e-2
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel_l2(g.astype(jnp.float32), w) < 2e-2


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_rows_equal_the_dequantized_rows(rng, double_quant):
    w = NF4Weight.quantize(jnp.asarray(rng.standard_normal((48, 192)) * 0.05, jnp.float32), double_quant=double_quant)
    whole = np.asarray(w.dequantize(jnp.bfloat16)).view(np.uint16)
    for a, b in [(0, 8), (8, 40), (40, 48)]:
        assert np.array_equal(np.asarray(w.rows(a, b).dequantize(jnp.bfloat16)).view(np.uint16), whole[a:b])
    with pytest.raises(ValueError, match="outside the weight's 48 rows"):
        w.rows(40, 56)


def test_lean_row_tiles_rule():
    """Tiles only in the memory-lean modes and only for weights above the limit: Phi-4's fused gate_up
    (35840 x 5120, 350 MiB in bf16) in 4 tiles of 87.5 MiB; Llama-8B's gate (14336 x 4096, 112 MiB) whole."""
    def nf4(shape):  # the metadata is all the rule reads
        return NF4Weight(jnp.zeros((shape[0] * shape[1] // 2, 1), jnp.uint8), jnp.ones(shape[0] * shape[1] // 64),
                         jnp.zeros(16), shape=shape, dtype="bfloat16")
    lean = KernelOptions(memory_lean=True)
    tiles = lora_op.lean_row_tiles(nf4((35840, 5120)), jnp.bfloat16, lean)
    assert tiles == tuple((i * 8960, (i + 1) * 8960) for i in range(4))
    assert lora_op.lean_row_tiles(nf4((14336, 4096)), jnp.bfloat16, lean) is None
    assert lora_op.lean_row_tiles(nf4((35840, 5120)), jnp.bfloat16, KernelOptions()) is None
    assert lora_op.lean_row_tiles(jnp.zeros((64, 64)), jnp.bfloat16, KernelOptions(memory_lean=True,
                                                                               lean_weight_tile_bytes=16)) is None
    assert lora_op.lean_row_tiles(nf4((104, 128)), jnp.float32,  # no equal tiles of 8k rows: a shorter last one
                                  KernelOptions(memory_lean=True, lean_weight_tile_bytes=20000)) == ((0, 40), (40, 80), (80, 104))
    for bad in (0, True):
        with pytest.raises(ValueError, match=f"lean_weight_tile_bytes={bad}"):
            KernelOptions(lean_weight_tile_bytes=bad)


def test_lean_row_tiles_are_dequantized_one_at_a_time(rng):
    """XLA's buffer plan (memory_analysis of the CPU compile) for an NF4 weight [4096, 1024] in 8 row tiles of
    1 MiB against the whole 8 MiB weight: the tiles only lower the temporaries if each is dequantized after the
    previous tile's gemm (`lora_op._tile_outputs` / `_tile_sum`). Left to itself XLA dequantized all tiles first:
    the forward kept 0.53 of the whole weight's temporaries, dx 0.69, the folded LoRA backward 0.75; chained
    they are 0.20, 0.36 and 0.53."""
    w = NF4Weight.quantize(jnp.asarray(rng.standard_normal((4096, 1024)) * 0.05, jnp.float32))
    module = {"weight": w, "lora_A": jnp.asarray(rng.standard_normal((16, 1024)) * 0.1, jnp.float32),
              "lora_B": jnp.asarray(rng.standard_normal((4096, 16)) * 0.1, jnp.float32), "scaling": jnp.float32(1)}
    x = jnp.asarray(rng.standard_normal((1, 256, 1024)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((256, 4096)), jnp.bfloat16)
    tiled, whole = (KernelOptions(memory_lean=True, lean_weight_tile_bytes=mib << 20) for mib in (1, 64))
    assert len(lora_op.lean_row_tiles(w, jnp.bfloat16, tiled)) == 8 and lora_op.folds_into_base(1024, [module], tiled)

    def lora_grads(options):
        def loss(x, a, b):
            return jnp.sum(lora_op.lora_linear(x, dict(module, lora_A=a, lora_B=b), options=options).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2)), (x, module["lora_A"], module["lora_B"])

    cases = {"forward": (lambda o: (lambda x: lora_op.base_matmul(x, w, o)), (x[0],), 0.4),
             "dx": (lambda o: (lambda g: lora_op.base_matmul_t(g, w, o)), (g,), 0.5),
             "folded LoRA backward": (lambda o: lora_grads(o)[0], lora_grads(whole)[1], 0.65)}
    for name, (make, args, bound) in cases.items():
        temp = [jax.jit(make(o)).lower(*args).compile().memory_analysis().temp_size_in_bytes for o in (tiled, whole)]
        assert temp[0] <= bound * temp[1], (name, temp)


@pytest.mark.parametrize("out", [104, 136])  # unfolded (dx as one gemm per tile) / folded into the base matmul
def test_ragged_row_tiles_match_reference(rng, out):
    """Tiles with a shorter last one (3 tiles of 40/48 rows): values and gradients as PEFT's math, fp32."""
    module = _module(rng, True, False, out=out)
    options = KernelOptions(memory_lean=True, lean_weight_tile_bytes=20000 if out == 104 else 30000)
    tiles = lora_op.lean_row_tiles(module["weight"], jnp.float32, options)
    assert len(tiles) == 3 and tiles[-1][1] - tiles[-1][0] < tiles[0][1] - tiles[0][0]
    x = jnp.asarray(rng.standard_normal((2, 7, 128)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((2, 7, out)), jnp.float32)

    def loss(op, x, a, b):
        return jnp.sum(jnp.tanh(op(x, dict(module, lora_A=a, lora_B=b))) * probe)

    args = (x, module["lora_A"], module["lora_B"])
    got = jax.value_and_grad(lambda *a: loss(partial(lora_op.lora_linear, options=options), *a), (0, 1, 2))(*args)
    want = jax.value_and_grad(lambda *a: loss(reference.lora_linear, *a), (0, 1, 2))(*args)
    magnitude = float(jnp.sum(jnp.abs(jnp.tanh(reference.lora_linear(x, module)) * probe)))
    assert abs(got[0] - want[0]) <= 1e-5 * magnitude
    for g, w in zip(got[1], want[1]):
        assert rel_l2(g, w) < 1e-5


def test_lora_fold_rule():
    """Folding needs an NF4 base (a 16-bit one would be copied), outputs at least as wide as the input, and
    `lora_fold`; the memory-lean modes fold too (per module)."""
    rng = np.random.default_rng(1)
    assert lora_op.folds_into_base(128, [_module(rng, True, False, out=160)], KernelOptions(memory_lean=True))
    assert not lora_op.folds_into_base(128, [_module(rng, True, False, out=160)], KernelOptions(lora_fold=False))
    assert not lora_op.folds_into_base(128, [_module(rng, True, False, out=96)])  # down_proj-like
    assert not lora_op.folds_into_base(128, [_module(rng, False, False, out=160)])  # 16-bit base
    assert lora_op.folds_into_base(128, [_module(rng, True, False, out=96), _module(rng, True, False, out=32)])
