"""`CausalLM`: what `FastLanguageModel.from_pretrained` returns.

It carries the HF config, the family (a module of plain functions), the family's frozen `Config`, and the
frozen base pytree. Calling it runs the jitted forward pass and returns an object with `.logits`, like the
HF model. LoRA (get_peft_model) adds a separate trainable pytree next to the base; the two never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax import rope
from fastlora_jax.lora import combine


@dataclass
class CausalLMOutput:
    logits: jax.Array
    loss: jax.Array | None = None


class CausalLM:
    def __init__(self, hf_config, family: ModuleType, cfg, base_params: dict, dtype, name_or_path: str,
                 weights_source: str = "16bit", max_seq_length: int = 2048):
        self.config = hf_config
        self.family = family
        self.cfg = cfg
        self.base_params = base_params
        self.dtype = jnp.dtype(dtype)
        self.name_or_path = name_or_path
        self.weights_source = weights_source  # "16bit" or "bnb-4bit": what a merged export starts from
        self.max_seq_length = max_seq_length
        # LoRA (get_peft_model): the trainable tree, its static arrays and its resolved PEFT layout.
        self.lora_params: dict | None = None
        self.lora_meta: dict | None = None
        self.lora_layout = None
        self.training = True

        def forward(base, lora, meta, input_ids, cos, sin, attention_mask, dropout_key, *, compute_dtype,
                    dropout_rate):
            params = combine(base, lora, meta)
            return family.forward(cfg, params, input_ids, cos, sin, attention_mask, compute_dtype,
                                  dropout_key, dropout_rate)

        self._forward = jax.jit(forward, static_argnames=("compute_dtype", "dropout_rate"))

    # ------------------------------------------------------------------ rope
    def rotary_cos_sin(self, position_ids_bs) -> tuple[jax.Array, jax.Array]:
        """cos/sin `[batch, seq, rotary_dim]` in fp32; the rope variant may depend on the longest position."""
        seq_len = int(np.max(np.asarray(position_ids_bs))) + 1
        inv_freq, scaling = rope.rope_inv_freq(self.config, seq_len=seq_len)
        return rope.rope_cos_sin(jnp.asarray(inv_freq), jnp.asarray(position_ids_bs), scaling, jnp.float32)

    @staticmethod
    def default_position_ids(input_ids_bs) -> np.ndarray:
        batch, seq = np.shape(input_ids_bs)
        return np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> CausalLMOutput:
        """Logits with the current adapter (if any), without dropout: the HF model in eval mode."""
        return CausalLMOutput(logits=self.apply(self.lora_params, input_ids, attention_mask, position_ids))

    def apply(self, lora_params, input_ids, attention_mask=None, position_ids=None, dropout_key=None):
        """Logits for a given LoRA pytree (None: the base alone). `dropout_key` turns on LoRA dropout."""
        input_ids = _as_batch(input_ids, "input_ids")
        if attention_mask is not None:
            attention_mask = _as_batch(attention_mask, "attention_mask")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {attention_mask.shape}; input_ids has {input_ids.shape}")
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        cos, sin = self.rotary_cos_sin(position_ids)
        dropout_rate = float(self.lora_layout.spec.lora_dropout) if self.lora_layout is not None else 0.0
        return self._forward(self.base_params, lora_params, self.lora_meta if lora_params is not None else None,
                             jnp.asarray(input_ids), cos, sin,
                             None if attention_mask is None else jnp.asarray(attention_mask), dropout_key,
                             compute_dtype=self.dtype, dropout_rate=dropout_rate if dropout_key is not None else 0.0)

    def __repr__(self) -> str:
        c = self.cfg
        quant = "nf4" if self.is_4bit else self.dtype.name
        return (f"CausalLM({self.family.__name__.rsplit('.', 1)[-1]}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"weights={quant}, compute={self.dtype.name}, from={self.name_or_path!r})")

    @property
    def is_4bit(self) -> bool:
        from fastlora_jax.quant import NF4Weight
        leaves = jax.tree.leaves(self.base_params, is_leaf=lambda x: isinstance(x, NF4Weight))
        return any(isinstance(x, NF4Weight) for x in leaves)


def _as_batch(ids, name: str) -> np.ndarray:
    """Accept lists, numpy, jax or torch tensors of shape [seq] or [batch, seq]."""
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids of shape [batch, seq]; got dtype {array.dtype}, "
                         f"shape {array.shape}")
    return array.astype(np.int32)
