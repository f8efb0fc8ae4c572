"""`KernelOptions`: the kernel choices of one traced program, passed as a static argument down to the ops.

Frozen and hashable, so it is a `jax.jit` static argument and a `custom_vjp` non-differentiable one: the
backward rules see the choices of their forward (a context variable would be read again when JAX traces
the rule, outside the caller's `with` block).
"""

from __future__ import annotations

from dataclasses import dataclass

NF4_MATMULS = ("xla", "pallas")
ATTENTIONS = ("auto", "xla", "cudnn", "flash")
LEAN_OFFLOADS = ("auto", "layer_input", "attention")
NF4_LOOKUPS = ("auto", "table", "select")
FALSE_MODE_SAVES = ("lora_xa", "normed_inputs")


@dataclass(frozen=True)
class KernelOptions:
    """- `nf4_matmul`: "xla" (dequantize in one pass, then cuBLAS; measured as fast) or "pallas" (the fused
      NF4 kernel, kernels/nf4_matmul.py, on a GPU for the bf16 shapes it supports);
    - `lora_fold`: fold the LoRA branch into an NF4 base matmul as extra contraction columns (lora_op);
    - `attention`: `kernels.attention`'s impl ("auto": cuDNN on a GPU where it applies, the blockwise
      flash-style reference where it does not (soft-caps); "xla": the dense reference; "flash": the Mosaic GPU
      flash kernel where it supports the call, else the blockwise reference);
    - `memory_lean`: the choices of the checkpointing modes "unsloth" and True, whose bar is peak memory
      (LoRA folded per module rather than per group, the select-tree NF4 lookup, weights dequantized in row
      tiles); `CausalLM` sets it from `use_gradient_checkpointing`;
    - `lean_weight_tile_bytes`: in the memory-lean modes, an NF4 weight whose dequantized copy is larger than
      this is dequantized and multiplied in tiles of its output rows (`lora_op.lean_row_tiles`);
    - `mlp_tile_tokens`: 0 (the default) runs each decoder layer's MLP over the whole sequence at once; N > 0
      runs it in sequence tiles of at most N tokens (batch x tile length) wherever a layer has more tokens
      than that, each tile under `jax.checkpoint` (`decoder.mlp_block`), so that only one tile's
      `[tokens, intermediate]` gate/up/activation and their gradients are alive at a time: for long context
      (Unsloth's `unsloth_tiled_mlp`). The MLP is then recomputed in the backward pass in every checkpointing
      mode, False included. Set it with `FastLanguageModel.from_pretrained(..., kernel_options=
      KernelOptions(mlp_tile_tokens=8192))`, or `model.kernel_options = replace(model.kernel_options, ...)` before
      the model's loss or train step is built (they read the options once);
    - `host_offload_bytes`: with `use_gradient_checkpointing="unsloth"`, at most this many bytes of offloaded
      layer values (the inputs, and the attention half where `lean_offload` adds it) go to pinned host memory per
      micro-batch (per process); the decoder layers beyond that keep their input on the device (as True) instead
      of the run failing when host memory runs out (`decoder.offloaded_layers`). None (the default): the model's
      loss sets it to 80% of the host's available memory when it is built (one process per host; with several,
      set it). The other checkpointing modes ignore it.
    - `lean_offload`: what use_gradient_checkpointing="unsloth" sends to pinned host memory per decoder layer
      (`decoder.HostOffload`): "layer_input" (Unsloth's scheme: the backward recomputes the whole layer),
      "attention" (also q/k/v, the residual after attention and, where cuDNN runs the attention outside a
      per-layer window choice, its output and softmax statistics: the backward then recomputes only the MLP half,
      else also the attention core; at Llama-3.1-8B 4.5x the host bytes, 3.5x without cuDNN's outputs) or "auto"
      (the default): "attention" where the host budget holds it and the host link moves a layer's offloaded bytes
      in the time the GPU computes the layer's forward pass (`decoder.lean_offload_attention`), else "layer_input";
    - `unroll_layers`: False (the default) runs the decoder layers under one `lax.scan` (compile time flat in the
      depth); True, for use_gradient_checkpointing=False only, runs them as a Python loop, one traced copy per
      layer: the backward's residuals are each layer's own arrays rather than slices of stacked `[layers, ...]`
      buffers that the scan zero-fills and copies into. Measured on the H200 (session 14, Llama-3.1-8B
      2 x 2048): 15,653 against the scan's 15,382-15,410 tok/s (earlier invocations), at 17.9 against 18.2 GiB,
      with a compile that grows with the depth (60 against 12 s);
    - `nf4_lookup`: how the one-pass NF4 dequantize looks its 16 values up: "table" (an indexed load of the table:
      3.1 TB/s on the H200), "select" (a 4-level select tree: 1.9 TB/s) or "auto" (the default): the table for the
      weights folded with their LoRA B (q/k/v, o, gate/up) and, outside the memory-lean modes, for the others; in
      the memory-lean modes the select tree for the weights multiplied on their own (down_proj), where the table
      raised the peak by 9 MB on an H100;
    - `false_mode_saves`: what use_gradient_checkpointing=False keeps besides the matmul and attention outputs
      (`training.save_matmul_outputs_policy`), a tuple of: "lora_xa" (each LoRA group's `x @ Aᵀ`, rank columns per
      token: the backward does not run those gemms again) and "normed_inputs" (the RMS-normed inputs of q/k/v and
      of gate/up, `2 x hidden` values per token and layer: the backward does not recompute the two norms;
      Llama-3.1-8B 2 x 2048: +2 GiB). Default () (the path `pytest -m gpu` last ran on). Measured on the H200
      (session 15, benchmarks/README.md): "lora_xa" 8B 2 x 2048 +1.7%, 1B 4 x 2048 -0.3% (noise); "normed_inputs"
      slower under the scan (stacking them costs more than the norms), used with `unroll_layers=True` in the
      fastest 1B configuration (84,044 tok/s median, 1.20x Unsloth without checkpointing);
    - `flops_per_host_byte`: the device's matmul FLOP/s over its device-to-host copy bytes/s, what "auto"
      compares a layer's forward FLOPs per offloaded byte with; None: measured when an "unsloth" loss is built on
      a GPU by a single process (`training.measured_flops_per_host_byte`, once per process); elsewhere (no GPU,
      several processes) "auto" means "layer_input" unless it is given.
    """

    nf4_matmul: str = "xla"
    lora_fold: bool = True
    attention: str = "auto"
    memory_lean: bool = False
    lean_weight_tile_bytes: int = 128 << 20
    mlp_tile_tokens: int = 0
    host_offload_bytes: int | None = None
    lean_offload: str = "auto"
    flops_per_host_byte: float | None = None
    nf4_lookup: str = "auto"
    unroll_layers: bool = False
    false_mode_saves: tuple[str, ...] = ()

    def __post_init__(self):
        if self.nf4_matmul not in NF4_MATMULS:
            raise ValueError(f"nf4_matmul={self.nf4_matmul!r} is not one of {NF4_MATMULS}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTIONS}")
        for name in ("lora_fold", "memory_lean", "unroll_layers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} is not accepted; use True or False")
        if (isinstance(self.lean_weight_tile_bytes, bool) or not isinstance(self.lean_weight_tile_bytes, int)
                or self.lean_weight_tile_bytes < 1):
            raise ValueError(f"lean_weight_tile_bytes={self.lean_weight_tile_bytes!r} must be a positive int (bytes)")
        if isinstance(self.mlp_tile_tokens, bool) or not isinstance(self.mlp_tile_tokens, int) or self.mlp_tile_tokens < 0:
            raise ValueError(f"mlp_tile_tokens={self.mlp_tile_tokens!r} is not accepted; use 0 (no tiling) or a "
                             "positive int (tokens per MLP tile)")
        if self.lean_offload not in LEAN_OFFLOADS:
            raise ValueError(f"lean_offload={self.lean_offload!r} is not one of {LEAN_OFFLOADS}")
        if not isinstance(self.false_mode_saves, tuple) or not set(self.false_mode_saves) <= set(FALSE_MODE_SAVES):
            raise ValueError(f"false_mode_saves={self.false_mode_saves!r} is not accepted; use a tuple of names from "
                             f"{FALSE_MODE_SAVES}")
        if self.nf4_lookup not in NF4_LOOKUPS:
            raise ValueError(f"nf4_lookup={self.nf4_lookup!r} is not one of {NF4_LOOKUPS}")
        if self.flops_per_host_byte is not None and (isinstance(self.flops_per_host_byte, bool) or not isinstance(
                self.flops_per_host_byte, (int, float)) or not self.flops_per_host_byte > 0):
            raise ValueError(f"flops_per_host_byte={self.flops_per_host_byte!r} is not accepted; use None (measured) "
                             "or a positive number (matmul FLOPs per device-to-host byte)")
        if self.host_offload_bytes is not None and (isinstance(self.host_offload_bytes, bool) or not isinstance(
                self.host_offload_bytes, int) or self.host_offload_bytes < 0):
            raise ValueError(f"host_offload_bytes={self.host_offload_bytes!r} is not accepted; use None (80% of the "
                             "available host memory) or an int >= 0 (bytes)")


DEFAULT = KernelOptions()
