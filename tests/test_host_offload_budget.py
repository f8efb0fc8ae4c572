"""The host-memory budget of use_gradient_checkpointing="unsloth" (KernelOptions.host_offload_bytes; issue 15
item 2): when pinned host memory cannot hold every layer input, the first layers offload and the rest keep their
input on the device, instead of the run failing.

The CPU has no pinned host memory (the offload policy recomputes as True there), so these tests check the split
itself: the rule, and that a decoder run in two parts (the layer stack read by index) gives the loss and LoRA
gradients of one scan. What the GPU's host copies cost is measured by benchmarks/train_step.py.
"""

import jax
import numpy as np
import pytest
from conftest import rel_l2
from test_tiled_mlp import _batch, _peft_model

from fastlora_jax import training
from fastlora_jax.kernels import KernelOptions
from fastlora_jax.models import decoder


def test_offloaded_layers_rule():
    """Layers whose model-wide index is below budget // bytes offload: a prefix of a plain stack, and the same
    cut across Mllama's parts (its self-attention layers 0-2 and 4-5 run as two stacks)."""
    assert decoder.offloaded_layers(range(4), 100, 250) == 2
    assert decoder.offloaded_layers(range(4), 100, 10_000) == 4
    assert decoder.offloaded_layers(range(4), 100, 0) == 0
    assert decoder.offloaded_layers((0, 1, 2), 100, 450) == 3
    assert decoder.offloaded_layers((4, 5), 100, 450) == 0
    assert decoder.offloaded_layers((4, 5), 100, 550) == 1


def _scans(model, ids, labels, mask):
    loss = model.loss_sum_fn()
    jaxpr = jax.make_jaxpr(lambda lora: loss(model.base_params, lora, ids, labels, mask, None)[0])(model.lora_params)
    return sum(1 for eqn in jaxpr.eqns if eqn.primitive.name == "scan")


def _scan_outputs_of_weight_dtype(model, ids, labels, mask) -> list:
    """The outputs of every scan in the traced loss-and-grad that are uint8 (what NF4 weights are made of): a
    scan that saves its layers' weights as residuals stacks them there."""
    loss = model.loss_sum_fn()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda lora: loss(model.base_params, lora, ids, labels, mask, None)[0]))(
        model.lora_params)
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                found.extend(v.aval for v in eqn.outvars if v.aval.dtype == np.uint8)
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(jaxpr.jaxpr)
    return found


def _loss_and_grads(model, ids, labels, mask):
    loss = model.loss_sum_fn()
    return jax.jit(jax.value_and_grad(lambda lora: loss(model.base_params, lora, ids, labels, mask, None)[0]))(
        model.lora_params)


@pytest.mark.filterwarnings("ignore:use_gradient_checkpointing='unsloth'")  # the CPU recomputes instead
@pytest.mark.parametrize("fit", [0, 1])  # no layer input fits on the host / the first layer's
def test_split_layers_give_the_loss_and_grads_of_one_scan(rng, fit):
    """Also what the parts save: each reads its layer inside the checkpoint, so no scan stacks the layers' NF4
    bytes as residuals (read outside it, every layer's were saved: +48% temporaries on this model)."""
    model = _peft_model("llama_control")
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 2, 23)
    per_layer = 2 * 23 * model.cfg.hidden_size * 4  # batch x seq x hidden, fp32
    mode0, options0 = model.use_gradient_checkpointing, model.kernel_options
    try:
        model.use_gradient_checkpointing = "unsloth"
        model.kernel_options = KernelOptions()
        want = _loss_and_grads(model, ids, labels, mask)
        assert _scans(model, ids, labels, mask) == 1
        assert not _scan_outputs_of_weight_dtype(model, ids, labels, mask)
        model.kernel_options = KernelOptions(host_offload_bytes=fit * per_layer + per_layer // 2)
        with pytest.warns(UserWarning, match=f"holds the inputs of {fit} of these {model.cfg.num_layers} decoder"):
            got = _loss_and_grads(model, ids, labels, mask)
            assert _scans(model, ids, labels, mask) == (2 if fit else 1)
            assert not _scan_outputs_of_weight_dtype(model, ids, labels, mask)
        for mode in (True, False):  # only "unsloth" offloads: the others ignore the budget
            model.use_gradient_checkpointing = mode
            assert _scans(model, ids, labels, mask) == 1
    finally:
        model.use_gradient_checkpointing, model.kernel_options = mode0, options0
    assert abs(float(got[0]) - float(want[0])) <= 1e-6 * abs(float(want[0]))
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel_l2(g, w) < 1e-6


def test_step_options_resolve_the_budget_only_where_layers_offload():
    """memory_lean follows the mode; only "unsloth" keeps a budget, resolved only where host offload exists (not on
    the CPU: there it stays None, as the user left it); a budget the user gave is kept."""
    assert training.step_options(KernelOptions(), False).memory_lean is False
    lean = training.step_options(KernelOptions(host_offload_bytes=123), True)
    assert lean.memory_lean is True and lean.host_offload_bytes is None
    unsloth = training.step_options(KernelOptions(), "unsloth")
    assert unsloth.memory_lean is True
    assert (unsloth.host_offload_bytes is not None) == training.host_offload_supported()
    assert training.step_options(KernelOptions(host_offload_bytes=123), "unsloth").host_offload_bytes == 123
    available = training.available_host_bytes()
    assert available is None or 0 < available < 1 << 50


@pytest.mark.parametrize("value", [-1, 2.5, "1GB", True])
def test_bad_host_offload_bytes_raises(value):
    with pytest.raises(ValueError, match=f"host_offload_bytes={value!r} is not accepted.*int >= 0"):
        KernelOptions(host_offload_bytes=value)
