"""`KernelOptions.false_mode_saves`: what use_gradient_checkpointing=False keeps beyond the matmul outputs.

Keeping a value instead of recomputing it must not change the step: the oracle is the same model with nothing
extra kept (itself tested against transformers and PEFT in test_families.py), so the loss and every LoRA gradient
agree within fp32 rounding. And the options must do what they say: the linearized step's residuals gain the
`x @ Aᵀ` columns ("lora_xa") and two hidden-sized arrays per layer ("normed_inputs").
"""

import copy
from dataclasses import replace

import jax
import jax.numpy as jnp
import pytest
from conftest import rel_l2
from test_tiled_mlp import _batch, _peft_model

from fastlora_jax.kernels import KernelOptions


def _loss_and_grads(model, options, ids, labels, mask):
    model.use_gradient_checkpointing = False
    model.kernel_options = options
    loss = model.loss_sum_fn()
    return jax.jit(jax.value_and_grad(lambda lora: loss(model.base_params, lora, ids, labels, mask, None)[0]))(
        model.lora_params)


@pytest.mark.parametrize("name", ["llama_control", "gemma2"])
def test_saved_values_give_the_recomputed_gradients(rng, name):
    """batch 2 x 19 (one row left-padded); Gemma 2 has sandwich norms (its pre-feedforward norm is the one kept)."""
    model = copy.copy(_peft_model(name))  # a copy: the options set here must not reach other tests' cached model
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 2, 19)
    loss0, grads0 = _loss_and_grads(model, replace(model.kernel_options, false_mode_saves=()), ids, labels, mask)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads0))
    for saves in (("lora_xa",), ("lora_xa", "normed_inputs"), ("normed_inputs",)):
        loss, grads = _loss_and_grads(model, replace(model.kernel_options, false_mode_saves=saves), ids, labels, mask)
        assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0)), (saves, loss, loss0)
        for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
            assert rel_l2(g, g0) < 1e-5, (saves, jax.tree_util.keystr(path), rel_l2(g, g0))


def _residual_shapes(model, saves, ids):
    model.use_gradient_checkpointing = False
    model.kernel_options = replace(model.kernel_options, false_mode_saves=saves, unroll_layers=False)
    loss = model.loss_sum_fn()
    fn = jax.linearize(lambda lora: loss(model.base_params, lora, ids, ids, None, None)[0], model.lora_params)[1]
    return [tuple(c.shape) for c in jax.tree.leaves(fn) if hasattr(c, "shape")]


def test_each_option_keeps_its_values(rng):
    """Scanned Llama, r=8 on all seven projections, one group per input (q/k/v: 24 rank columns, gate/up 16,
    o and down 8): kept, the `x @ Aᵀ` are `[layers, tokens, ranks]` stacks; the normed inputs two
    `[layers, batch, seq, hidden]` stacks more than the layer input and the residual after attention."""
    model = copy.copy(_peft_model("llama_control"))
    ids = jnp.asarray(rng.integers(4, model.cfg.vocab_size, (2, 16)), jnp.int32)
    layers, hidden = model.cfg.num_layers, model.cfg.hidden_size
    none = _residual_shapes(model, (), ids)
    xa = _residual_shapes(model, ("lora_xa",), ids)
    normed = _residual_shapes(model, ("normed_inputs",), ids)
    rank_stacks = {(layers, 2 * 16, 24), (layers, 2 * 16, 16), (layers, 2 * 16, 8)}
    assert not rank_stacks & set(none), none
    assert rank_stacks <= set(xa), xa
    hidden_stack = (layers, 2, 16, hidden)
    assert normed.count(hidden_stack) == none.count(hidden_stack) + 2, (none, normed)


def test_unknown_saves_are_refused():
    with pytest.raises(ValueError, match="false_mode_saves=.*normed_input"):
        KernelOptions(false_mode_saves=("normed_input",))
    with pytest.raises(ValueError, match="false_mode_saves="):
        KernelOptions(false_mode_saves="lora_xa")  # a string, not a tuple of names
