"""The LoRA linear op with a hand-written VJP: `y = x @ deq(W)ᵀ + s · (x_lora @ Aᵀ) @ Bᵀ (+ bias)`.

Why a custom VJP: left to autodiff, XLA keeps what the forward computed for the backward, and with an
NF4 base that includes the bf16 dequantized weight of every layer (the whole model again, in 16 bits).
Here the backward re-dequantizes W (or runs the fused NF4 kernel) and the only residuals are the
inputs (`x`, the stored NF4 `W`, `A`, `B`) plus `x_lora @ Aᵀ` ([tokens, r], tiny). Under a
`jax.checkpoint` policy those inputs are saved or recomputed like any other activation.

Gradients (g = dy, s = scaling, xa = x_lora @ Aᵀ, gb = g @ B):
  dx      = g @ deq(W) + s · gb @ A      (the LoRA term flows to x_lora; dropout's mask is applied outside)
  dA      = s · gbᵀ @ x_lora
  dB      = s · gᵀ @ xa
  dbias   = Σ g
The base weight and the scaling are frozen: their cotangents are zeros (dropped, never computed).

DoRA goes through the reference (`reference.lora_linear`), which autodiff handles.

With an NF4 base the LoRA branch is folded into the base matmul as R extra contraction columns
(`_folded_core`, below): one forward gemm per group with use_gradient_checkpointing=False, one per module in the
memory-lean modes (`KernelOptions.memory_lean`). `KernelOptions(lora_fold=False)` turns folding off (for A/B timing). The options are a
static argument of every op here and a non-differentiable argument of the custom VJPs, so that a backward
rule makes the choices of its forward.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax.kernels import reference
from fastlora_jax.kernels.options import DEFAULT, KernelOptions
from fastlora_jax.quant import NF4Weight
from fastlora_jax.sharding import gathered, local_rows, per_device_rows

# The name of each LoRA op's `x @ Aᵀ` residual, for checkpoint policies (KernelOptions.false_mode_saves "lora_xa":
# kept, the backward does not run that gemm again, which reads the whole input for a few rank columns).
SAVED_LORA_XA = "lora_xa"


def dense_base_weight(weight_oi, dtype, options: KernelOptions = DEFAULT) -> jax.Array:
    """The base weight `[out, in]` in `dtype`; NF4 dequantized in ONE pass (bytes in, `dtype` out).

    Same values as `NF4Weight.dequantize` (`quant_map[code] * scale` in fp32, rounded once), written so
    that XLA makes it a single elementwise kernel: the 16-entry lookup is a 4-level select tree on the
    code's bits instead of a gather, and the two values of a byte's nibbles are packed into one 32-bit
    word (16-bit dtypes). The generic path (a gather and an interleave) took ~60 ms per Llama-8B step.
    """
    weight_oi = gathered(weight_oi)  # FSDP: this layer's weight whole (a no-op without a mesh)
    if not isinstance(weight_oi, NF4Weight):
        return weight_oi.astype(dtype)
    if not _one_pass_dequantizes(weight_oi):
        return weight_oi.dequantize(dtype)
    pair = _dequantized_pairs(weight_oi, dtype, _table_lookup(options))  # [out, in / 2, 2]
    return pair.reshape(weight_oi.weight_shape)


def _one_pass_dequantizes(weight) -> bool:
    shape = weight.weight_shape
    return not weight.stack_shape and len(shape) == 2 and weight.blocksize == 64 and shape[1] % 64 == 0


def _table_lookup(options: KernelOptions) -> bool:
    """Whether the one-pass dequantize of a weight multiplied on its own (not folded with its LoRA B: down_proj, the
    folds' fallbacks) looks the 16 NF4 values up as an indexed load, else a select tree: `options.nf4_lookup`,
    where "auto" keeps the select tree for the memory-lean modes."""
    if options.nf4_lookup == "auto":
        return not options.memory_lean
    return options.nf4_lookup == "table"


def _folded_table_lookup(options: KernelOptions) -> bool:
    """The same for a weight folded with its LoRA B (`_folded_weight`: q/k/v, o, gate/up): an indexed load in every
    mode unless `options.nf4_lookup` is "select"."""
    return options.nf4_lookup != "select"


def _dequantized_pairs(weight_oi: NF4Weight, dtype, table: bool) -> jax.Array:
    """`[out, in / 2, 2]`: each byte's two dequantized values; for 16-bit dtypes a bitcast of one 32-bit
    word per pair (`_dequantized_words`), so that XLA keeps the whole dequantize one elementwise kernel."""
    if jnp.dtype(dtype).itemsize == 2:
        return lax.bitcast_convert_type(_dequantized_words(weight_oi, dtype, table), dtype)
    first, second = _dequantized_halves(weight_oi, dtype, table)
    return jnp.stack([first, second], axis=-1).reshape(weight_oi.weight_shape[0], -1, 2)


def _dequantized_halves(weight_oi: NF4Weight, dtype, table: bool):
    weight_oi = gathered(weight_oi)
    out_dim, in_dim = weight_oi.weight_shape
    scale_ob = weight_oi.absmax_f32().reshape(out_dim, in_dim // 64)
    packed_obj = weight_oi.packed.reshape(out_dim, in_dim // 64, 32)
    values = jnp.asarray(weight_oi.quant_map, jnp.float32)
    scale = scale_ob[:, :, None]
    first = (_lookup16(values, packed_obj >> 4, table) * scale).astype(dtype)  # the high nibble comes first
    second = (_lookup16(values, packed_obj & 0xF, table) * scale).astype(dtype)
    return first.reshape(out_dim, in_dim // 2), second.reshape(out_dim, in_dim // 2)


def _dequantized_words(weight_oi: NF4Weight, dtype, table: bool) -> jax.Array:
    """`[out, in / 2]` uint32: a byte's two 16-bit values packed low-first (little-endian GPUs and CPUs)."""
    first, second = _dequantized_halves(weight_oi, dtype, table)
    return (lax.bitcast_convert_type(first, jnp.uint16).astype(jnp.uint32)
            | (lax.bitcast_convert_type(second, jnp.uint16).astype(jnp.uint32) << 16))


def _lookup16(table_16, code, indexed: bool):
    """`table[code]` for 4-bit codes: `indexed`, an indexed load of the 16-entry table, fused into the dequantize
    kernel (Llama-8B 2 x 2048 False: 291.7 -> 283.1 ms per step against a 4-level select tree, H100; the dequantize
    alone 3.1 against 1.9 TB/s on the H200); else the select tree (the memory-lean default: the indexed load raised
    the memory-lean peak by 9 MB on the H100)."""
    if indexed:
        return table_16.at[code.astype(jnp.int32)].get(mode="promise_in_bounds")
    level = [table_16[i] for i in range(16)]
    for bit in range(4):
        on = (code & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def lean_row_tiles(weight_oi, dtype, options: KernelOptions = DEFAULT) -> tuple[tuple[int, int], ...] | None:
    """Row ranges `(start, stop)` in which the memory-lean modes dequantize an NF4 weight and multiply by it, or
    None for the whole weight at once.

    Why: a module's dequantized weight is a transient of each of its gemms (forward, recompute, backward), and the
    largest ones set the step's peak: Phi-4's fused gate_up is 350 MiB in bf16, live together with the MLP's
    [tokens, 35840] activations and their gradient. Split by output rows into tiles of at most about
    `options.lean_weight_tile_bytes` (128 MiB), only one tile is alive at a time (Phi-4 1 x 2048: 10.35 -> 10.26
    GiB, 3.7% slower); the outputs are concatenated (forward) and the dx terms summed in the compute dtype
    (backward: one rounding per tile more than one gemm's fp32 accumulation; an fp32 sum would hold a [tokens, in]
    fp32 buffer). Equal tiles (a multiple of 8 rows) where up to twice the least count gives them, else the least
    count with a shorter last tile."""
    if not (options.memory_lean and isinstance(weight_oi, NF4Weight) and _one_pass_dequantizes(weight_oi)):
        return None
    out_dim, in_dim = weight_oi.weight_shape
    nbytes = out_dim * in_dim * jnp.dtype(dtype).itemsize
    least = -(-nbytes // options.lean_weight_tile_bytes)
    if least <= 1:
        return None
    rows = next((out_dim // n for n in range(least, 2 * least + 1) if out_dim % n == 0 and (out_dim // n) % 8 == 0),
                -(-out_dim // (8 * least)) * 8)  # else ceil(out / least) rounded up to a multiple of 8
    if rows >= out_dim:
        return None
    return tuple((a, min(a + rows, out_dim)) for a in range(0, out_dim, rows))


def _weight_tiles(weight_oi, dtype, options: KernelOptions):
    """`[(start, stop, W rows)]`: the tiles of `lean_row_tiles`, or the whole weight as one."""
    tiles = lean_row_tiles(weight_oi, dtype, options)
    if tiles is None:
        return [(0, None, weight_oi)]
    whole = gathered(weight_oi)  # FSDP: gathered once, then sliced
    whole = whole.rows(0, whole.weight_shape[0])  # the scales decoded once (double quant), not once per tile
    return [(a, b, whole.rows(a, b)) for a, b in tiles]


def _tie(weights, value):
    """`(weights, value)` such that what reads the returned weights runs after `value` exists (and is not merged
    with an earlier read of the same weights, e.g. the recompute's dequantize). `weights`: one or a tuple/list.

    An NF4 weight is tied through a runtime zero: its bytes XOR a uint8 zero that comes out of an optimization
    barrier with `value`. The XOR fuses into the dequantize kernel, so the bytes stay a slice of the layer stack;
    the weight itself through the barrier made XLA copy them out first (Phi-4's gate_up, 88 MiB, held through a
    layer's whole backward), and tying only the scales let XLA share the scale-free half of the dequantize
    between the recompute and the backward, and keep it. Other weights go through the barrier whole."""
    many = isinstance(weights, (tuple, list))
    ws = list(weights) if many else [weights]
    held = [None if isinstance(w, NF4Weight) else w for w in ws]
    (zero, held), value = lax.optimization_barrier(((jnp.zeros((), jnp.uint8), held), value))
    tied = [_xor_bytes(w, zero) if isinstance(w, NF4Weight) else h for w, h in zip(ws, held)]
    return (type(weights)(tied) if many else tied[0]), value


def _xor_bytes(weight: NF4Weight, zero) -> NF4Weight:
    children, aux = weight.tree_flatten()
    return NF4Weight.tree_unflatten(aux, (children[0] ^ zero,) + tuple(children[1:]))


def _tile_outputs(tiles, product) -> list:
    """`[product(start, stop, W rows)]` over `tiles`, one tile at a time: tile i+1's weight is tied to tile i's
    output (`_tie`), so its dequantize runs only after tile i's gemm.

    Why: XLA schedules independent dequantize kernels early; Phi-4's four gate_up tiles (4 x 88 MiB, folded with
    B) were all alive before the first gemm in the backward, which undid the tiling. (The GPU runs the kernels
    one after another either way: the order costs no overlap.)"""
    outs = []
    for a, b, w in tiles:
        if outs:
            w, outs[-1] = _tie(w, outs[-1])
        outs.append(product(a, b, w))
    return outs


def _tile_sum(tiles, product, total=None):
    """`total + sum(product(start, stop, W rows))`, a running sum in the compute dtype; each tile's weight is tied
    to the sum so far (as in `_tile_outputs`: one dequantized tile alive, one `[tokens, in]` partial sum)."""
    for a, b, w in tiles:
        if total is not None:
            w, total = _tie(w, total)
        term = product(a, b, w)
        total = term if total is None else total + term
    return total


def base_matmul(x_ti: jax.Array, weight_oi, options: KernelOptions = DEFAULT) -> jax.Array:
    """`x @ deq(W)ᵀ` in x's dtype (fp32 accumulation): the fused NF4 kernel where chosen and supported, else XLA."""
    if _use_nf4_kernel(x_ti, weight_oi, options, transposed=False):
        from fastlora_jax.kernels import nf4_matmul
        # Under a mesh: per device, on its own rows, with the weight gathered (shard_map).
        return per_device_rows(lambda x, w: nf4_matmul.nf4_matmul(x, w, impl="pallas"), x_ti, weight_oi)
    ys = _tile_outputs(_weight_tiles(weight_oi, x_ti.dtype, options), lambda a, b, w: jnp.einsum(
        "ti,oi->to", x_ti, dense_base_weight(w, x_ti.dtype, options), preferred_element_type=x_ti.dtype))
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)


def base_matmul_t(g_to: jax.Array, weight_oi, options: KernelOptions = DEFAULT) -> jax.Array:
    """`g @ deq(W)` (the backward's dx through the base weight)."""
    if _use_nf4_kernel(g_to, weight_oi, options, transposed=True):
        from fastlora_jax.kernels import nf4_matmul
        return per_device_rows(lambda g, w: nf4_matmul.nf4_matmul_t(g, w, impl="pallas"), g_to, weight_oi)
    return _tile_sum(_weight_tiles(weight_oi, g_to.dtype, options), lambda a, b, w: jnp.einsum(
        "to,oi->ti", g_to[:, a:b], dense_base_weight(w, g_to.dtype, options), preferred_element_type=g_to.dtype))


def _use_nf4_kernel(a_tx, weight, options: KernelOptions, *, transposed: bool) -> bool:
    """`KernelOptions(nf4_matmul="pallas")` selects the fused Pallas kernel (kernels/nf4_matmul.py) on a GPU, for
    bf16 activations and shapes it supports (the rows each device holds under a mesh); XLA's one-pass
    dequantize + cuBLAS otherwise."""
    if options.nf4_matmul != "pallas" or not isinstance(weight, NF4Weight) or jax.default_backend() != "gpu":
        return False
    if a_tx.dtype != jnp.bfloat16 or weight.stack_shape or len(weight.weight_shape) != 2:
        return False
    from fastlora_jax.kernels import nf4_matmul
    n, k = weight.weight_shape
    return nf4_matmul.supported(local_rows(a_tx.shape[0]), n, k, transposed=transposed)


def _zeros_like_tree(tree):
    def zero(leaf):
        if leaf is None:
            return None
        if jnp.issubdtype(leaf.dtype, jnp.integer) or leaf.dtype == jnp.bool_:
            return np.zeros(leaf.shape, jax.dtypes.float0)
        return jnp.zeros(leaf.shape, leaf.dtype)
    return jax.tree.map(zero, tree)


def _just_in_time(options: KernelOptions, weights, gs):
    """The backward's base weights tied to its cotangents in the memory-lean modes.

    There the layer's forward is recomputed inside the backward, and XLA merges the recompute's dequantize of
    W with the backward's (the same op on the same input): every weight of the layer then stays dequantized
    from the recompute until its backward gemm (Phi-4: q/k/v and o held through the MLP's backward). Tied to g
    (`_tie`), the backward dequantizes W again, right before it is used. With the layers unrolled
    (`KernelOptions.unroll_layers`) the forward and the backward are one program even without a recompute, and
    XLA merges their dequantizes the same way (Llama-3.1-8B 2 x 2048 False: every bf16 weight held, 32.1 GiB
    against 18.2 scanned, on the H200), so they are tied there too."""
    if not (options.memory_lean or options.unroll_layers):
        return weights, gs
    return _tie(weights, gs)


def _folds_lora_into_dx(weight_oi, g_to, options: KernelOptions) -> bool:
    """The backward of an unfolded NF4 linear (down_proj) computes `dx` in one gemm (`_dx_with_lora`), in every mode:
    the dequantized weight is written anyway. (use_gradient_checkpointing=False had the LoRA term as a [tokens,
    intermediate] gemm output of its own, 1.2 ms of a Llama-8B 2 x 2048 step on the H200; folded, that gemm is
    gone and `[g | gb]` costs a [tokens, out] copy, 0.7 ms.)"""
    return (options.lora_fold and isinstance(weight_oi, NF4Weight)
            and not _use_nf4_kernel(g_to, weight_oi, options, transposed=True))


def _dx_with_lora(g_to, gb_tr, weight_oi, a_ri, options: KernelOptions):
    """`g @ deq(W) + gb @ A` as ONE gemm, `[g | gb] @ [[deq(W)]; [A]]`: A's rows below W's, written by the
    dequantize kernel itself. Unfused, the LoRA term is a second `[tokens, in]` output (down_proj: tokens x
    intermediate) beside the base term, both live until their add."""
    dtype = g_to.dtype
    (a0, b0, w0), *rest = _weight_tiles(weight_oi, dtype, options)  # A goes below the first tile
    if jnp.dtype(dtype).itemsize == 2 and _one_pass_dequantizes(w0) and a_ri.shape[1] % 2 == 0:
        words = jnp.concatenate([_dequantized_words(w0, dtype, _table_lookup(options)),
                                 _as_words(a_ri.astype(dtype))], axis=0)
        w_ki = lax.bitcast_convert_type(words, dtype).reshape(words.shape[0], -1)
    else:
        w_ki = jnp.concatenate([dense_base_weight(w0, dtype, options), a_ri.astype(dtype)], axis=0)
    g_folded = jnp.concatenate([g_to[:, a0:b0], gb_tr.astype(dtype)], axis=1)
    dx = jnp.einsum("tk,ki->ti", g_folded, w_ki, preferred_element_type=dtype)
    return _tile_sum(rest, lambda a, b, w: jnp.einsum(
        "to,oi->ti", g_to[:, a:b], dense_base_weight(w, dtype, options), preferred_element_type=dtype), dx)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_linear_core(options, x_ti, x_lora_ti, weight_oi, a_ri, b_or, scaling):
    """`x_lora_ti` is None when there is no dropout (the LoRA branch reads x itself: one residual, not two).
    `options` (KernelOptions) is static: the backward rule makes the forward's kernel choices."""
    y, _ = _core_fwd(options, x_ti, x_lora_ti, weight_oi, a_ri, b_or, scaling)
    return y


def _core_fwd(options, x_ti, x_lora_ti, weight_oi, a_ri, b_or, scaling):
    # Everything in x's dtype (as PEFT computes it): XLA then fuses the add of the LoRA term into a
    # neighbour (the consumer's kernel, or the gemm as its accumulator) instead of an fp32 pass of its own.
    x_in = x_ti if x_lora_ti is None else x_lora_ti
    xa_tr = jnp.einsum("ti,ri->tr", x_in, a_ri, preferred_element_type=jnp.float32).astype(x_ti.dtype)
    xa_scaled_tr = (xa_tr.astype(jnp.float32) * scaling.astype(jnp.float32)).astype(x_ti.dtype)
    lora_to = jnp.einsum("tr,or->to", xa_scaled_tr, b_or, preferred_element_type=x_ti.dtype)
    y = base_matmul(x_ti, weight_oi, options) + lora_to
    return y, (x_ti, x_lora_ti, weight_oi, a_ri, b_or, scaling, checkpoint_name(xa_tr, SAVED_LORA_XA))


def _core_bwd(options, residuals, g_to):
    x_ti, x_lora_ti, weight_oi, a_ri, b_or, scaling, xa_tr = residuals
    weight_oi, g_to = _just_in_time(options, weight_oi, g_to)
    x_in = x_ti if x_lora_ti is None else x_lora_ti
    s = scaling.astype(jnp.float32)
    gb_tr = (jnp.einsum("to,or->tr", g_to, b_or, preferred_element_type=jnp.float32) * s).astype(g_to.dtype)
    da = jnp.einsum("tr,ti->ri", gb_tr, x_in, preferred_element_type=jnp.float32).astype(a_ri.dtype)
    db = (jnp.einsum("to,tr->or", g_to, xa_tr, preferred_element_type=jnp.float32) * s).astype(b_or.dtype)
    rest = (_zeros_like_tree(weight_oi), da, db, jnp.zeros_like(scaling))  # W and scaling are frozen
    if x_lora_ti is None and _folds_lora_into_dx(weight_oi, g_to, options):
        return (_dx_with_lora(g_to, gb_tr, weight_oi, a_ri, options), None) + rest
    dx_lora = jnp.einsum("tr,ri->ti", gb_tr, a_ri, preferred_element_type=x_ti.dtype)
    if x_lora_ti is None:
        return (base_matmul_t(g_to, weight_oi, options) + dx_lora, None) + rest
    return (base_matmul_t(g_to, weight_oi, options), dx_lora) + rest


_lora_linear_core.defvjp(_core_fwd, _core_bwd)


def lora_linear(x_bsi: jax.Array, module: dict, dropout_key=None, dropout_rate: float = 0.0, *,
                options: KernelOptions = DEFAULT) -> jax.Array:
    """A linear module with its LoRA branch (PEFT's `lora.Linear.forward`), with the memory-lean VJP above.

    Same contract as `reference.lora_linear`: `module` holds `weight` [out, in] (dense or NF4), optional
    `bias`, `lora_A` [r, in], `lora_B` [out, r], `scaling`; dropout applies to the LoRA input only.
    """
    if "lora_magnitude_vector" in module:
        return reference.lora_linear(x_bsi, module, dropout_key, dropout_rate)
    lead = x_bsi.shape[:-1]
    x_ti = x_bsi.reshape(-1, x_bsi.shape[-1])
    x_lora_ti = None
    if dropout_key is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x_ti.shape)
        x_lora_ti = jnp.where(keep, x_ti / (1.0 - dropout_rate), 0).astype(x_ti.dtype)
    elif folds_into_base(x_ti.shape[-1], [module], options):
        return lora_linear_group(x_bsi, [module], options=options)[0]
    a_ri = module["lora_A"].astype(x_ti.dtype)
    b_or = module["lora_B"].astype(x_ti.dtype)
    scaling = jnp.asarray(module["scaling"])
    y_to = _lora_linear_core(options, x_ti, x_lora_ti, module["weight"], a_ri, b_or, scaling)
    if module.get("bias") is not None:
        y_to = y_to + module["bias"].astype(y_to.dtype)
    return y_to.reshape(*lead, y_to.shape[-1])


# ------------------------------------------------------------------------------------------------
# Several LoRA linears that read the same input (q/k/v, gate/up): one pass over x for all their A's.


def lora_linear_group(x_bsi: jax.Array, modules: list[dict], *, options: KernelOptions = DEFAULT) -> list[jax.Array]:
    """`[lora_linear(x, m) for m in modules]` for modules that share their input, without dropout or DoRA.

    Why: the LoRA branch is memory-bound (rank 16 against thousands of features). Concatenating the A's
    reads x once for all `x @ Aᵀ` products, once for all `dA`, and writes one `dx` term instead of one per
    module. The math per module is `lora_linear`'s.
    """
    lead = x_bsi.shape[:-1]
    x_ti = x_bsi.reshape(-1, x_bsi.shape[-1])
    dtype = x_ti.dtype
    a_cat = jnp.concatenate([m["lora_A"].astype(dtype) for m in modules], axis=0)
    ranks = tuple(int(m["lora_A"].shape[0]) for m in modules)
    core = _folded_core if folds_into_base(x_ti.shape[-1], modules, options) else _group_core
    ys = core(options, ranks, x_ti, tuple(m["weight"] for m in modules), a_cat,
              tuple(m["lora_B"].astype(dtype) for m in modules),
              tuple(jnp.asarray(m["scaling"]) for m in modules))
    out = []
    for m, y_to in zip(modules, ys):
        if m.get("bias") is not None:
            y_to = y_to + m["bias"].astype(y_to.dtype)
        out.append(y_to.reshape(*lead, y_to.shape[-1]))
    return out


def _split_ranks(xa_tR, ranks):
    offsets = np.cumsum((0,) + ranks)
    return [xa_tR[:, offsets[i]:offsets[i + 1]] for i in range(len(ranks))]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _group_core(options, ranks, x_ti, weights, a_cat, bs, scalings):
    """`options`: as `_lora_linear_core`'s."""
    return _group_fwd(options, ranks, x_ti, weights, a_cat, bs, scalings)[0]


def _group_fwd(options, ranks, x_ti, weights, a_cat, bs, scalings):
    xa_tR = jnp.einsum("ti,Ri->tR", x_ti, a_cat, preferred_element_type=jnp.float32).astype(x_ti.dtype)
    ys = []
    for w, b, s, xa in zip(weights, bs, scalings, _split_ranks(xa_tR, ranks)):
        xa_scaled = (xa.astype(jnp.float32) * s.astype(jnp.float32)).astype(x_ti.dtype)
        ys.append(base_matmul(x_ti, w, options) + jnp.einsum("tr,or->to", xa_scaled, b, preferred_element_type=x_ti.dtype))
    return tuple(ys), (x_ti, weights, a_cat, bs, scalings, checkpoint_name(xa_tR, SAVED_LORA_XA))


def _group_bwd(options, ranks, residuals, gs):
    x_ti, weights, a_cat, bs, scalings, xa_tR = residuals
    weights, gs = _just_in_time(options, weights, gs)
    gbs, dbs, dx = [], [], None
    for w, b, s, xa, g in zip(weights, bs, scalings, _split_ranks(xa_tR, ranks), gs):
        s32 = s.astype(jnp.float32)
        gbs.append((jnp.einsum("to,or->tr", g, b, preferred_element_type=jnp.float32) * s32).astype(g.dtype))
        dbs.append((jnp.einsum("to,tr->or", g, xa, preferred_element_type=jnp.float32) * s32).astype(b.dtype))
        term = base_matmul_t(g, w, options)
        dx = term if dx is None else dx + term
    gb_tR = jnp.concatenate(gbs, axis=1)
    dx = dx + jnp.einsum("tR,Ri->ti", gb_tR, a_cat, preferred_element_type=x_ti.dtype)
    da_cat = jnp.einsum("tR,ti->Ri", gb_tR, x_ti, preferred_element_type=jnp.float32).astype(a_cat.dtype)
    return (dx, tuple(_zeros_like_tree(w) for w in weights), da_cat, tuple(dbs),
            tuple(jnp.zeros_like(s) for s in scalings))


_group_core.defvjp(_group_fwd, _group_bwd)


# ------------------------------------------------------------------------------------------------
# The LoRA branch folded into the base matmul as extra contraction columns (NF4 bases):
#
#   [y_1 | y_2 | ...] = [x | s·x@Aᵀ] @ [[deq(W_1) | B_1 0 ...]; [deq(W_2) | 0 B_2 ...]; ...]ᵀ
#
# Why: with an NF4 base the dequantized bf16 weight is written to memory in every step anyway, so writing
# B beside it costs nothing, and the gemm then adds the LoRA term in its fp32 accumulator. Unfolded, each
# LoRA output [tokens, out] is written by a skinny gemm and read again by the add (profile: ~20 ms of a
# 300 ms Llama-8B step). The backward's `g @ [W | B]` also yields `g @ B` for free, and the group's
# modules run as ONE forward gemm (q/k/v: out 6144; gate/up: 2 x 14336) instead of one per module (the
# backward: one per module, `_folded_bwd` says why).
# The price is a copy of x with R more columns: worth it when the group's outputs are at least as wide
# as its input (q/k/v, o, gate/up; not down_proj, whose input is 3.5x its output).

def folds_into_base(in_dim: int, modules: list[dict], options: KernelOptions = DEFAULT) -> bool:
    """Whether these LoRA linears (sharing one input of width `in_dim`) run folded into their base matmul.

    In the memory-lean modes (`options.memory_lean`: the checkpointing modes "unsloth" and True, whose bar is
    peak memory) each module keeps its own folded weight (`_folded_fwd`): one concatenated weight for the group
    was an extra transient per recomputed layer (Llama-8B 2 x 2048 "unsloth": 7.04 -> 7.10 GiB), while
    unfolded, the base output, the LoRA output and their sum are three `[tokens, out]` buffers at once."""
    if not options.lora_fold or not all(isinstance(m["weight"], NF4Weight) for m in modules):
        return False  # a 16-bit base is read in place by the gemm: a folded copy would cost a weight pass
    if options.nf4_matmul == "pallas" and jax.default_backend() == "gpu":
        return False  # the fused NF4 kernel reads the packed weight itself
    return sum(int(m["lora_B"].shape[0]) for m in modules) >= in_dim


def _scale_columns(t_tR, scalings, ranks, dtype):
    """Each module's block of R columns times its scaling (in fp32, rounded once to `dtype`)."""
    s_R = jnp.concatenate([jnp.full((r,), s, jnp.float32) for s, r in zip(scalings, ranks)])
    return (t_tR.astype(jnp.float32) * s_R).astype(dtype)


def _folded_weight(weights, column_blocks, dtype, options: KernelOptions = DEFAULT):
    """`[sum(out), in + c]`: the modules' dequantized W stacked by rows, each followed by its `[out, c]` block.

    For 16-bit dtypes the concatenation happens on the packed 32-bit words, before the one bitcast: XLA then
    writes the whole folded weight from the dequantize kernel itself (a concatenation of the bitcast bf16
    arrays was a separate copy of every weight, ~15 ms per Llama-8B step).
    """
    if jnp.dtype(dtype).itemsize == 2 and all(_one_pass_dequantizes(w) for w in weights):
        table = _folded_table_lookup(options)
        words = [jnp.concatenate([_dequantized_words(w, dtype, table), _as_words(c.astype(dtype))], axis=1)
                 for w, c in zip(weights, column_blocks)]
        folded = lax.bitcast_convert_type(jnp.concatenate(words, axis=0), dtype)
        return folded.reshape(folded.shape[0], -1)
    lookup = replace(options, nf4_lookup="table" if _folded_table_lookup(options) else "select")
    return jnp.concatenate([jnp.concatenate([dense_base_weight(w, dtype, lookup), c.astype(dtype)], axis=1)
                            for w, c in zip(weights, column_blocks)], axis=0)


def _as_words(c_oc):
    """`[out, c]` 16-bit -> `[out, c / 2]` uint32, zero-padding an odd `c` (the caller pads x to match)."""
    if c_oc.shape[1] % 2:
        c_oc = jnp.pad(c_oc, ((0, 0), (0, 1)))
    return lax.bitcast_convert_type(c_oc.reshape(c_oc.shape[0], -1, 2), jnp.uint32)


def _folded_columns(x_ti, t_tc, dtype):
    """`[x | t]`, with t padded to an even width for 16-bit dtypes (as `_as_words` pads the weight)."""
    if jnp.dtype(dtype).itemsize == 2 and t_tc.shape[1] % 2:
        t_tc = jnp.pad(t_tc, ((0, 0), (0, 1)))
    return jnp.concatenate([x_ti, t_tc], axis=1)


def _b_blocks(bs, ranks):
    """Module j's B in its own columns of the group's R LoRA columns (zeros elsewhere): `[out_j, R]` each."""
    offsets = np.cumsum((0,) + ranks)
    return [jnp.pad(b, ((0, 0), (int(offsets[i]), int(offsets[-1] - offsets[i + 1])))) for i, b in enumerate(bs)]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _folded_core(options, ranks, x_ti, weights, a_cat, bs, scalings):
    return _folded_fwd(options, ranks, x_ti, weights, a_cat, bs, scalings)[0]


def _folded_input(x_ti, a_cat, scalings, ranks):
    """`(x @ A_catᵀ [t, R] in fp32, [x | s·xa] [t, in + R])`: the group's LoRA input and the folded gemm's operand."""
    dtype = x_ti.dtype
    xa_tR = jnp.einsum("ti,Ri->tR", x_ti, a_cat, preferred_element_type=jnp.float32)
    return xa_tR, _folded_columns(x_ti, _scale_columns(xa_tR.astype(dtype), scalings, ranks, dtype), dtype)


def _folded_fwd(options, ranks, x_ti, weights, a_cat, bs, scalings):
    """One gemm for the whole group: `[x | s·xa] @ [[W_1 | B_1 0]; [W_2 | 0 B_2]; ...]ᵀ`, its output cut per module
    (in the memory-lean modes one gemm per module)."""
    dtype = x_ti.dtype
    xa_tR, x_folded_tk = _folded_input(x_ti, a_cat, scalings, ranks)
    residuals = (x_ti, weights, a_cat, bs, scalings, checkpoint_name(xa_tR.astype(dtype), SAVED_LORA_XA))
    if not options.memory_lean:
        w_folded = _folded_weight(weights, _b_blocks(bs, ranks), dtype, options)
        y_tO = jnp.einsum("tk,ok->to", x_folded_tk, w_folded, preferred_element_type=dtype)
        offsets = np.cumsum([0] + [b.shape[0] for b in bs])
        return tuple(y_tO[:, offsets[i]:offsets[i + 1]] for i in range(len(bs))), residuals
    ys = []  # one gemm and one folded weight per module (per row tile): no group-sized transient
    for w, b in zip(weights, _b_blocks(bs, ranks)):
        tiles = _tile_outputs(_weight_tiles(w, dtype, options), lambda r0, r1, wt, b=b: jnp.einsum(
            "tk,ok->to", x_folded_tk, _folded_weight([wt], [b[r0:r1]], dtype, options),
            preferred_element_type=dtype))
        ys.append(tiles[0] if len(tiles) == 1 else jnp.concatenate(tiles, axis=1))
    return tuple(ys), residuals


def _folded_bwd(options, ranks, residuals, gs):
    """Per module `g_j @ [W_j | B_j]` gives the base dx term and `g_j @ B_j` in one gemm. (One gemm over the
    concatenated g would need a copy of all the g's: measured slower.)"""
    x_ti, weights, a_cat, bs, scalings, xa_tR = residuals
    weights, gs = _just_in_time(options, weights, gs)
    dtype, in_dim = x_ti.dtype, x_ti.shape[1]
    dx, gbs, dbs = None, [], []
    for w, b, s, xa, g in zip(weights, bs, scalings, _split_ranks(xa_tR, ranks), gs):
        gw_tk = _tile_sum(_weight_tiles(w, dtype, options), lambda r0, r1, wt, b=b, g=g: jnp.einsum(
            "to,ok->tk", g[:, r0:r1], _folded_weight([wt], [b[r0:r1]], dtype, options), preferred_element_type=dtype))
        dx = gw_tk[:, :in_dim] if dx is None else dx + gw_tk[:, :in_dim]
        gbs.append(gw_tk[:, in_dim:in_dim + b.shape[1]])
        s32 = s.astype(jnp.float32)
        dbs.append((jnp.einsum("to,tr->or", g, xa, preferred_element_type=jnp.float32) * s32).astype(b.dtype))
    gb_scaled_tR = _scale_columns(jnp.concatenate(gbs, axis=1), scalings, ranks, dtype)  # s · g @ B
    return _folded_cotangents(dx, gb_scaled_tR, x_ti, weights, a_cat, tuple(dbs), scalings)


def _folded_cotangents(dx_base, gb_scaled_tR, x_ti, weights, a_cat, dbs, scalings):
    """The folded core's cotangents from the base dx term and `s · g @ B`: dx adds the LoRA term `s·gB @ A`, dA is
    `(s·gB)ᵀ @ x`; the frozen weights and scalings get zeros."""
    dx = dx_base + jnp.einsum("tR,Ri->ti", gb_scaled_tR, a_cat, preferred_element_type=x_ti.dtype)
    da_cat = jnp.einsum("tR,ti->Ri", gb_scaled_tR, x_ti, preferred_element_type=jnp.float32).astype(a_cat.dtype)
    return (dx, tuple(_zeros_like_tree(w) for w in weights), da_cat, dbs, tuple(jnp.zeros_like(s) for s in scalings))


_folded_core.defvjp(_folded_fwd, _folded_bwd)
