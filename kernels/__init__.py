"""The ops the model families call. Each has a pure-jnp reference (reference.py); Pallas Mosaic GPU
kernels replace them on the GPU as they land, checked against the same reference."""

from fastlora_jax.kernels.attention import attention, cached_attention, masked_attention
from fastlora_jax.kernels.attention import runs_cudnn as attention_runs_cudnn
from fastlora_jax.kernels.lora_op import lora_linear, lora_linear_group
from fastlora_jax.kernels.options import KernelOptions
from fastlora_jax.kernels.reference import ACTIVATIONS, dense_weight, embedding, linear, rms_norm, softcap

__all__ = ["ACTIVATIONS", "KernelOptions", "attention", "attention_runs_cudnn", "cached_attention", "dense_weight",
           "embedding", "linear", "lora_linear", "lora_linear_group", "masked_attention", "rms_norm", "softcap"]
