"""The model on the GPU: parity with transformers (torch on the CPU as the oracle), NF4 loading, and the
three checkpointing modes giving the same gradients. Run with `pytest -m gpu` on the GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from fastlora_jax import FastLanguageModel, training
from fastlora_jax.tiny import write_tiny_llama

pytestmark = pytest.mark.gpu


def _hf_logits(model_dir, ids):
    import torch
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def test_fp32_and_bf16_logits_on_gpu_match_transformers(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})
    ids = rng.integers(0, 512, size=(2, 40))
    expected = _hf_logits(model_dir, ids)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=False)
    logits = model(ids).logits
    assert logits.devices() == {jax.devices()[0]} and jax.devices()[0].platform == "gpu"
    assert rel_l2(np.asarray(logits), expected) < 1e-4
    bf16, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)  # dtype=None: bf16 on a GPU
    assert bf16.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(bf16(ids).logits.astype(jnp.float32)), expected) < 2e-2


def test_nf4_on_gpu_equals_nf4_on_cpu(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False)
    ids = rng.integers(0, 512, size=(2, 24))
    gpu_model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    with jax.default_device(jax.devices("cpu")[0]):
        cpu_model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
        cpu_logits = np.asarray(cpu_model(ids).logits)
    gpu_q = gpu_model.base_params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    cpu_q = cpu_model.base_params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(gpu_q.packed), np.asarray(cpu_q.packed))
    assert rel_l2(np.asarray(gpu_model(ids).logits), cpu_logits) < 1e-4


def test_checkpointing_modes_give_same_gradients_on_gpu(tmp_path, rng):
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    ids = rng.integers(0, 512, size=(2, 32))
    grads = {}
    for mode in ("unsloth", True, False):
        pm = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False, use_gradient_checkpointing=mode)
        fn = pm.loss_sum_fn()
        g = jax.jit(jax.grad(lambda lp, base: fn(base, lp, jnp.asarray(ids), jnp.asarray(ids))[0]))(
            pm.lora_params, pm.base_params)
        grads[mode] = pm.peft_state_dict(g)
    for mode in ("unsloth", True):
        for key, value in grads[False].items():
            assert rel_l2(np.asarray(grads[mode][key]), np.asarray(value)) < 1e-5, (mode, key)


@pytest.mark.parametrize("lean_offload", ["layer_input", "attention"])
def test_unsloth_offloads_give_false_mode_gradients_in_bf16_on_gpu(tmp_path, rng, lean_offload):
    """"unsloth" with each `KernelOptions.lean_offload` (in bf16, so cuDNN runs the attention and "attention"
    offloads its outputs: the path the CPU cannot take) against False, which saves those values on the device:
    the same ops in the same order either way, so the gradients agree to bf16's rounding of the sums."""
    from fastlora_jax.kernels import KernelOptions
    # 6 layers: copies of several scan iterations in flight beside the kernels
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False, num_hidden_layers=6)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="bfloat16", load_in_4bit=True,
                                                 kernel_options=KernelOptions(lean_offload=lean_offload))
    ids = jnp.asarray(rng.integers(0, 512, size=(2, 64)))
    if lean_offload == "attention":  # the path under test: cuDNN runs, and its outputs go to the host
        from fastlora_jax.models import decoder
        x = jax.ShapeDtypeStruct((2, 64, model.cfg.hidden_size), jnp.bfloat16)
        assert decoder.offloads_attention_outputs(model.cfg, x, model.kernel_options)
    grads = {}
    for mode in ("unsloth", False):
        pm = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False, use_gradient_checkpointing=mode)
        fn = pm.loss_sum_fn()
        # compiled as the training step is (the copies outside command buffers), so a copy racing its use shows here
        g = jax.jit(jax.grad(lambda lp, base: fn(base, lp, ids, ids)[0].astype(jnp.float32)),
                    compiler_options=training.step_compiler_options(mode))(pm.lora_params, pm.base_params)
        grads[mode] = pm.peft_state_dict(g)
    for key, value in grads[False].items():
        assert rel_l2(np.asarray(grads["unsloth"][key], np.float32), np.asarray(value, np.float32)) < 2e-2, key


@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_attention_matches_reference(rng, padded):
    from fastlora_jax.kernels.attention import attention
    from fastlora_jax.kernels.reference import attention_reference
    b, s, h, k, d = 2, 256, 8, 2, 64
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
                ((b, s, h, d), (b, s, k, d), (b, s, k, d)))
    mask = None
    if padded:
        mask = np.ones((b, s), np.int32)
        mask[1, -37:] = 0  # right padding, as the trainer pads
        mask = jnp.asarray(mask)
    got = jax.jit(attention, static_argnums=4)(q, kk, v, mask, d ** -0.5)
    want = attention_reference(q.astype(jnp.float32), kk.astype(jnp.float32), v.astype(jnp.float32), mask, d ** -0.5)
    keep = np.ones((b, s), bool) if mask is None else np.asarray(mask).astype(bool)
    assert rel_l2(np.asarray(got, np.float32)[keep], np.asarray(want)[keep]) < 1e-2
    grad = jax.grad(lambda q_: attention(q_, kk, v, mask, d ** -0.5).astype(jnp.float32).sum())(q)
    grad_ref = jax.grad(lambda q_: attention_reference(q_, kk.astype(jnp.float32), v.astype(jnp.float32), mask,
                                                         d ** -0.5).sum())(q.astype(jnp.float32))
    assert rel_l2(np.asarray(grad, np.float32)[keep], np.asarray(grad_ref)[keep]) < 2e-2


@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_sliding_window_matches_reference(rng, padded):
    """`sliding_window` on cuDNN (`local_window_size`) is transformers' window: i - j < window (issue 13)."""
    from fastlora_jax.kernels.attention import attention
    from fastlora_jax.kernels.reference import attention_reference
    b, s, h, k, d, window = 2, 256, 8, 2, 64, 37
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
                ((b, s, h, d), (b, s, k, d), (b, s, k, d)))
    mask = None
    if padded:
        mask = np.ones((b, s), np.int32)
        mask[1, :29] = 0  # left padding, as generation pads
        mask = jnp.asarray(mask)
    call = jax.jit(lambda q_, k_, v_, m_: attention(q_, k_, v_, m_, d ** -0.5, sliding_window=window, impl="cudnn"))
    got = call(q, kk, v, mask)
    f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
    want = attention_reference(*f32, mask, d ** -0.5, sliding_window=window)
    full = attention_reference(*f32, mask, d ** -0.5)
    keep = np.ones((b, s), bool) if mask is None else np.asarray(mask).astype(bool)
    keep[:, :window] = False  # where the window changes nothing, both agree anyway
    assert rel_l2(np.asarray(got, np.float32)[keep], np.asarray(want)[keep]) < 1e-2
    assert rel_l2(np.asarray(full)[keep], np.asarray(want)[keep]) > 0.1  # the window matters here
    grad = jax.grad(lambda q_: call(q_, kk, v, mask).astype(jnp.float32).sum())(q)
    grad_ref = jax.grad(lambda q_: attention_reference(q_, *f32[1:], mask, d ** -0.5,
                                                         sliding_window=window).sum())(f32[0])
    assert rel_l2(np.asarray(grad, np.float32)[keep], np.asarray(grad_ref)[keep]) < 2e-2


# ------------------------------------------------------------------------------------------ Gemma 3 vision (issue 19)


@pytest.mark.parametrize("window", [None, 37])
def test_cudnn_image_block_attention_matches_reference(rng, window):
    """Bidirectional image blocks (Gemma 3's token_type_ids) on cuDNN, as an explicit mask, with and without a
    sliding window, padding on one row: outputs and d/dq equal the jnp reference."""
    from fastlora_jax.kernels.attention import attention
    from fastlora_jax.kernels.reference import attention_reference
    from fastlora_jax.models.gemma3_vl import image_block_ids
    b, s, h, k, d = 2, 256, 8, 4, 256  # Gemma 3's head_dim
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
                ((b, s, h, d), (b, s, k, d), (b, s, k, d)))
    types = np.zeros((b, s), np.int32)
    types[0, 10:74] = 1  # one image of 64 tokens
    types[1, 5:69] = types[1, 100:164] = 1  # two images
    blocks = jnp.asarray(image_block_ids(types))
    mask = np.ones((b, s), np.int32)
    mask[1, -29:] = 0
    mask = jnp.asarray(mask)
    call = jax.jit(lambda q_, k_, v_: attention(q_, k_, v_, mask, d ** -0.5, sliding_window=window, impl="cudnn",
                                                block_ids_bs=blocks))
    f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
    want = attention_reference(*f32, mask, d ** -0.5, sliding_window=window, block_ids_bs=blocks)
    causal = attention_reference(*f32, mask, d ** -0.5, sliding_window=window)
    keep = np.asarray(mask).astype(bool)
    assert rel_l2(np.asarray(call(q, kk, v), np.float32)[keep], np.asarray(want)[keep]) < 1e-2
    assert rel_l2(np.asarray(causal)[keep], np.asarray(want)[keep]) > 0.05  # the blocks matter here
    grad = jax.grad(lambda q_: call(q_, kk, v).astype(jnp.float32).sum())(q)
    grad_ref = jax.grad(lambda q_: attention_reference(q_, *f32[1:], mask, d ** -0.5, sliding_window=window,
                                                         block_ids_bs=blocks).sum())(f32[0])
    assert rel_l2(np.asarray(grad, np.float32)[keep], np.asarray(grad_ref)[keep]) < 2e-2


@pytest.mark.parametrize("shape", [(1, 300, 1000, 32, 8, 128), (2, 400, 400, 16, 16, 80)])  # cross / vision
def test_cudnn_masked_attention_matches_reference(rng, shape):
    """Mllama's attention on cuDNN (kernels.masked_attention): queries over keys of another length (the text
    over the vision tokens) or the vision encoder's, GQA, head_dim 80, some keys of every row masked: output and
    dq/dk/dv equal the fp32 reference (transformers' additive finfo.min mask)."""
    from fastlora_jax.kernels.attention import masked_attention
    from fastlora_jax.kernels.reference import masked_attention_reference
    b, nq, nk, h, kh, d = shape
    q, kk, v = (jnp.asarray(rng.standard_normal(s_), jnp.bfloat16) for s_ in
                ((b, nq, h, d), (b, nk, kh, d), (b, nk, kh, d)))
    allowed = rng.random((b, nq, nk)) < 0.6
    allowed[:, :, 0] = True  # no row fully masked
    allowed = jnp.asarray(allowed)
    probe = jnp.asarray(rng.standard_normal((b, nq, h, d)), jnp.float32)
    f32 = [x.astype(jnp.float32) for x in (q, kk, v)]

    def loss(fn, *qkv):
        return jnp.sum(fn(*qkv).astype(jnp.float32) * probe)

    call = jax.jit(lambda *qkv: masked_attention(*qkv, allowed, d ** -0.5, impl="cudnn"))
    ref = lambda *qkv: masked_attention_reference(*qkv, allowed, d ** -0.5)  # noqa: E731
    assert rel_l2(np.asarray(call(q, kk, v), np.float32), np.asarray(ref(*f32))) < 1e-2
    unmasked = masked_attention_reference(*f32, None, d ** -0.5)
    assert rel_l2(np.asarray(unmasked), np.asarray(ref(*f32))) > 0.05  # the mask matters here
    got = jax.grad(lambda *a: loss(call, *a), argnums=(0, 1, 2))(q, kk, v)
    want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(*f32)
    for g, w in zip(got, want):
        assert rel_l2(np.asarray(g, np.float32), np.asarray(w)) < 2e-2


def test_cudnn_bidirectional_attention_matches_reference(rng):
    """The SigLIP tower's attention (every patch sees every patch; head_dim 72 as so400m's) on cuDNN."""
    from fastlora_jax.kernels.attention import masked_attention
    from fastlora_jax.kernels.reference import masked_attention_reference
    n, p, h, d = 2, 1024, 16, 72
    q, k, v = (jnp.asarray(rng.standard_normal((n, p, h, d)), jnp.bfloat16) for _ in range(3))
    call = jax.jit(lambda q_: masked_attention(q_, k, v, None, d ** -0.5, impl="cudnn"))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert rel_l2(np.asarray(call(q), np.float32), np.asarray(masked_attention_reference(*f32, None, d ** -0.5))) < 1e-2
    grad = jax.grad(lambda q_: call(q_).astype(jnp.float32).sum())(q)
    grad_ref = jax.grad(lambda q_: masked_attention_reference(q_, *f32[1:], None, d ** -0.5).sum())(f32[0])
    assert rel_l2(np.asarray(grad, np.float32), np.asarray(grad_ref)) < 2e-2


def test_gemma3_vision_logits_on_gpu_match_transformers(tmp_path, rng):
    """A tiny Gemma 3 VLM (two images, bidirectional blocks, a window shorter than an image): fp32 logits on the
    GPU within 1e-4 of transformers' (torch on the CPU), bf16 (cuDNN attention) within 2e-2."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from fastlora_jax import FastVisionModel
    from fastlora_jax.tiny_gemma3 import write_tiny_gemma3_vl
    model_dir = write_tiny_gemma3_vl(tmp_path / "g3", seed=int(rng.integers(1 << 30)), processor=False)
    hf = Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    cfg = hf.config
    n_img = cfg.mm_tokens_per_image
    ids = rng.integers(20, 500, size=(2, 60))
    for row, start in ((0, 10), (1, 4), (1, 30)):
        ids[row, start] = cfg.boi_token_id
        ids[row, start + 1:start + 1 + n_img] = cfg.image_token_id
        ids[row, start + 1 + n_img] = cfg.eoi_token_id
    types = (ids == cfg.image_token_id).astype(np.int64)
    pixels = rng.standard_normal((3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)).astype(np.float32)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                      token_type_ids=torch.tensor(types)).logits.numpy()
    model, _ = FastVisionModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=False)
    logits = model(ids, None, pixels, types).logits
    assert jax.devices()[0].platform == "gpu"
    assert rel_l2(np.asarray(logits), expected) < 1e-4
    bf16, _ = FastVisionModel.from_pretrained(model_dir, load_in_4bit=False)  # dtype=None: bf16 on a GPU
    assert bf16.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(bf16(ids, None, pixels, types).logits.astype(jnp.float32)), expected) < 2e-2


@pytest.mark.parametrize("mode", ["unsloth", False])
def test_one_device_mesh_trains_as_the_plain_run_on_gpu(tmp_path, rng, mode):
    """Issue 17's one-GPU part: the training step on a mesh of the one GPU (`make_mesh()`: data=1) gives the plain
    run's losses and LoRA params after two AdamW steps, in both modes ("unsloth" sends its layer inputs to pinned
    host memory: on a mesh the offloaded values carry its sharding). fp32: the same ops; XLA may order sums apart
    once the program carries shardings, so rounding (1e-7) over three steps' chains bounds the difference."""
    import optax

    from fastlora_jax import sharding
    model_dir = write_tiny_llama(tmp_path / "m", seed=int(rng.integers(1 << 30)), tokenizer=False, num_hidden_layers=3)
    base, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=True)
    ids = rng.integers(4, 512, size=(1, 2, 32)).astype(np.int32)  # [accum, micro_batch, seq]
    batch = {"input_ids": ids, "labels": ids}
    runs = []
    for mesh in (None, sharding.make_mesh()):
        pm = FastLanguageModel.get_peft_model(base, r=8, init_lora_weights=False, use_gradient_checkpointing=mode)
        if mesh is not None:
            assert mesh.size == 1 and mesh.devices.flat[0].platform == "gpu"
            pm.shard(mesh)
        optimizer = optax.adamw(1e-3)
        lora, state = pm.lora_params, optimizer.init(pm.lora_params)
        step, losses = training.make_train_step(pm, optimizer), []
        for i in range(2):
            lora, state, metrics = step(lora, state, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        runs.append((losses, pm.peft_state_dict(lora)))
    (plain_losses, plain), (mesh_losses, meshed) = runs
    np.testing.assert_allclose(mesh_losses, plain_losses, rtol=1e-6)
    for key, value in plain.items():
        assert rel_l2(np.asarray(meshed[key]), np.asarray(value)) < 1e-5, key
