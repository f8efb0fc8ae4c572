"""fastlora_jax: LoRA and QLoRA fine-tuning of Hugging Face models in JAX.

Where things are (two hops from here):
- `FastLanguageModel`, `FastVisionModel` (api.py): from_pretrained / get_peft_model / for_inference, the
  Unsloth-shaped entry points.
- `CausalLM` (model.py): the object they return; the HF config, the frozen base pytree, the LoRA pytree,
  compute_loss, generate (generation.py), save_pretrained (convert/peft.py). `VisionCausalLM` adds images.
- LoRA: lora_config.py (PEFT's targeting rules), lora.py (the trainable pytree laid over the base).
- Training: training.py (chunked loss, checkpointing policies, optax step), trainer.py + data.py (SFTTrainer).
- model families (models/): the shared decoder (models/decoder.py: `DecoderConfig`, forward, KV cache), one
  file per family (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3: a config translation each; qwen2_vl:
  a vision tower of its own), found through models/registry.py (HF architecture -> family).
- `NF4Weight` (quant.py): bitsandbytes-exact NF4 as a JAX pytree.
- kernels (fastlora_jax.kernels, from ./kernels): the ops the families call, each with a jnp reference;
  `KernelOptions` (kernels/options.py) is the kernel choice, a static argument passed down to the ops.
- convert (fastlora_jax.convert, from ./convert): HF checkpoint <-> pytree.
- Several devices and hosts: sharding.py (`make_mesh(data=N, fsdp=M)`, the FSDP rules, jax.distributed); the
  mesh goes to from_pretrained(mesh=...) / SFTConfig(mesh=...).
"""

from fastlora_jax.quant import NF4Weight

__all__ = ["NF4Weight", "FastLanguageModel", "FastVisionModel", "CausalLM", "VisionCausalLM", "SFTTrainer",
           "SFTConfig", "make_mesh"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import fastlora_jax.quant` does not pull in transformers.
    if name in ("FastLanguageModel", "FastVisionModel"):
        from fastlora_jax import api
        return getattr(api, name)
    if name in ("CausalLM", "VisionCausalLM"):
        from fastlora_jax import model
        return getattr(model, name)
    if name in ("SFTTrainer", "SFTConfig"):
        from fastlora_jax import trainer
        return getattr(trainer, name)
    if name == "make_mesh":
        from fastlora_jax.sharding import make_mesh
        return make_mesh
    raise AttributeError(f"module 'fastlora_jax' has no attribute {name!r}")
