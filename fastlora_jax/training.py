"""Training: the chunked causal-LM loss, checkpointing policies, and an optax train step.

- The loss never builds `[tokens, vocab]` logits at once: tokens go through the output layer in chunks
  under `jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of keeping them.
- `use_gradient_checkpointing` is a `jax.checkpoint` policy on each decoder layer (run under `lax.scan`):
  "unsloth" offloads the layer input to pinned host memory (as many layers as `KernelOptions.host_offload_bytes`
  holds, `step_options`) and recomputes the layer, or also its attention half's outputs where the host link keeps
  up (`KernelOptions.lean_offload`, `decoder.HostOffload`) and recomputes only the MLP half; True keeps the layer
  input on the device and recomputes; False keeps the outputs of matmuls and attention and recomputes only
  elementwise work (norms, rope, the gated activation).
- The train step differentiates only the LoRA pytree (fp32 master weights; compute in the model dtype),
  accumulates gradients over micro-batches exactly as one big batch would (token-weighted), and is jitted
  once with its buffers donated. Image batches (their patch counts differ) come as a list of micro-batches
  (see `make_train_step`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastlora_jax import kernels
from fastlora_jax.kernels.options import DEFAULT as DEFAULT_OPTIONS
from fastlora_jax.kernels.options import KernelOptions

IGNORE_INDEX = -100
_warned_no_host = False


def remat_policy(mode, options: KernelOptions = DEFAULT_OPTIONS):
    """`use_gradient_checkpointing` -> what `hidden_states(remat=...)` takes (None: no checkpointing); for False,
    `options.false_mode_saves` adds to what the policy keeps."""
    global _warned_no_host
    from fastlora_jax.models.decoder import HostOffload
    if mode is False:
        return save_matmul_outputs_policy(options.false_mode_saves)
    if mode is True:
        return jax.checkpoint_policies.nothing_saveable
    if mode == "unsloth":
        if not host_offload_supported():
            if not _warned_no_host:
                warnings.warn(f"use_gradient_checkpointing='unsloth': the {jax.default_backend()} backend has no "
                              "pinned host memory to offload to; recomputing layers instead (as True)", stacklevel=3)
                _warned_no_host = True
            return jax.checkpoint_policies.nothing_saveable
        return HostOffload()  # the layer input only; run_layers may add the attention half (lean_offload)
    raise ValueError(f"use_gradient_checkpointing={mode!r} is not accepted; use 'unsloth', True or False")


def save_matmul_outputs_policy(extra_saves: tuple[str, ...] = ()):
    """use_gradient_checkpointing=False: keep what is expensive to recompute, recompute the rest.

    Kept per layer: its input, q/k/v (rotated; before their norms where q/k norms follow), the attention output
    and its softmax statistics (the fused attention's forward outputs), the residual after attention (o_proj's
    output where a norm follows it), and the gate/up projections (decoder.py says why these forms).
    Recomputed in the backward pass: the RMS norms, rope and the gated activation (elementwise, memory
    bound, a few percent of a step) — saving them too would cost about as much memory again. The NF4
    dequantized weights are never kept (kernels/lora_op.py re-dequantizes in the backward pass).
    `extra_saves` (`KernelOptions.false_mode_saves`, which validates the names) keeps more: "lora_xa" the LoRA ops' `x @ Aᵀ`, "normed_inputs"
    the normed inputs of q/k/v and gate/up.
    """
    from fastlora_jax.kernels.lora_op import SAVED_LORA_XA
    from fastlora_jax.models.decoder import (
        SAVED_ATTENTION_INPUTS,
        SAVED_MID_RESIDUAL,
        SAVED_MLP_INPUTS,
        SAVED_NORMED_INPUTS,
        name_primitive,
    )
    extra_names = {"lora_xa": SAVED_LORA_XA, "normed_inputs": SAVED_NORMED_INPUTS}
    names = frozenset((SAVED_ATTENTION_INPUTS, SAVED_MID_RESIDUAL, SAVED_MLP_INPUTS,
                       *(extra_names[n] for n in extra_saves)))
    name_p = name_primitive()

    def policy(prim, *_, **params):
        if prim is name_p:
            return params["name"] in names
        return prim.name.startswith("dot_product_attention_fwd")  # cuDNN attention: output + softmax stats

    return policy


def step_options(options: KernelOptions, mode) -> KernelOptions:
    """The options a loss under `use_gradient_checkpointing=mode` traces with: `memory_lean` for "unsloth" and
    True; `host_offload_bytes` only for "unsloth", where None becomes 80% of the host memory available now if
    the backend offloads (so a run keeps on the device what pinned host memory cannot hold instead of failing).
    Several processes on one host each take that share: give them `host_offload_bytes` explicitly.
    For "unsloth" with `lean_offload="auto"` on a GPU it also times the device (`measured_device_rates`, once per
    process) for `flops_per_host_byte`; with several processes it does not (each would time its own and they
    could trace different programs), so "auto" offloads the layer inputs only unless the ratio is given."""
    if options.unroll_layers and mode is not False:
        raise ValueError(f"KernelOptions(unroll_layers=True) is for use_gradient_checkpointing=False; got "
                         f"use_gradient_checkpointing={mode!r}: unrolled, the \"unsloth\" mode of Llama-3.1-8B did "
                         "not finish its first step within 150 s on the H200 (benchmarks/README.md, session 14). Use "
                         "unroll_layers=False")
    options = replace(options, memory_lean=mode is not False)
    if mode != "unsloth":  # only "unsloth" offloads: the budget would change the other modes' policies
        return replace(options, host_offload_bytes=None)
    if options.host_offload_bytes is None and host_offload_supported():
        available = available_host_bytes()
        if available is not None:
            options = replace(options, host_offload_bytes=int(0.8 * available))
    if (options.lean_offload == "auto" and options.flops_per_host_byte is None and host_offload_supported()
            and jax.process_count() == 1):  # several processes would each time their own and could choose apart
        options = replace(options, flops_per_host_byte=measured_flops_per_host_byte())
    return options


def measured_flops_per_host_byte() -> float:
    """This device's bf16 matmul FLOP/s over its device-to-pinned-host copy bytes/s (`measured_device_rates`).
    `KernelOptions(lean_offload="auto")` offloads a layer's attention half when its forward pass does at least
    this many FLOPs per byte it sends to the host."""
    flops_per_s, bytes_per_s = measured_device_rates()
    return flops_per_s / bytes_per_s


@cache
def measured_device_rates(side: int = 8192, reps: int = 5) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device-to-pinned-host copy bytes/s) of this process's first device, each the best of
    `reps` timed runs (a `side`^2 matmul, a copy of one `side`^2 bf16 array: 128 MiB), measured once per process
    (about a second on an H200)."""
    import time
    device = jax.local_devices()[0]
    x = jax.device_put(jnp.ones((side, side), jnp.bfloat16), device)
    matmul = jax.jit(lambda a: a @ a)
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")

    def to_host(a):
        return jax.device_put(a, host)

    def best(fn):
        fn(x).block_until_ready()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn(x).block_until_ready()
            times.append(time.perf_counter() - start)
        return min(times)

    return 2.0 * side ** 3 / best(matmul), x.nbytes / best(to_host)


def available_host_bytes() -> int | None:
    """The host memory available to new allocations (Linux's MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_offload_supported() -> bool:
    try:
        kinds = jax.local_devices()[0].addressable_memories()
    except Exception:
        return False
    return jax.default_backend() == "gpu" and any(m.kind == "pinned_host" for m in kinds)


def shift_labels(labels_bs: jax.Array) -> jax.Array:
    """Position t predicts token t+1: labels move left by one and the last position is ignored (HF's loss)."""
    pad = jnp.full((labels_bs.shape[0], 1), IGNORE_INDEX, labels_bs.dtype)
    return jnp.concatenate([labels_bs[:, 1:], pad], axis=1)


def chunked_cross_entropy(hidden_nd: jax.Array, targets_n: jax.Array, logits_fn, chunk_tokens: int,
                          dropout_key=None):
    """(sum of token losses, number of counted tokens) over targets != -100, in fp32.

    `logits_fn(h_cd) -> [c, vocab]` is the output layer; each chunk's logits exist only inside the chunk
    and are recomputed in the backward pass. With `dropout_key` (LoRA dropout on the output layer) it is called
    as `logits_fn(h_cd, key)` with the key folded with the chunk's index: each chunk its own dropout mask (one
    key for all would repeat the mask every `chunk` tokens).
    """
    n, d = hidden_nd.shape
    chunk = min(chunk_tokens, n)
    pad = (-n) % chunk
    hidden_nd = jnp.pad(hidden_nd, ((0, pad), (0, 0)))
    targets_n = jnp.pad(targets_n, (0, pad), constant_values=IGNORE_INDEX)

    @jax.checkpoint
    def one_chunk(h_cd, t_c, i):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        logits = (logits_fn(h_cd) if key is None else logits_fn(h_cd, key)).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = t_c != IGNORE_INDEX
        target_logit = jnp.take_along_axis(logits, jnp.where(valid, t_c, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, lse - target_logit, 0.0)), jnp.sum(valid)

    def body(carry, xs):
        loss, count = one_chunk(*xs)
        return (carry[0] + loss, carry[1] + count), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    chunks = hidden_nd.shape[0] // chunk
    (total, count), _ = jax.lax.scan(body, init, (hidden_nd.reshape(chunks, chunk, d), targets_n.reshape(chunks, chunk),
                                                  jnp.arange(chunks)))
    return total, count


def head_vocab_tiles(vocab_size: int, hidden_size: int, memory_lean: bool) -> int:
    """Vocabulary tiles of the fused output-layer loss (a divisor of the vocabulary).

    Memory-lean modes: each tile's rows of the head at most 128 MiB in 16 bits. XLA's autotuner allocates a
    gemm's operands afresh when it compiles the step, so a gemm over the whole head (Qwen3-8B: 1.16 GiB) set the
    peak of the run before its first step (measured 7.55 GiB against 7.38 for the step itself). One tile
    otherwise (and where the vocabulary has no divisor that gives tiles of at least 256 rows)."""
    if not memory_lean:
        return 1
    max_rows = max(1, 2 ** 26 // max(hidden_size, 1))
    for tiles in range(1, vocab_size + 1):
        if vocab_size % tiles == 0 and vocab_size // tiles <= max_rows:
            return tiles if vocab_size // tiles >= 256 else 1
    return 1


def fused_head_cross_entropy(hidden_nd: jax.Array, weight_vd: jax.Array, targets_n: jax.Array, chunk_tokens: int,
                             softcap: float | None = None, vocab_tiles: int = 1):
    """`chunked_cross_entropy` for a frozen, plain output layer (`logits = h @ Wᵀ`), with the gradient
    w.r.t. the hidden states computed during the forward pass.

    Each chunk's logits are made once: the forward pass takes the loss and `dh = (softmax - onehot) @ W` from
    them and keeps only dh ([tokens, hidden], small); the backward pass scales it. The checkpointed version
    makes every chunk's logits twice (the output layer is 5-15% of a step's FLOPs). W gets no gradient, so
    this applies only when the head is not trained (no LoRA on lm_head, not in modules_to_save, and not tied
    to a trained embedding). `softcap` is Gemma 2's final-logit cap, `cap * tanh(logits / cap)` in the hidden
    dtype as HF computes it; its derivative `1 - tanh²` enters dlogits.

    `vocab_tiles` splits the vocabulary (it must divide it): the softmax runs online over the tiles (a running
    max and sum, as flash attention does), so each gemm reads one tile of W (`head_vocab_tiles` says why).
    """
    n, d = hidden_nd.shape
    vocab = weight_vd.shape[0]
    if vocab_tiles < 1 or vocab % vocab_tiles:
        raise ValueError(f"vocab_tiles={vocab_tiles!r} must be a positive divisor of the vocabulary size {vocab}")
    chunks = -(-n // max(1, min(chunk_tokens, n)))
    chunk = -(-n // chunks)  # equal chunks: the least padding for this many
    pad = chunks * chunk - n
    h_pad = jnp.pad(hidden_nd, ((0, pad), (0, 0)))
    t_pad = jnp.pad(targets_n, (0, pad), constant_values=IGNORE_INDEX)
    loss, count, _ = _fused_ce(softcap, vocab_tiles, h_pad.reshape(chunks, chunk, d), weight_vd,
                               t_pad.reshape(chunks, chunk))
    return loss, count


def _fused_ce_chunks(softcap, vocab_tiles, h_kcd, weight_vd, t_kc):
    w = weight_vd.astype(h_kcd.dtype)
    vocab, d = w.shape
    rows = vocab // vocab_tiles
    w_nvd = w.reshape(vocab_tiles, rows, d)
    starts_n = jnp.arange(vocab_tiles, dtype=jnp.int32) * rows

    def token_chunk(carry, xs):
        h_cd, t_c = xs
        valid = t_c != IGNORE_INDEX
        safe_t = jnp.where(valid, t_c, 0).astype(jnp.int32)

        def vocab_tile(state, xs_v):
            max_c, sum_c, acc_cd, target_c, target_grad_cd = state
            w_vd, start = xs_v
            raw = jnp.einsum("cd,vd->cv", h_cd, w_vd, preferred_element_type=h_cd.dtype)
            if softcap is not None:
                tanh = jnp.tanh(raw / jnp.asarray(softcap, raw.dtype))
                raw = tanh * jnp.asarray(softcap, raw.dtype)
            logits = raw.astype(jnp.float32)
            new_max = jnp.maximum(max_c, jnp.max(logits, axis=-1))
            rescale = jnp.exp(max_c - new_max)
            e = jnp.exp(logits - new_max[:, None])  # softmax numerators against the running max
            slope = None if softcap is None else 1.0 - jnp.square(tanh.astype(jnp.float32))
            de = e if slope is None else e * slope
            acc_cd = acc_cd * rescale[:, None] + jnp.einsum("cv,vd->cd", de.astype(h_cd.dtype), w_vd,
                                                              preferred_element_type=jnp.float32)
            local = safe_t - start
            here = (local >= 0) & (local < rows)
            local = jnp.clip(local, 0, rows - 1)
            target_c = jnp.where(here, jnp.take_along_axis(logits, local[:, None], axis=-1)[:, 0], target_c)
            coef = here.astype(jnp.float32) if slope is None else jnp.where(
                here, jnp.take_along_axis(slope, local[:, None], axis=-1)[:, 0], 0.0)
            target_grad_cd = target_grad_cd + coef[:, None] * w_vd[local].astype(jnp.float32)  # onehot's term
            return (new_max, sum_c * rescale + jnp.sum(e, axis=-1), acc_cd, target_c, target_grad_cd), None

        c = h_cd.shape[0]
        init = (jnp.full((c,), -jnp.inf, jnp.float32), jnp.zeros((c,), jnp.float32), jnp.zeros((c, d), jnp.float32),
                jnp.zeros((c,), jnp.float32), jnp.zeros((c, d), jnp.float32))
        (max_c, sum_c, acc_cd, target_c, target_grad_cd), _ = jax.lax.scan(vocab_tile, init, (w_nvd, starts_n))
        lse = max_c + jnp.log(sum_c)
        dh_cd = jnp.where(valid[:, None], acc_cd / sum_c[:, None] - target_grad_cd, 0.0).astype(h_cd.dtype)
        loss = jnp.sum(jnp.where(valid, lse - target_c, 0.0))
        return (carry[0] + loss, carry[1] + jnp.sum(valid)), dh_cd

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (loss, count), dh_kcd = jax.lax.scan(token_chunk, init, (h_kcd, t_kc))
    return loss, count, dh_kcd


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_ce(softcap, vocab_tiles, h_kcd, weight_vd, t_kc):
    return _fused_ce_chunks(softcap, vocab_tiles, h_kcd, weight_vd, t_kc)


def _fused_ce_fwd(softcap, vocab_tiles, h_kcd, weight_vd, t_kc):
    loss, count, dh_kcd = _fused_ce_chunks(softcap, vocab_tiles, h_kcd, weight_vd, t_kc)
    return (loss, count, dh_kcd), (dh_kcd, weight_vd, t_kc)


def _fused_ce_bwd(softcap, vocab_tiles, residuals, cotangents):
    dh_kcd, weight_vd, t_kc = residuals
    g_loss = cotangents[0]
    dh = (dh_kcd.astype(jnp.float32) * g_loss).astype(dh_kcd.dtype)
    return dh, None, None  # the head and the targets get no gradient


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def head_is_frozen(family, cfg, lora) -> bool:
    """True when the output layer gets no gradient: no LoRA/copy of it, and no trained tied embedding."""
    if lora is None:
        return True
    if family.OUTPUT_LAYER in lora:
        return False
    embed = lora
    for key in family.EMBED_TOKENS.split("."):
        embed = embed.get(key, {}) if isinstance(embed, dict) else {}
    return not (cfg.tie_word_embeddings and "weight" in embed)


def default_chunk_tokens(vocab_size: int, memory_lean: bool = True) -> int:
    """Tokens per loss chunk. Memory-lean modes ("unsloth", True): one chunk's fp32 logits near 128 MiB
    (with 256 MiB they set Llama-8B's peak). use_gradient_checkpointing=False: near 256 MiB, fewer and
    larger output-layer matmuls (measured: 64 MiB chunks cost 4% of a Llama-1B step)."""
    budget = 2 ** 25 if memory_lean else 2 ** 26
    return int(max(64, min(8192, budget // max(vocab_size, 1))))


def loss_sum_and_count(model, base, lora, meta, input_ids, labels, cos, sin, attention_mask, dropout_key, *,
                       compute_dtype, dropout_rate, remat, chunk_tokens, options: KernelOptions = DEFAULT_OPTIONS):
    """The traced core of compute_loss: (sum of token losses, counted tokens)."""
    from fastlora_jax.lora import combine
    family, cfg = model.family, model.cfg
    params = combine(base, lora, meta)
    hidden = family.hidden_states(cfg, params, input_ids, cos, sin, attention_mask, compute_dtype, dropout_key,
                                  dropout_rate, remat=remat, options=options)
    return output_layer_loss(family, cfg, params, lora, hidden, labels, dropout_key, dropout_rate, chunk_tokens,
                             options)


def output_layer_loss(family, cfg, params, lora, hidden_bsd, labels_bs, dropout_key, dropout_rate, chunk_tokens,
                      options: KernelOptions = DEFAULT_OPTIONS):
    """(loss sum, counted tokens) of the output layer over the final hidden states: the fused version when
    the head is frozen and plain, the checkpointed chunks otherwise (LoRA or a trained copy on the head).
    A final-logit soft-cap (`cfg.final_logit_softcap`, Gemma 2) applies in both."""
    from fastlora_jax import sharding
    from fastlora_jax.models.decoder import linear_module
    head = family.lm_head_module(cfg, params)
    softcap = getattr(cfg, "final_logit_softcap", None)
    targets = shift_labels(labels_bs)
    b, s, d = hidden_bsd.shape
    frozen_plain = head_is_frozen(family, cfg, lora) and set(head) == {"weight"} and \
        not hasattr(head["weight"], "dequantize")
    vocab = head["weight"].shape[0] if frozen_plain else cfg.vocab_size
    tiles = head_vocab_tiles(vocab, d, options.memory_lean) if frozen_plain else 1
    chunk_tokens = chunk_tokens or default_chunk_tokens(vocab // tiles, options.memory_lean)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers)

    def logits_fn(h, key=None):
        return kernels.softcap(linear_module(h, head, key, dropout_rate, options), softcap)

    def loss_of(h_nd, t_n, group):
        if frozen_plain:  # FSDP: the (vocab- or hidden-sharded) head whole, each device multiplying its own tokens
            return fused_head_cross_entropy(h_nd, sharding.gathered(head["weight"]), t_n, chunk_tokens, softcap,
                                            tiles)
        # Dropout on a LoRA'd head: a mask per chunk, and per group under a mesh (so it depends on the mesh,
        # unlike the decoder layers', which are drawn over the whole batch).
        key = None if head_key is None else jax.random.fold_in(head_key, group)
        return chunked_cross_entropy(h_nd, t_n, logits_fn, chunk_tokens, key)

    groups = sharding.batch_groups(b)
    if groups == 1:
        return loss_of(hidden_bsd.reshape(b * s, d), targets.reshape(b * s), 0)
    # Under a mesh each device takes the loss of its own rows: the chunk scan runs over each group's tokens
    # (a scan over tokens split across devices would gather them all onto every device).
    h_gnd = sharding.split_rows(hidden_bsd.reshape(groups, (b // groups) * s, d))
    t_gn = sharding.split_rows(targets.reshape(groups, (b // groups) * s))
    loss_g, count_g = jax.vmap(loss_of)(h_gnd, t_gn, jnp.arange(groups))
    return jnp.sum(loss_g), jnp.sum(count_g)


# ------------------------------------------------------------------------------------------ optimizer


def make_optimizer(learning_rate=2e-4, weight_decay=0.01, warmup_steps=0, total_steps=None,
                   lr_scheduler_type="linear", max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
                   adam_epsilon=1e-8) -> optax.GradientTransformation:
    """AdamW with HF Trainer's defaults and schedules ("linear", "cosine", "constant"), warm-up, clipping."""
    if lr_scheduler_type not in ("linear", "cosine", "constant"):
        raise ValueError(f"lr_scheduler_type={lr_scheduler_type!r} is not accepted; use 'linear', 'cosine' or 'constant'")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate!r}")
    decay_steps = max((total_steps or 1) - warmup_steps, 1)
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else None
    if lr_scheduler_type == "linear" and total_steps:
        main = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif lr_scheduler_type == "cosine" and total_steps:
        main = optax.cosine_decay_schedule(learning_rate, decay_steps)
    else:
        main = optax.constant_schedule(learning_rate)
    schedule = optax.join_schedules([warm, main], [warmup_steps]) if warm is not None else main
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon, weight_decay=weight_decay))
    return optax.chain(*parts)


MICRO_BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "vision")


def prepare_micro_batch(model, batch) -> dict:
    """One micro-batch as the loss takes it: `input_ids`, `labels`, optional `attention_mask` (`[B, S]`) and,
    for a vision-language model, `position_ids [3, B, S]` and `vision` (`VisionCausalLM.prepare_inputs`).

    A collator's output (`UnslothVisionDataCollator`: `pixel_values`, `image_grid_thw`, `mm_token_type_ids`) goes
    through `model.prepare_training_batch`; an already prepared micro-batch is kept as it is."""
    if not hasattr(batch, "keys"):
        raise TypeError(f"a micro-batch must be a dict of arrays; got {type(batch).__name__}")
    if any(k in batch for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")):
        if not hasattr(model, "prepare_training_batch"):
            raise ValueError("the batch holds images (pixel_values / image_grid_thw) but the model is a text model; "
                             "load a vision-language model with FastVisionModel.from_pretrained")
        return model.prepare_training_batch(batch)
    missing = [k for k in ("input_ids", "labels") if batch.get(k) is None]
    if missing:
        raise ValueError(f"the batch has no {missing}; it needs input_ids and labels (-100 = not trained on)")
    return {k: _from_torch(batch[k]) for k in MICRO_BATCH_KEYS if batch.get(k) is not None}


def _from_torch(x):
    """A torch tensor as numpy (jit takes numpy and jax arrays, which stay as they are: no host round trip)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


# XLA options of the compiled step (ignored off the GPU).
# - Dynamic-slice fusion lets a cuBLAS gemm read a layer's slice of a stacked array and write its output straight
#   into the scan's stacked residuals, without a copy each way (Llama-8B, False mode: 301.6 -> 297.2 ms per step,
#   H100).
# - Not xla_gpu_enable_pipelined_host_offloading (the reload of an offloaded layer input one scan iteration ahead):
#   on the H200 it made "unsloth" slower (Llama-8B 2 x 2048: 11,098 against 11,226 tokens/s; 1 x 32768 with the
#   attention offload: 6,896 against 7,350 tokens/s and 10.6 against 9.2 GiB).
XLA_STEP_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True}

# A step that offloads to the host ("unsloth" on a GPU) also leaves dynamic-slice fusions out of XLA's command buffers:
# the copies of the offloaded layer inputs are such fusions (a layer's slice of the stacked host buffer), and recorded
# into a command buffer they ran on the compute stream, between the kernels (the H200 profile of Llama-8B 2 x 2048
# under PGLE, which left the schedule as it was: 39 of its 40 ms of host copies with no kernel running beside them).
# Outside, they run on copy streams of their own (1.8 ms exposed) and the step is 5.5-6.5% faster: 11,951 against
# 11,226-11,333 tokens/s with the defaults, the same 6.97 GiB peak (measured with the setting given as XLA_FLAGS).
# The value is this XLA's default list (FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN, CONDITIONAL,
# DYNAMIC_SLICE_FUSION) without the last one, in full: compiler options take no "-NAME" form.
# tests/test_host_offload_budget.py checks it against the default of the installed XLA.
HOST_OFFLOAD_STEP_OPTIONS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL"}


def step_compiler_options(mode, compiler_options: dict | None = None) -> dict:
    """The XLA options a training step under `use_gradient_checkpointing=mode` compiles with: `XLA_STEP_OPTIONS`,
    `HOST_OFFLOAD_STEP_OPTIONS` where the step offloads to the host ("unsloth" where the backend can), then
    `compiler_options` over both.

    Compiler options win over XLA_FLAGS, so an option the user already sets in XLA_FLAGS (e.g. command buffers
    turned off to work around a CUDA-graph problem) is left to the user's value rather than overridden here."""
    if compiler_options is not None and not isinstance(compiler_options, dict):
        raise ValueError(f"compiler_options must be None or a dict of XLA option names to values, got "
                         f"{type(compiler_options).__name__}")
    offloads = mode == "unsloth" and host_offload_supported()
    ours = {**XLA_STEP_OPTIONS, **(HOST_OFFLOAD_STEP_OPTIONS if offloads else {})}
    user_flags = os.environ.get("XLA_FLAGS", "").split()
    ours = {name: value for name, value in ours.items()
            if not any(flag == f"--{name}" or flag.startswith(f"--{name}=") for flag in user_flags)}
    return {**ours, **(compiler_options or {})}


def make_train_step(model, optimizer: optax.GradientTransformation, compiler_options: dict | None = None):
    """`step(lora_params, opt_state, batch, dropout_key) -> (lora_params, opt_state, metrics)`, jitted once per shape.

    `compiler_options`: XLA options over the step's own (`step_compiler_options`), e.g. to time without one of them.

    `batch` is either

    - a dict of `input_ids`, `labels` and optionally `attention_mask`, each `[accum, micro_batch, seq]` (and,
      for a vision-language model without images, optionally `position_ids [accum, 3, micro_batch, seq]`):
      the micro-batches run under one `lax.scan` inside one jitted step; or
    - a list of micro-batches, each a dict of `[micro_batch, seq]` arrays as `prepare_micro_batch` takes them
      (a collator's output with images included). This is the form for images: micro-batches differ in their
      patch counts (and lengths), so they cannot be stacked for a scan. One micro-batch runs as the fused step
      above (gradient and update in one jitted call); several run one jitted gradient call each (compiled once
      per distinct shape), summed on the device, then one jitted update.

    Either way gradients are summed over the micro-batches and divided by the total number of counted tokens,
    so accumulation gives the same update as one batch of all the rows; micro-batch `i` gets the dropout key
    `split(dropout_key, accum)[i]` in both forms.

    On a model with a mesh (`model.mesh`, fastlora_jax.sharding) the step runs over it: the batch is the global
    one (every process passes the same), split over the mesh's batch axes (`sharding.put_batch`); LoRA params
    and optimizer state stay replicated, and XLA reduces the loss and the gradients over the devices.
    """
    from fastlora_jax import sharding
    loss_fn = model.loss_sum_fn()
    mesh = model.mesh

    def grads_of(base_params, lora_params, mb, key):
        extra = {k: mb[k] for k in ("position_ids", "vision") if mb.get(k) is not None}
        (loss, count), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            base_params, lora_params, mb["input_ids"], mb["labels"], mb.get("attention_mask"), key, **extra)
        return loss, count, grads

    def update(lora_params, opt_state, grads, loss_total, count):
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, opt_state, lora_params)
        lora_params = optax.apply_updates(lora_params, updates)
        metrics = {"loss": loss_total / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
        if mesh is not None:  # replicated in, replicated out: the next step reuses this compilation
            lora_params, opt_state = jax.lax.with_sharding_constraint((lora_params, opt_state),
                                                                      sharding.replicated(mesh))
        return lora_params, opt_state, metrics

    def step(base_params, lora_params, opt_state, batch, dropout_key):
        accum = batch["input_ids"].shape[0]
        keys = jax.random.split(dropout_key, accum) if dropout_key is not None else None

        def micro(carry, xs):
            grads_sum, loss_sum, count_sum = carry
            mb, key = xs
            loss, count, grads = grads_of(base_params, lora_params, mb, key)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, count_sum + count), None

        if accum == 1:  # no accumulation buffer: one fewer copy of the LoRA gradients in memory
            mb = {k: v if k == "vision" else v[0] for k, v in batch.items() if v is not None}
            loss_total, count, grads = grads_of(base_params, lora_params, mb, None if keys is None else keys[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, lora_params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, loss_total, count), _ = jax.lax.scan(micro, init, (batch, keys))
        return update(lora_params, opt_state, grads, loss_total, count)

    xla_options = step_compiler_options(getattr(model, "use_gradient_checkpointing", False), compiler_options)
    jitted = jax.jit(step, donate_argnums=(1, 2), compiler_options=xla_options)
    jitted_grads = jax.jit(grads_of, compiler_options=xla_options)
    jitted_add = jax.jit(lambda total, new: jax.tree.map(jnp.add, total, new), donate_argnums=0)
    jitted_update = jax.jit(update, donate_argnums=(0, 1))

    def train_step(lora_params, opt_state, batch, dropout_key):
        with sharding.use_mesh(mesh):
            return run(lora_params, opt_state, batch, dropout_key)

    def run(lora_params, opt_state, batch, dropout_key):
        if isinstance(batch, (list, tuple)):
            if not batch:
                raise ValueError("batch is an empty list of micro-batches")
            mbs = [prepare_micro_batch(model, mb) for mb in batch]
            if len(mbs) == 1:
                stacked = {k: v if k == "vision" else v[None] for k, v in mbs[0].items()}
                return jitted(model.base_params, lora_params, opt_state, sharding.put_batch(stacked, mesh),
                              dropout_key)
            keys = jax.random.split(dropout_key, len(mbs)) if dropout_key is not None else None
            total = None
            for i, mb in enumerate(mbs):
                out = jitted_grads(model.base_params, lora_params, sharding.put_batch(mb, mesh),
                                   None if keys is None else keys[i])
                total = out if total is None else jitted_add(total, out)
            loss_total, count, grads = total
            return jitted_update(lora_params, opt_state, grads, loss_total, count)
        if any(k in batch for k in ("pixel_values", "image_grid_thw")) or (
                batch.get("vision") is not None and np.shape(batch["input_ids"])[0] != 1):
            raise ValueError("a batch with images goes to the train step as a list of micro-batches "
                             "(e.g. [collator(examples)]): micro-batches with different patch counts cannot be "
                             "stacked into [accum, micro_batch, seq] arrays")
        return jitted(model.base_params, lora_params, opt_state, sharding.put_batch(batch, mesh), dropout_key)

    train_step.jitted = jitted  # (base, lora, opt_state, batch, key): for .lower() / HLO inspection
    return train_step
