"""Data parallel and FSDP over one `jax.sharding.Mesh`, and multi-host through `jax.distributed`.

No engine of our own: XLA's SPMD partitioner does the work. What this module decides is where each array
lives; `jax.jit` then inserts the collectives (the gradient all-reduce, the per-layer weight all-gathers).

The mesh has two axes, `("data", "fsdp")` (`make_mesh(data=N, fsdp=M)`, or the spec string
`"data=2,fsdp=2"` that `from_pretrained(mesh=...)`, `SFTConfig(mesh=...)` and `fastlora-jax train --mesh` take):

- the batch is split over both axes jointly (`BATCH`): each device trains on its own rows, as in FSDP's data
  parallelism; a batch whose size is not a multiple of the mesh size is replicated instead (every device
  computes all of it: correct, not faster);
- the frozen base is sharded over `fsdp` by the rules of `partition_specs`, one table keyed by the tensor
  kinds of the family's name table (decoder.layer_tensors / top_tensors, the same table loading and LoRA
  targeting read) and is replicated over `data`. Inside the layer scan each NF4 weight is gathered whole
  (`gathered`: an all-gather of the 4-bit bytes, one layer at a time) before it is dequantized, so no device
  ever holds the whole model, and the gather moves 4-bit data, not bf16. Embeddings and lm_head are split over
  the vocabulary (or the hidden size); the head is gathered before the loss, which each device then takes over
  its own rows (`batch_groups`: the chunked loss scans each device's tokens, never all of them);
- LoRA A/B, their gradients and the optimizer state are replicated: they are ~1% of the model, and keeping
  them whole makes the update one local op after XLA's all-reduce of the gradients (sharding them by size is
  a possible later step, not done here);
- a vision-language model's image patches have no batch axis: they are replicated, and so is the vision tower's
  work (every device runs it on all images of the step); its text batch is split like any other.

Kernels under a mesh (kernels/): the jnp references are plain XLA ops and partition like any other. The
fused NF4 Pallas kernel (`KernelOptions(nf4_matmul="pallas")`, GPU only) runs per device through
`per_device_rows` (shard_map: each device multiplies its own rows with the gathered weight; tested on the CPU
with the kernel's jnp reference in its place, since Pallas' GPU interpreter cannot run concurrent per-device
calls in one process). The Mosaic flash
attention kernel (`attention="flash"`, opt-in) falls back to its blockwise XLA reference when the program runs
over more than one device (kernels/attention.py); cuDNN attention (jax.nn.dot_product_attention) is an XLA
custom call with its own partitioning rule. The host-offload checkpointing policy ("unsloth") is a
`jax.checkpoint` policy, applied per device by XLA like the others.

Multi-host: `initialize_distributed()` calls `jax.distributed.initialize()` from the environment
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) before the mesh is built; `make_mesh` then
spans every process's devices. Each process loads only the slices of the checkpoint its devices hold
(convert/load.py), the trainer feeds the same global batch to every process (each places only its rows),
and files (adapter, merged export, trainer_state.json) are written by process 0.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
BATCH = (DATA, FSDP)  # the batch dimension is split over both axes
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

__all__ = ["AXES", "BATCH", "DATA", "FSDP", "RULES", "make_mesh", "parse_mesh", "resolve_mesh", "is_none_spec",
           "describe", "same_mesh", "initialize_distributed", "dense_spec", "nf4_specs", "partition_specs",
           "tensor_table", "base_shardings", "place", "replicated", "batch_sharding", "put_batch", "use_mesh",
           "multi_device", "gathered", "batch_groups", "split_rows", "local_rows", "per_device_rows", "to_host",
           "is_writer"]


# ------------------------------------------------------------------------------------------ the mesh


def initialize_distributed(distributed: bool | None = None) -> bool:
    """`jax.distributed.initialize()` for a multi-process run, before any JAX computation; True if initialized.

    `distributed=None` (the default everywhere): initialize when `JAX_COORDINATOR_ADDRESS` is set, with
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (the usual environment of a multi-host JAX job). True: initialize,
    from those variables or else JAX's cluster auto-detection (SLURM, Open MPI, TPU pods). False: never.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed={distributed!r} is not accepted: use None (from the environment), True or False")
    if distributed is False:
        return False
    if jax.distributed.is_initialized():
        return True
    env = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    if distributed is None and not env["JAX_COORDINATOR_ADDRESS"]:
        return False
    if all(env.values()):
        try:
            count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                             f"{env['JAX_PROCESS_ID']!r} must be integers") from None
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=count,
                                   process_id=index)
    elif env["JAX_COORDINATOR_ADDRESS"] and distributed is None:
        missing = [k for k, v in env.items() if not v]
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']!r} is set but {missing} are not: "
                         f"a multi-process run needs all of {list(DISTRIBUTED_ENV)}")
    else:
        jax.distributed.initialize()  # cluster auto-detection
    return True


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None, distributed: bool | None = None) -> Mesh:
    """A mesh with axes `("data", "fsdp")` over `devices` (default: every device of every process).

    `data=None` puts all the devices `fsdp` leaves on the data axis: `make_mesh()` is pure data parallelism
    over all devices. The product `data * fsdp` must equal the number of devices. Calls
    `initialize_distributed(distributed)` first (a no-op for a single process)."""
    initialize_distributed(distributed)
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name}={value!r} is not accepted: a positive int" +
                             (" (or None: the devices fsdp leaves)" if name == "data" else ""))
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices; give data= and fsdp= whose "
                             f"product is {len(devices)}")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {len(devices)} "
                         f"({devices[0].platform}); the product must equal the device count")
    # Auto axes: XLA propagates shardings (jax.make_mesh's default, Explicit, would make sharding part of
    # every array's type).
    return jax.make_mesh((int(data), int(fsdp)), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices)


def parse_mesh(spec: str) -> dict[str, int | None]:
    """`"data=2,fsdp=2"` -> `{"data": 2, "fsdp": 2}`. `"auto"` is every device on data; an axis left out is
    fsdp 1, or data "the devices fsdp leaves" (`"fsdp=4"` on 8 devices is data 2), as is `data=auto`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh={spec!r} is not accepted: use 'data=N,fsdp=M' (e.g. 'data=2,fsdp=2'), 'auto' "
                         f"(every device on data), 'none' (one device) or a jax.sharding.Mesh")
    text = spec.strip().lower()
    if text == "auto":
        return {"data": None, "fsdp": 1}
    if text == "none":
        raise ValueError(f"mesh={spec!r} means no mesh (one device); it has no axis sizes")
    out: dict[str, int | None] = {}
    for part in text.split(","):
        name, eq, value = (x.strip() for x in part.partition("="))
        if name not in AXES or not eq or name in out:
            raise ValueError(f"mesh={spec!r} is not accepted: use 'data=N,fsdp=M' with each axis at most once "
                             f"(got the part {part.strip()!r})")
        if name == DATA and value == "auto":
            out[name] = None
        elif not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh={spec!r}: {name}={value!r} must be a positive int")
        else:
            out[name] = int(value)
    out.setdefault(DATA, None)
    out.setdefault(FSDP, 1)
    return out


def is_none_spec(mesh) -> bool:
    """The spec "none": one device, explicitly (SFTConfig's None means "the default mesh" instead)."""
    return isinstance(mesh, str) and mesh.strip().lower() == "none"


def resolve_mesh(mesh, distributed: bool | None = None) -> Mesh | None:
    """None (or "none"), a `jax.sharding.Mesh` with axes ("data", "fsdp"), or a spec string (`parse_mesh`) ->
    a Mesh or None."""
    if mesh is None or is_none_spec(mesh):
        return None
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != AXES:
            raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}; fastlora_jax needs {AXES} "
                             f"(fastlora_jax.make_mesh(data=N, fsdp=M) builds one)")
        return mesh
    if isinstance(mesh, str):
        return make_mesh(**parse_mesh(mesh), distributed=distributed)
    raise ValueError(f"mesh={mesh!r} is not accepted: use None, a spec string such as 'data=2,fsdp=2', or a "
                     f"jax.sharding.Mesh with axes {AXES}")


def describe(mesh: Mesh | None) -> str:
    return "none" if mesh is None else f"data={mesh.shape[DATA]},fsdp={mesh.shape[FSDP]}"


def same_mesh(a: Mesh | None, b: Mesh | None) -> bool:
    if a is None or b is None:
        return a is b
    return dict(a.shape) == dict(b.shape) and [d.id for d in a.devices.flat] == [d.id for d in b.devices.flat]


# ------------------------------------------------------------------------------------------ the rules

# One table, keyed by the kinds of the family's name table (decoder.layer_tensors / top_tensors):
# "rows" = split the first (output) dimension over fsdp; "vocab_or_hidden" = the first dimension, or else the
# second; "replicated" = every device holds all of it (small tensors: norms, biases, the patch embedding).
RULES = {
    "linear": "rows",
    "lm_head": "vocab_or_hidden",
    "embedding": "vocab_or_hidden",
    "linear_bias": "replicated",
    "norm": "replicated",
    "norm_bias": "replicated",
    "conv": "replicated",
}


def dense_spec(shape: tuple[int, ...], kind: str, fsdp: int) -> P:
    """The PartitionSpec of one (unstacked) 16-bit tensor of this kind. A dimension that `fsdp` does not
    divide is not split: the tensor is replicated (correct everywhere, just not memory-saving)."""
    rule = RULES.get(kind, "replicated")
    if fsdp == 1 or rule == "replicated" or not shape:
        return P()
    if shape[0] % fsdp == 0:
        return P(FSDP, *([None] * (len(shape) - 1)))
    if rule == "vocab_or_hidden" and len(shape) > 1 and shape[1] % fsdp == 0:
        return P(None, FSDP, *([None] * (len(shape) - 2)))
    return P()


def nf4_specs(weight_shape: tuple[int, ...], fsdp: int, blocksize: int = 64, nested_blocksize: int = 256,
              double_quant: bool = True) -> dict[str, P | None]:
    """PartitionSpecs of one (unstacked) NF4 weight's children, split over fsdp along the output rows.

    bitsandbytes' layout is the row-major weight flattened, so a block of output rows is a contiguous run of
    packed bytes and of absmax blocks. The split is taken only where every shard is whole 64-element blocks:
    `out % fsdp == 0` and `(out / fsdp) * in % blocksize == 0`; then the packed bytes and absmax are split
    alike. The nested absmax is split too when each shard is also whole 256-block groups, and replicated
    otherwise (it is 1/16384 of the weight). The code tables and the offset are replicated. A weight that
    cannot be split so is replicated whole (all children `P()`).
    """
    out_dim = weight_shape[0] if weight_shape else 1
    rows = int(np.prod(weight_shape)) // max(out_dim, 1)
    per_shard = (out_dim // fsdp) * rows if fsdp and out_dim % fsdp == 0 else 0
    split = fsdp > 1 and per_shard > 0 and per_shard % blocksize == 0 and per_shard % 2 == 0
    nested_split = split and per_shard % (blocksize * nested_blocksize) == 0
    return {"packed": P(FSDP, None) if split else P(), "absmax": P(FSDP) if split else P(), "quant_map": P(),
            "nested_absmax": (P(FSDP) if nested_split else P()) if double_quant else None,
            "nested_quant_map": P() if double_quant else None, "offset": P() if double_quant else None}


def _stacked(spec: P, stacked: bool) -> P:
    return P(None, *spec) if stacked else spec


def partition_specs(leaf, shape: tuple[int, ...], kind: str, fsdp: int, stacked: bool):
    """The PartitionSpec(s) of one base leaf: a P for an array, an NF4Weight of Ps for an NF4 weight (its
    children's specs), with a leading None for a stacked leaf (`[layers, ...]`: layers are never split)."""
    from fastlora_jax.quant import NF4Weight
    if isinstance(leaf, NF4Weight):
        specs = nf4_specs(leaf.weight_shape, fsdp, leaf.blocksize, leaf.nested_blocksize, leaf.double_quant)
        children = [None if specs[k] is None or getattr(leaf, k) is None else _stacked(specs[k], stacked)
                    for k in ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")]
        return NF4Weight.tree_unflatten(leaf._aux(), children)
    return _stacked(dense_spec(tuple(shape), kind, fsdp), stacked)


def tensor_table(family, cfg) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """{pytree leaf name (dotted, stacks without the layer index): (per-layer shape, kind, stacked)}."""
    table = {name: (tuple(shape), kind, False) for name, (shape, kind) in family.top_tensors(cfg).items()}
    for prefix, (_, layer) in family.layer_stacks(cfg).items():
        for rel, (shape, kind) in layer.items():
            table[f"{prefix}.{rel}"] = (tuple(shape), kind, True)
    return table


def _is_nf4(x) -> bool:
    from fastlora_jax.quant import NF4Weight
    return isinstance(x, NF4Weight)


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def base_shardings(family, cfg, base_params: dict, mesh: Mesh):
    """The NamedShardings of a base pytree on `mesh` (same structure; an NF4Weight of shardings for an NF4
    leaf), by the rules above. A leaf the family's table does not name is replicated."""
    table = tensor_table(family, cfg)
    fsdp = mesh.shape[FSDP]

    def one(path, leaf):
        shape, kind, stacked = table.get(_dotted(path), (tuple(np.shape(leaf)), "other", False))
        specs = partition_specs(leaf, shape, kind, fsdp, stacked)
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    return jax.tree_util.tree_map_with_path(one, base_params, is_leaf=_is_nf4)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _put_leaf(x, sharding: NamedSharding):
    if isinstance(x, jax.Array):
        if x.sharding == sharding or (set(x.sharding.device_set) == set(sharding.device_set)
                                      and x.sharding.is_equivalent_to(sharding, x.ndim)):
            return x
        if jax.process_count() > 1 and x.is_fully_addressable:
            x = np.asarray(x)  # a process-local array in a multi-process run: placed from the host
    return jax.device_put(x, sharding)


def place(tree, shardings):
    """`tree`'s leaves on their shardings (a tree of NamedShardings, or one sharding for every leaf). In a
    multi-process run every process passes the same values and each places only its own devices' shards."""
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree.map(lambda x, s: _put_leaf(x, s), tree, shardings)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], axis: int) -> NamedSharding:
    """Rows (dimension `axis`) over BATCH when the mesh size divides them, else replicated."""
    if len(shape) <= axis or shape[axis] % mesh.size:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[axis] = BATCH
    return NamedSharding(mesh, P(*spec))


def put_batch(batch: dict, mesh: Mesh | None) -> dict:
    """A train/eval batch on the mesh: the arrays ending in `[B, S]` (input_ids, labels, attention_mask and
    position_ids, whatever leads: an accumulation axis, Qwen-VL's 3 position axes) split over the batch axes along
    B, the vision inputs replicated (Qwen-VL's patches of all images have no batch axis). The same global batch on
    every process; a mesh of None leaves the batch as it is."""
    if mesh is None:
        return batch
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
        elif key == "vision":
            out[key] = jax.tree.map(lambda v: _put_leaf(np.asarray(v), replicated(mesh)), value)
        else:
            array = value if isinstance(value, jax.Array) and not value.is_fully_addressable else np.asarray(value)
            out[key] = _put_leaf(array, batch_sharding(mesh, np.shape(array), max(np.ndim(array) - 2, 0)))
    return out


def use_mesh(mesh: Mesh | None):
    """The mesh as the context of the programs traced under it, so that `gathered`, `batch_groups` and
    `per_device_rows` see it; a null context without one. The abstract mesh (`jax.sharding.use_abstract_mesh`),
    not `jax.set_mesh`: it may be entered inside a trace too (`jax.grad(model.compute_loss)`); the devices come
    from the arrays."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ traced helpers


def _context_mesh():
    """The mesh the current trace runs under, or None (no mesh, one device, or inside a shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh._any_axis_manual or tuple(mesh.axis_names) != AXES:
        return None
    return mesh


def multi_device() -> bool:
    """Whether the program being traced runs over a mesh of more than one device."""
    return _context_mesh() is not None


def gathered(weight):
    """FSDP's gather: `weight` (an array or an NF4Weight, possibly sharded over fsdp) whole on every device,
    as the matmul that follows needs it. Called where a base weight is dequantized or read (kernels/lora_op.py,
    kernels/reference.py), so under the layer scan XLA gathers one layer's 4-bit bytes at a time and the
    backward pass gathers them again instead of keeping them. A no-op without a mesh or with fsdp=1."""
    mesh = _context_mesh()
    if mesh is None or mesh.shape[FSDP] == 1:
        return weight
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), weight)


def batch_groups(rows: int) -> int:
    """Into how many groups of rows a traced computation should fall so that each device works on its own: the
    mesh size when it divides `rows`, else 1 (no mesh: 1)."""
    mesh = _context_mesh()
    return 1 if mesh is None or rows % mesh.size else mesh.size


def split_rows(x):
    """`x` (leading axis = `batch_groups` groups) constrained to one group per device."""
    mesh = _context_mesh()
    if mesh is None or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH, *([None] * (x.ndim - 1))))


def local_rows(m: int) -> int:
    """How many of `m` rows each device holds under `per_device_rows` (all of them without a mesh)."""
    mesh = _context_mesh()
    return m if mesh is None or m % mesh.size else m // mesh.size


def per_device_rows(fn, x, *whole):
    """`fn(x, *whole)` run on each device over its own rows of `x` (split over all mesh axes) with `whole`
    gathered, through shard_map: how a per-device kernel (a Pallas call, which XLA cannot partition) runs under
    a mesh. Rows the mesh size does not divide: every device runs all of them. Without a mesh: `fn(x, *whole)`."""
    mesh = _context_mesh()
    if mesh is None:
        return fn(x, *whole)
    rows = P(BATCH) if x.shape[0] % mesh.size == 0 else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) + (P(),) * len(whole), out_specs=rows,
                         check_vma=False)(x, *whole)


# ------------------------------------------------------------------------------------------ host side


def to_host(x) -> np.ndarray:
    """A numpy copy of an array that may span processes: a replicated one from the local copy, a sharded one
    gathered (`process_allgather`, which every process must call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def is_writer() -> bool:
    """Whether this process writes files (process 0; the only process of a single-process run)."""
    return jax.process_index() == 0


@lru_cache(maxsize=None)
def zeros_fn(shape: tuple[int, ...], dtype, sharding: NamedSharding):
    """A jitted `zeros(shape, dtype)` created directly in `sharding` (never whole on one device)."""
    import jax.numpy as jnp
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
