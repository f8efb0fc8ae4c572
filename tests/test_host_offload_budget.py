"""The host-memory budget of use_gradient_checkpointing="unsloth" (KernelOptions.host_offload_bytes; issue 15
item 2): when pinned host memory cannot hold every layer input, the first layers offload and the rest keep their
input on the device, instead of the run failing; and what each layer offloads (KernelOptions.lean_offload, item 1).

`training.remat_policy` offloads only on a GPU (on the CPU the model's "unsloth" loss recomputes as True), so the
budget tests check the split itself: the rule, and that a decoder run in two parts (the layer stack read by index)
gives the loss and LoRA gradients of one scan. The lean_offload tests give the policy directly: the CPU backend
has a pinned-host memory kind, so they run the real offload path. What the GPU's host copies cost is measured by
benchmarks/train_step.py.
"""

import glob
import os
import subprocess
import sys
import tempfile
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
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


def _equations(jaxpr):
    """Every equation of the jaxpr and of every jaxpr nested in it (a scan body once)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _scan_outputs_of_weight_dtype(model, ids, labels, mask) -> list:
    """The outputs of every scan in the traced loss-and-grad that are uint8 (what NF4 weights are made of): a
    scan that saves its layers' weights as residuals stacks them there."""
    loss = model.loss_sum_fn()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda lora: loss(model.base_params, lora, ids, labels, mask, None)[0]))(
        model.lora_params)
    return [v.aval for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "scan"
            for v in eqn.outvars if v.aval.dtype == np.uint8]


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
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):  # the split scans (fit=1) or the on-device
        assert rel_l2(g, w) < 1e-5  # policy (fit=0) sum in another order: fp32 rounding (1e-7) over three layers'
        # chains (1.2e-6 seen on an AMD EPYC)


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


# ---------------------------------------------------------------------------------------------------------------
# KernelOptions.lean_offload: what "unsloth" sends to the host per layer (issue 15 item 1). The CPU backend offloads
# to its pinned-host memory kind when the policy asks, so these run the real Offloadable path.


def _direct_loss_and_grad(model, ids, labels, mask, remat, options):
    """The training loss with this policy and these options given directly (the model's loss would recompute as
    True on the CPU, where `training.remat_policy` does not offload)."""
    fam, cfg = model.family, model.cfg

    def loss(lora):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        inv_freq, scaling = fam.rope_tables(model.config, cfg, ids.shape[1])
        cos, sin = fam.rope_cos_sin(inv_freq, positions, scaling)
        return training.loss_sum_and_count(
            model, model.base_params, lora, model.lora_meta, ids, labels, cos, sin, mask, None,
            compute_dtype=jnp.float32, dropout_rate=0.0, remat=remat, chunk_tokens=None, options=options)[0]
    return jax.value_and_grad(loss)


def _dot_shapes(fn, arg, min_side: int = 0) -> Counter:
    """{operand shapes: count} of the dot_general equations in the traced function and every jaxpr nested in it (a
    scan body counts once); with `min_side`, only those of two matrices with no side shorter (the base projections:
    not the LoRA factors' rank products, not attention's batched products)."""
    shapes = (tuple(v.aval.shape for v in eqn.invars) for eqn in _equations(jax.make_jaxpr(fn)(arg).jaxpr)
              if eqn.primitive.name == "dot_general")
    return Counter(s for s in shapes if all(len(side) == 2 and min(side) >= min_side for side in s))


def _dot_count(fn, arg, min_side: int = 0) -> int:
    """How many dot_generals `_dot_shapes` finds."""
    return sum(_dot_shapes(fn, arg, min_side).values())


def _device_puts(fn, arg) -> int:
    """device_put equations in the traced function (the policy's offloads: one to the host, one back, per value)."""
    return sum(eqn.primitive.name == "device_put" for eqn in _equations(jax.make_jaxpr(fn)(arg).jaxpr))


# qwen3: q/k norms between the projections and rope; gemma3: those and the sandwich norms after o_proj
@pytest.mark.parametrize("case", ["llama_control", "qwen3", "gemma3"])
def test_attention_offload_gives_the_grads_of_layer_input_offload_and_recomputes_less(rng, case):
    """Offloading the attention half too changes what the backward recomputes, not what it computes: the loss and
    LoRA gradients equal the layer-input-only run's; the backward traces four base matmuls fewer (q, k, v and o
    are not projected again: q/k/v and the residual after attention come back from the host; on the CPU the
    attention core itself is recomputed, cuDNN's outputs being what the GPU offloads); and the values offloaded
    (out and back) go from the layer input to it and the four attention names (q, k, v, residual)."""
    model = _peft_model(case)
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 2, 23)
    group_rank = 3 * int(model.lora_layout.spec.r)
    runs = {}
    for choice in ("layer_input", "attention"):
        options = KernelOptions(memory_lean=True, lean_offload=choice)
        remat = decoder.HostOffload(attention=False)  # run_layers decides `attention` from the options
        fn = _direct_loss_and_grad(model, ids, labels, mask, remat, options)
        runs[choice] = (jax.jit(fn)(model.lora_params), _dot_count(fn, model.lora_params, group_rank + 1),
                        _device_puts(fn, model.lora_params))
    (want_loss, want_grads), want_dots, want_puts = runs["layer_input"]
    (got_loss, got_grads), got_dots, got_puts = runs["attention"]
    assert abs(float(got_loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_l2(g, w) < 1e-6
    assert got_dots == want_dots - 4, (got_dots, want_dots)
    assert (want_puts, got_puts) == (2, 10)


def test_host_offload_policy_names():
    """The policy offloads the layer input always, the attention half's names only with `attention`; every other
    value is recomputed (nothing is kept on the device)."""
    from jax.ad_checkpoint import Offloadable, Recompute
    from jax.extend.core import Primitive
    name_p = decoder.name_primitive()
    for attention in (False, True):
        policy = decoder.HostOffload(attention=attention, attention_outputs=True)
        assert isinstance(policy(name_p, name=decoder.LAYER_INPUT), Offloadable)
        for name in decoder.ATTENTION_OFFLOAD_NAMES:
            assert isinstance(policy(name_p, name=name), Offloadable) == attention
        assert policy(name_p, name=decoder.SAVED_MLP_INPUTS) is Recompute
        assert policy(jax.lax.exp_p) is Recompute
        cudnn_forward = Primitive("dot_product_attention_fwd_wrapper")  # as jax.nn's cuDNN binds it
        assert isinstance(policy(cudnn_forward), Offloadable) == attention
    # cuDNN's outputs stay recomputed without `attention_outputs` (a family with both window kinds)
    assert decoder.HostOffload(attention=True, attention_outputs=False)(cudnn_forward) is Recompute


def _x(batch, seq, cfg):
    return jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), jnp.bfloat16)


def _attention_bytes(cfg, x) -> int:
    """One layer's host bytes with its attention half (cuDNN's outputs counted where cuDNN would run)."""
    cudnn = decoder.offloads_attention_outputs(cfg, x, KernelOptions())
    return x.shape[0] * x.shape[1] * decoder.offload_features(cfg, True, cudnn) * x.dtype.itemsize


def test_lean_offload_choice_rule():
    """"layer_input" never adds the attention half; "attention" adds it where the budget holds every layer's share
    (and warns when it does not); "auto" also needs the layer's forward FLOPs per offloaded byte to reach the
    device's FLOPs per host byte, and never guesses that ratio."""
    cfg = _peft_model("llama_control").cfg
    layers, x = cfg.num_layers, _x(2, 64, cfg)
    per_layer = _attention_bytes(cfg, x)
    ratio = decoder.layer_forward_flops(cfg, 2, 64) / per_layer
    rule = partial(decoder.lean_offload_attention, cfg, x, range(layers))
    assert not rule(KernelOptions(lean_offload="layer_input", flops_per_host_byte=1e-9))
    assert rule(KernelOptions(lean_offload="attention"))
    assert rule(KernelOptions(lean_offload="attention", host_offload_bytes=layers * per_layer))
    with pytest.warns(UserWarning, match="lean_offload='attention': host_offload_bytes=.* layer inputs only"):
        assert not rule(KernelOptions(lean_offload="attention", host_offload_bytes=layers * per_layer - 1))
    assert not rule(KernelOptions(lean_offload="auto"))  # the ratio unknown (not measured: no GPU)
    assert rule(KernelOptions(flops_per_host_byte=ratio * 0.99))
    assert not rule(KernelOptions(flops_per_host_byte=ratio * 1.01))
    assert not rule(KernelOptions(flops_per_host_byte=ratio * 0.99, host_offload_bytes=layers * per_layer - 1))


def test_lean_offload_choice_is_one_for_the_model_and_stays_in_budget(rng):
    """Mllama runs its decoder layers in parts (between its cross-attention layers; here the tiny model's stack in
    two parts, layers (0, 1) and (2,)): the choice is made for the whole model, so with a budget that holds two
    layers with their attention half neither part takes it (a per-part choice gave the first part the attention
    half and the second one its layer input too: more than the budget), and with one that holds all of them both do."""
    model = _peft_model("llama_control")
    cfg = model.cfg
    ids, labels, mask = _batch(rng, cfg.vocab_size, 2, 23)
    x = jax.ShapeDtypeStruct((2, 23, cfg.hidden_size), jnp.float32)
    per_layer = _attention_bytes(cfg, x)
    base, lora = model.base_params, model.lora_params

    def offloads(budget):
        options = KernelOptions(memory_lean=True, lean_offload="attention", host_offload_bytes=budget)
        from fastlora_jax.lora import combine
        params = combine(base, lora, model.lora_meta)
        layers = params["model"]["layers"]
        cos = sin = jnp.ones((2, 23, cfg.head_dim), jnp.float32)
        h = jnp.asarray(rng.standard_normal((2, 23, cfg.hidden_size)), jnp.float32)

        def run(x, idx):
            sub = jax.tree.map(lambda a: a[jnp.asarray(idx)], layers)
            return decoder.run_layers(cfg, sub, x, cos, sin, remat=decoder.HostOffload(), options=options,
                                      indices=idx)

        return _device_puts(jax.grad(lambda x: run(run(x, (0, 1)), (2,)).sum()), h)

    assert cfg.num_layers == 3  # below: each part's scan body traces its offloads once, out and back
    with pytest.warns(UserWarning, match="lean_offload='attention'"):
        assert offloads(2 * per_layer) == 2 * 2  # the layer input only, in both parts (per part: 5 * 2 + 2)
    assert offloads(3 * per_layer) == 2 * 2 * 5  # the input and the four attention names, in both parts


def test_layer_forward_flops_and_offload_features_by_hand():
    """Llama-3.1-8B's numbers worked out by hand: 4096 hidden, 32 heads of 128, 8 KV heads, 14336 intermediate."""
    from transformers import LlamaConfig

    from fastlora_jax.models.registry import family_for
    hf = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
    cfg = family_for(hf).config(hf)
    weights = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336
    assert decoder.layer_forward_flops(cfg, 2, 2048) == 2 * 4096 * weights + 4 * 4096 * 1024 * 4096
    assert decoder.offload_features(cfg, False) == 4096
    assert decoder.offload_features(cfg, True) == 4096 + 6144 + 4096 + 64 + 4096
    assert decoder.offload_features(cfg, True, cudnn=False) == 4096 + 6144 + 4096


@pytest.mark.parametrize("field, value", [("lean_offload", "qkv"), ("flops_per_host_byte", 0),
                                          ("flops_per_host_byte", "fast"), ("flops_per_host_byte", True)])
def test_bad_lean_offload_options_raise(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} is not"):
        KernelOptions(**{field: value})


# phi3: q/k/v from one fused projection; gemma2/3: sandwich norms (gemma3 also q/k norms)
@pytest.mark.parametrize("case", ["llama_control", "qwen3", "phi3", "gemma2", "gemma3"])
def test_false_mode_recomputes_no_matmul(rng, case):
    """use_gradient_checkpointing=False keeps every matmul output the backward needs: its traced loss-and-grad has
    as many matmuls as the same loss without checkpointing (which recomputes nothing), but for Gemma's down_proj
    (its post-feedforward norm reads down_proj's output, which False does not keep: decoder.py says why). Qwen3's
    q/k norms read the projections' outputs: kept rotated, q_proj and k_proj ran again in the backward."""
    model = _peft_model(case)
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 2, 23)
    group_rank = 3 * int(model.lora_layout.spec.r)  # q/k/v's A's side by side
    assert model.cfg.hidden_size > group_rank and 2 * 23 > group_rank
    counts = [_dot_count(_direct_loss_and_grad(model, ids, labels, mask, remat, KernelOptions()), model.lora_params,
                         min_side=group_rank + 1) for remat in (training.save_matmul_outputs_policy(), None)]
    assert counts[0] == counts[1] + model.cfg.sandwich_norms, counts


def _default_command_buffer_types() -> set[str]:
    """The installed XLA's default `xla_gpu_enable_command_buffer`, read back from a dump of its debug options: a
    "-X" flag makes the list differ from the default, so the dump writes it out (XLA reads XLA_FLAGS once per
    process, hence the subprocess). This is jaxlib's XLA; the GPU plugin of the same release builds the same one."""
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_dump_to={dump} --xla_gpu_enable_command_buffer=-DYNAMIC_SLICE_FUSION")
        proc = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(lambda x: x * 2)(jnp.ones(3))"],
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        types = set()
        for path in glob.glob(f"{dump}/*debug_options"):
            with open(path) as f:
                types |= {line.split(":", 1)[1].strip() for line in f if line.startswith("xla_gpu_enable_command_buffer:")}
    return types | {"DYNAMIC_SLICE_FUSION"}


def test_host_offload_step_leaves_only_dynamic_slice_fusions_out_of_command_buffers():
    """HOST_OFFLOAD_STEP_OPTIONS is this XLA's default command-buffer list without DYNAMIC_SLICE_FUSION (the host
    copies), nothing else: a jaxlib whose default changed fails here instead of silently turning more off."""
    default = _default_command_buffer_types()
    assert "FUSION" in default and "DYNAMIC_SLICE_FUSION" in default, default
    ours = set(training.HOST_OFFLOAD_STEP_OPTIONS["xla_gpu_enable_command_buffer"].split(","))
    assert ours == default - {"DYNAMIC_SLICE_FUSION"}
    # and XLA accepts the value (a bad one fails to compile even on the CPU)
    f = jax.jit(lambda x: x * 2, compiler_options=training.HOST_OFFLOAD_STEP_OPTIONS)
    np.testing.assert_array_equal(np.asarray(f(jnp.arange(3.0))), [0.0, 2.0, 4.0])


def test_step_compiler_options_by_mode(monkeypatch):
    """Only a step that offloads ("unsloth" where the backend offloads) takes the command-buffer change; the caller's
    options go over both; a non-dict is refused by name."""
    key = "xla_gpu_enable_command_buffer"
    monkeypatch.setattr(training, "host_offload_supported", lambda: True)
    assert training.step_compiler_options("unsloth")[key] == training.HOST_OFFLOAD_STEP_OPTIONS[key]
    for mode in (False, True):
        assert key not in training.step_compiler_options(mode)
    assert training.step_compiler_options("unsloth", {key: ""})[key] == ""
    assert training.step_compiler_options(False)["xla_gpu_enable_dynamic_slice_fusion"] is True
    # an option the user sets in XLA_FLAGS is the user's (compiler options would win over it)
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 --{key}=")
    assert key not in training.step_compiler_options("unsloth")
    assert "xla_gpu_enable_dynamic_slice_fusion" in training.step_compiler_options("unsloth")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_dynamic_slice_fusion")  # a bare boolean flag is a setting too
    assert "xla_gpu_enable_dynamic_slice_fusion" not in training.step_compiler_options(False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_dynamic_slice_fusion_extra=1")  # another flag's name
    assert "xla_gpu_enable_dynamic_slice_fusion" in training.step_compiler_options(False)
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(training, "host_offload_supported", lambda: False)
    assert key not in training.step_compiler_options("unsloth")
    with pytest.raises(ValueError, match="compiler_options must be None or a dict"):
        training.step_compiler_options("unsloth", [key])


def test_train_step_compiles_with_the_step_options(rng, monkeypatch):
    """make_train_step asks step_compiler_options for the model's mode and compiles both of its jitted forms (one
    stacked batch; a list of micro-batches) with the result: an option XLA refuses reaches the compiler."""
    import optax
    model = _peft_model("llama_control")
    ids, labels, mask = _batch(rng, model.cfg.vocab_size, 2, 23)
    asked = []
    real = training.step_compiler_options
    monkeypatch.setattr(training, "step_compiler_options", lambda mode, opts=None: asked.append(mode) or real(mode, opts))
    step = training.make_train_step(model, optax.sgd(1e-3),
                                    compiler_options={"xla_gpu_enable_command_buffer": "BOGUS"})
    assert asked == [model.use_gradient_checkpointing]
    stacked = {"input_ids": ids[None], "labels": labels[None], "attention_mask": mask[None]}
    listed = [{"input_ids": ids[:1], "labels": labels[:1], "attention_mask": mask[:1]},
              {"input_ids": ids[1:], "labels": labels[1:], "attention_mask": mask[1:]}]
    for batch in (stacked, listed):
        with pytest.raises(Exception, match="'BOGUS' is not a valid enum value"):
            step(model.lora_params, optax.sgd(1e-3).init(model.lora_params), batch, None)


def _train_step_bench():
    """benchmarks/train_step.py as a module."""
    import importlib.util
    here = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    saved = list(sys.path)
    try:  # the script puts its own folder on sys.path (for config_process); leave sys.path as it was
        spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(here, "train_step.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path[:] = saved
    return bench


def test_profile_files_of_two_variants_of_a_point_are_named_apart():
    """benchmarks/train_step.py's profile files carry the kernel options set away from their defaults and the
    --xla-option values (two variants of one point in one call wrote the same kernels_*.json before); the options
    the model sets itself (memory_lean, the host budget and rate) and the defaults add nothing."""
    label = _train_step_bench().options_label
    assert label(KernelOptions(), None) == ""
    assert label(KernelOptions(memory_lean=True, host_offload_bytes=1 << 30, flops_per_host_byte=1e4), {}) == ""
    unfolded = label(KernelOptions(lora_fold=False), None)
    no_buffers = label(KernelOptions(), {"xla_gpu_enable_command_buffer": ""})
    assert unfolded == "_lora-fold-False" and no_buffers == "_enable-command-buffer-"
    assert label(KernelOptions(lora_fold=False, nf4_lookup="table"), None) not in ("", unfolded)


def test_profile_counts_only_the_copy_time_no_kernel_hides():
    """benchmarks/train_step.py's `copy_overlap` (the "host copies exposed" of its profile): a copy hides behind
    any kernel running at the same time, also one that starts as it ends or starts with it; copies overlapping
    each other count once."""
    bench = _train_step_bench()
    kernel, copy = False, True
    assert bench.copy_overlap([]) == (0, 0)
    # kernel 0-10, copy 5-20 (10-20 exposed), copy 25-30 with a kernel from 28 (25-28 exposed)
    assert bench.copy_overlap([(0, 10, kernel), (5, 20, copy), (25, 30, copy), (28, 40, kernel)]) == (35, 13)
    # a copy starting exactly when a kernel ends is exposed whole; one inside a kernel is hidden
    assert bench.copy_overlap([(0, 10, kernel), (10, 15, copy), (2, 4, copy)]) == (15, 5)
    # two copies overlapping each other, no kernel: their union
    assert bench.copy_overlap([(0, 10, copy), (5, 12, copy)]) == (12, 12)
