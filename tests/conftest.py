import json
import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def rng(request):
    """A generator seeded by the test's id: the same inputs whatever runs before it (-k, -x, xdist), so a
    failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def bnb_reference_path(model):
    """A transformers (or PEFT) model holding bitsandbytes Linear4bit modules, set to run bnb's reference path
    on every CPU; returns the model. Call it before the model's first forward.

    Oracle trap: on a CPU with AVX512-BF16, bitsandbytes 0.50.2's Linear4bit in eval mode (no grad) repacks
    its weight in place at the first forward and runs a fused bf16 kernel (input and absmax cast to bf16)
    whatever bnb_4bit_compute_dtype says: the logits carry bf16 error (~2e-3) that depends on the machine, and
    the repack fails for in_features < 64 ("shape '[96, 0]' is invalid"). With the flag off, every CPU
    dequantizes the stored NF4 and runs the matmul in the compute dtype, as on a CPU without AVX512-BF16."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), \
                "bnb_reference_path must be called before the first forward (the weight is already repacked)"
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_modules(hf) -> dict:
    """{module name: the bnb dict transformers would save for its weight} of every Linear4bit."""
    import bitsandbytes as bnb
    out = {}
    for name, module in hf.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state.as_dict(packed=True)
            out[name] = {"": module.weight.data.numpy(), **{k: v.numpy() for k, v in state.items()}}
    return out


def decode_bnb_nf4(tensors: dict) -> np.ndarray:
    """A bnb NF4 weight decoded from its stored tensors by the format's definition (numpy, fp32): the high
    nibble first, code value * absmax of its 64-block, absmax itself 8-bit dynamic codes * the absmax of its
    256-block + the mean offset (double quantization).

    Oracle trap: bitsandbytes 0.50.2's own CPU `dequantize_4bit` is wrong for fp32 weights whose last dimension
    is even but not a multiple of the blocksize (e.g. an o_proj [64, 96] with head_dim 24: ~20% error against
    this decoding of its own bytes, which agrees with it on every other shape), and transformers' CPU forward
    goes through it. The bytes bnb quantizes are right (ours equal them exactly), so the logits oracle is
    transformers with the weights bnb quantized, decoded here."""
    meta = json.loads(bytes(np.asarray(tensors["quant_state.bitsandbytes__nf4"], np.uint8)))
    assert meta["quant_type"] == "nf4", meta
    shape, block = meta["shape"], meta["blocksize"]
    absmax = np.asarray(tensors["absmax"])
    if "nested_absmax" in tensors:
        codes = np.asarray(tensors["nested_quant_map"], np.float32)[absmax.astype(np.int64)]
        scale = np.repeat(np.asarray(tensors["nested_absmax"], np.float32), meta["nested_blocksize"])[:absmax.size]
        absmax = codes * scale + np.float32(meta["nested_offset"])
    packed = np.asarray(tensors[""], np.uint8).reshape(-1)
    nibbles = np.stack([packed >> 4, packed & 15], -1).reshape(-1)
    n = int(np.prod(shape))
    values = np.asarray(tensors["quant_map"], np.float32)[nibbles[:n]]
    return (values * np.repeat(absmax.astype(np.float32), block)[:n]).reshape(shape)
