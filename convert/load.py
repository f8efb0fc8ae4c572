"""HF checkpoint directory -> the frozen base pytree of a family, quantizing to NF4 on the device.

Driven entirely by the family's name table (`layer_stacks`, `top_tensors`): the table says which HF
tensors exist, their shapes, and which are linear weights that `load_in_4bit` quantizes (as transformers +
bitsandbytes do: every nn.Linear but the output layer; embeddings, norms, convolutions and lm_head stay in
`dtype`). Checkpoint tensor names go through the family's `LOAD_RENAMES` (transformers writes Qwen-VL as
`visual.*` / `model.layers.*` while its modules are `model.visual.*` / `model.language_model.layers.*`).
A bnb-4bit checkpoint loads as stored: 4-bit where the file holds a quant_state, 16-bit where transformers +
bitsandbytes left the module unquantized (the output layer, `llm_int8_skip_modules`). Stack positions are
HF layers through the family's `registry.StackMap` (Mllama's two text stacks share one HF ModuleList).

Memory: tensors stream one at a time from the safetensors files; each is moved to the device, cast and
quantized there, and written into its slot of its stack's `[depth, ...]` leaf by an in-place (donated)
update, so neither the host nor the device ever holds more than the result plus one tensor.

Under a mesh (`mesh=`, fastlora_jax.sharding) nothing is ever whole on one device: each tensor is read with
safetensors' `get_slice`, only the rows (or columns) this process's devices hold (`jax.make_array_from_callback`
asks for exactly those), straight into its sharding (fastlora_jax.sharding's rules). A linear weight is
NF4-quantized where it lies: every device quantizes its own rows (`quant.quantize_blocks` under shard_map;
the rules split only on whole 64-element blocks, so the bytes are the whole weight's), then the double
quantization runs over the sharded float32 absmax (`quant.double_quantize`: its offset is the mean over the
whole weight, so XLA gathers that small vector, 1/64 of the weight, not the weight). The stacked buffers are
allocated and updated in their shardings. The bytes equal a single-device load's, bit for bit.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache, partial
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastlora_jax.convert.hf_checkpoint import (CheckpointError, find_checkpoint_files, iter_tensors,
                                                tensor_shapes)
from fastlora_jax import sharding as shd
from fastlora_jax.models.registry import StackMap, stack_depths, stored_names
from fastlora_jax.quant import DYNAMIC_MAP, NF4_CODE, NF4Weight, double_quantize, quantize_blocks
from fastlora_jax.validate import check_bnb_quant_type, check_finite

BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def is_bnb_4bit(config_dict: dict) -> bool:
    qc = config_dict.get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))


def set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


@partial(jax.jit, donate_argnums=0)
def _write_layer(stacked, index, value):
    return jax.tree.map(lambda s, v: s.at[index].set(v), stacked, value)


@lru_cache(maxsize=None)
def _sharded_writer(treedef, shardings: tuple):
    """`_write_layer` whose result keeps the stacked buffer's shardings (a mesh load)."""
    return jax.jit(lambda stacked, index, value: jax.tree.map(lambda s, v: s.at[index].set(v), stacked, value),
                   donate_argnums=0, out_shardings=jax.tree.unflatten(treedef, list(shardings)))


def _stacked_sharding(value):
    """The sharding of a `[depth, ...]` stack of `value` (a per-layer array on a mesh): layers never split."""
    spec = tuple(value.sharding.spec) + (None,) * (value.ndim - len(value.sharding.spec))
    return NamedSharding(value.sharding.mesh, P(None, *spec))


class _StackedLeaves:
    """Per-layer values of every stack, written into `[depth, ...]` buffers allocated on first sight (in their
    shardings, on a mesh)."""

    def __init__(self, stacks: StackMap, mesh=None):
        self.stacks = stacks  # stack key -> depth, and the HF names of its positions
        self.mesh = mesh
        self.buffers: dict[str, object] = {}  # "stack key.relative name" -> stacked leaf
        self.filled: dict[str, set[int]] = {}

    def split(self, name: str):
        """An HF name inside a stack -> (stack key, position, relative name); None otherwise."""
        return self.stacks.locate(name)

    def put(self, prefix: str, relative_name: str, index: int, value) -> None:
        key = f"{prefix}.{relative_name}"
        depth = self.stacks[prefix]
        if self.mesh is None:
            if key not in self.buffers:
                self.buffers[key] = jax.tree.map(lambda v: jnp.zeros((depth,) + v.shape, v.dtype), value)
                self.filled[key] = set()
            self.buffers[key] = _write_layer(self.buffers[key], index, value)
        else:
            if key not in self.buffers:
                self.buffers[key] = jax.tree.map(
                    lambda v: shd.zeros_fn((depth,) + tuple(v.shape), v.dtype, _stacked_sharding(v))(), value)
                self.filled[key] = set()
            leaves, treedef = jax.tree.flatten(self.buffers[key])
            writer = _sharded_writer(treedef, tuple(x.sharding for x in leaves))
            self.buffers[key] = writer(self.buffers[key], index, value)
        self.filled[key].add(index)

    def write_into(self, params: dict) -> None:
        for key, buffer in self.buffers.items():
            set_path(params, key, buffer)


def _quantize_on_device(array: np.ndarray, dtype, double_quant: bool) -> NF4Weight:
    return NF4Weight.quantize(jnp.asarray(array).astype(dtype), blocksize=64, double_quant=double_quant)


# ------------------------------------------------------------------------------------------ mesh loading


@lru_cache(maxsize=None)
def _cast_fn(dtype, sharding):
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@lru_cache(maxsize=None)
def _dequantize_fn(dtype, sharding):
    return jax.jit(lambda w: w.dequantize(dtype), out_shardings=sharding)


@lru_cache(maxsize=None)
def _sharded_quantize_fn(mesh, dtype, double_quant: bool, nested_split: bool):
    """`w [out, in]` (rows split over fsdp) -> NF4 children, each device quantizing its own rows."""
    s = partial(NamedSharding, mesh)
    local = jax.shard_map(lambda w: quantize_blocks(w.astype(dtype), 64), mesh=mesh, in_specs=P(shd.FSDP, None),
                          out_specs=(P(shd.FSDP, None), P(shd.FSDP)), check_vma=False)
    if not double_quant:
        return jax.jit(local, out_shardings=(s(P(shd.FSDP, None)), s(P(shd.FSDP))))

    def quantize(w):
        packed, absmax = local(w)
        return (packed,) + double_quantize(absmax)

    nested = s(P(shd.FSDP)) if nested_split else s(P())
    return jax.jit(quantize, out_shardings=(s(P(shd.FSDP, None)), s(P(shd.FSDP)), nested, s(P())))


@lru_cache(maxsize=None)
def _replicated_quantize_fn(mesh, dtype, double_quant: bool):
    return jax.jit(lambda w: NF4Weight.quantize(w.astype(dtype), blocksize=64, double_quant=double_quant),
                   out_shardings=shd.replicated(mesh))


def quantize_sharded(w_oi, dtype, double_quant: bool, mesh) -> NF4Weight:
    """NF4 of a weight `[out, in]` on `mesh`, in the sharding `sharding.nf4_specs` gives it; `w_oi` is already
    in the matching layout (rows over fsdp, or replicated when the weight cannot be split on whole blocks)."""
    specs = shd.nf4_specs(tuple(w_oi.shape), mesh.shape[shd.FSDP], double_quant=double_quant)
    if specs["packed"] == P():
        return _replicated_quantize_fn(mesh, jnp.dtype(dtype), double_quant)(w_oi)
    out = _sharded_quantize_fn(mesh, jnp.dtype(dtype), double_quant, specs["nested_absmax"] == P(shd.FSDP))(w_oi)
    rep = shd.replicated(mesh)
    if double_quant:
        packed, absmax, nested, offset = out
        maps = (jax.device_put(NF4_CODE, rep), jax.device_put(DYNAMIC_MAP, rep))
        return NF4Weight(packed, absmax, maps[0], nested, maps[1], offset, shape=tuple(w_oi.shape),
                         dtype=jnp.dtype(dtype).name, blocksize=64, double_quant=True)
    packed, absmax = out
    return NF4Weight(packed, absmax, jax.device_put(NF4_CODE, rep), shape=tuple(w_oi.shape),
                     dtype=jnp.dtype(dtype).name, blocksize=64, double_quant=False)


def _linear_sharding(shape: tuple[int, ...], mesh, double_quant: bool):
    """Where a 16-bit linear weight is read to be quantized: by rows over fsdp when its NF4 form is split
    (`sharding.nf4_specs`), whole on every device otherwise."""
    split = shd.nf4_specs(shape, mesh.shape[shd.FSDP], double_quant=double_quant)["packed"] != P()
    return NamedSharding(mesh, P(shd.FSDP, None) if split else P())


def _read_sharded(files, stored: str, shape: tuple[int, ...], sharding):
    """One stored tensor as a global array in `sharding`, each process reading only its devices' slices
    (safetensors `get_slice`; a slice two local devices share is read once)."""
    from safetensors import safe_open
    path = files.tensor_to_file[stored]
    cache: dict = {}
    with safe_open(path, framework="numpy") as f:
        lazy = f.get_slice(stored)

        def read(index):
            key = tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)
            if key not in cache:
                part = np.asarray(lazy[index] if index else lazy[:])
                check_finite(stored, part, str(path))
                cache[key] = part
            return cache[key]

        return jax.make_array_from_callback(tuple(shape), sharding, read)


def _read_whole(files, stored: str) -> np.ndarray:
    name, array = next(iter_tensors(files, [stored]))
    check_finite(name, array, str(files.tensor_to_file[stored]))
    return array


def _bnb_sharded(files, in_file: dict, name: str, shape, kind: str, mesh, keep_4bit: bool, dtype):
    """A bnb-4bit weight on the mesh: the packed bytes read by slices, the small quant-state tensors whole (they
    are 1/64 of the weight or less), validated by `NF4Weight.from_bnb` on the host, then placed; dequantized into
    the 16-bit layout of its kind unless `keep_4bit` (the output layer, a stack stored both ways)."""
    n = int(np.prod(shape))
    small = {s: _read_whole(files, in_file[f"{name}.{s}"]) for s in BNB_SUFFIXES if f"{name}.{s}" in in_file}
    # from_bnb checks the packed tensor's shape only; a zero-strided stand-in costs no memory.
    stand_in = np.broadcast_to(np.zeros((1, 1), np.uint8), ((n + 1) // 2, 1))
    weight = NF4Weight.from_bnb({"": stand_in, **small}, host=True)
    if tuple(weight.shape) != tuple(shape):
        raise CheckpointError(f"tensor {in_file[name]!r} has shape {tuple(weight.shape)}, but config.json implies "
                              f"{tuple(shape)}")
    specs = shd.nf4_specs(tuple(shape), mesh.shape[shd.FSDP], weight.blocksize, weight.nested_blocksize,
                          weight.double_quant)
    children = []
    for key in ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"):
        value = getattr(weight, key)
        if value is None:
            children.append(None)
        elif key == "packed":
            children.append(_read_sharded(files, in_file[name], ((n + 1) // 2, 1),
                                          NamedSharding(mesh, specs["packed"])))
        else:
            children.append(jax.device_put(np.asarray(value), NamedSharding(mesh, specs[key])))
    weight = NF4Weight.tree_unflatten(weight._aux(), children)
    if keep_4bit:
        return weight
    dense = NamedSharding(mesh, shd.dense_spec(tuple(shape), kind, mesh.shape[shd.FSDP]))
    return _dequantize_fn(jnp.dtype(dtype), dense)(weight)  # one compile per dtype and sharding, not per tensor


def _load_one_sharded(files, in_file: dict, name: str, shape, kind: str, mesh, dtype, load_in_4bit: bool,
                      double_quant: bool, prequantized: bool, stored_4bit: bool, keep_4bit: bool):
    """One module-tree tensor, read and placed straight into its sharding on `mesh` (the choices of
    `load_base_params`' one-device loop: `stored_4bit` read as bnb, kept 4-bit if `keep_4bit`; a 16-bit linear
    quantized when loading in 4-bit from a 16-bit checkpoint)."""
    fsdp = mesh.shape[shd.FSDP]
    if stored_4bit:
        return _bnb_sharded(files, in_file, name, shape, kind, mesh, keep_4bit, dtype)
    if kind == "linear" and load_in_4bit and not prequantized:
        rows = _linear_sharding(tuple(shape), mesh, double_quant)
        return quantize_sharded(_read_sharded(files, in_file[name], shape, rows), dtype, double_quant, mesh)
    target = NamedSharding(mesh, shd.dense_spec(tuple(shape), kind, fsdp))
    return _cast_fn(jnp.dtype(dtype), target)(_read_sharded(files, in_file[name], shape, target))


def load_base_params(directory, family: ModuleType, cfg, config_dict: dict, dtype, load_in_4bit: bool,
                     double_quant: bool = True, mesh=None) -> tuple[dict, dict]:
    """Read the checkpoint in `directory` into the family's base pytree (sharded over `mesh` when given).

    Returns `(params, info)`; `info["source"]` is "16bit" when the linear weights came from float
    tensors (so a merged export can use the originals) or "bnb-4bit" when they were stored quantized.
    """
    files = find_checkpoint_files(directory)
    in_file = stored_names(family, files.tensor_to_file)  # module-tree name -> name in the file
    stored_shapes = tensor_shapes(files)
    header_shapes = {name: stored_shapes[stored] for name, stored in in_file.items()}
    file_of = {name: files.tensor_to_file[stored] for name, stored in in_file.items()}
    prequantized = is_bnb_4bit(config_dict)
    if prequantized:
        check_bnb_quant_type(config_dict, stored_shapes, str(files.directory / "config.json"))
    stacks = family.layer_stacks(cfg)
    names = stack_depths(family, cfg)

    # Everything the model needs, with its expected shape, before any data is read.
    expected: dict[str, tuple[tuple[int, ...], str]] = dict(family.top_tensors(cfg))
    for key, (depth, table) in stacks.items():
        for i in range(depth):
            for rel, spec in table.items():
                expected[names.module_name(key, i, rel)] = spec
    # A bnb-4bit checkpoint stores as 4-bit what transformers + bitsandbytes quantized, and the rest as it was:
    # the output layer, `llm_int8_skip_modules` and `_keep_in_fp32_modules`. A weight is read packed when its
    # quant_state is in the file; a stacked leaf whose layers are stored both ways is dequantized throughout
    # (each stack leaf has one layout), which keeps transformers' numbers at 16-bit memory for that leaf.
    packed = {name for name, (_, kind) in expected.items() if prequantized and kind in ("linear", "lm_head")
              and f"{name}.quant_state.bitsandbytes__nf4" in header_shapes}
    layouts: dict[tuple[str, str], set[bool]] = {}
    for name, (_, kind) in expected.items():
        where = names.locate(name)
        if where is not None and kind == "linear":
            layouts.setdefault((where[0], where[2]), set()).add(name in packed)
    mixed = {leaf for leaf, kinds in layouts.items() if len(kinds) > 1}
    if mixed:
        warnings.warn(f"{directory}: {len(mixed)} stacked weights are stored 4-bit in some layers and 16-bit in "
                      f"others (llm_int8_skip_modules); they are kept dequantized in {jnp.dtype(dtype).name}: "
                      f"{sorted(f'{k}.{r}' for k, r in mixed)[:4]}", stacklevel=3)
    to_read: list[str] = []
    for name, (shape, kind) in expected.items():
        if name not in header_shapes:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {str(directory)!r}"
                                  + _renamed_hint(family, name))
        stored = header_shapes[name]
        if name in packed:
            n = int(np.prod(shape))
            if stored != ((n + 1) // 2, 1):
                raise CheckpointError(
                    f"tensor {in_file[name]!r} in {str(file_of[name])!r} has packed shape {stored}; a 4-bit "
                    f"weight of shape {shape} (from config.json) packs to {((n + 1) // 2, 1)}")
            for suffix in BNB_SUFFIXES:
                key = f"{name}.{suffix}"
                if key in header_shapes:
                    to_read.append(key)
                elif not suffix.startswith("nested"):  # nested_* exist only with double quantization
                    raise CheckpointError(f"tensor {in_file[name] + '.' + suffix!r} is missing from the 4-bit "
                                          f"checkpoint in {str(directory)!r}")
        elif stored != shape:
            hint = " (a 4-bit weight without its quant_state?)" if prequantized and len(stored) == 2 and \
                stored[1] == 1 else ""
            raise CheckpointError(
                f"tensor {in_file[name]!r} in {str(file_of[name])!r} has shape {stored}, but config.json "
                f"implies {shape}{hint}")
        to_read.append(name)

    params: dict = {}
    stacked = _StackedLeaves(names, mesh)
    pending_bnb: dict[str, dict[str, np.ndarray]] = {}

    def place(name: str, value) -> None:
        where = stacked.split(name)
        if where:
            stacked.put(where[0], where[2], where[1], value)
        else:
            set_path(params, name, value)

    if mesh is not None:
        for name in to_read:
            if name in expected:  # the bnb quant-state tensors are read with their weight
                where = names.locate(name)
                shape, kind = expected[name]
                keep_4bit = load_in_4bit and kind == "linear" and (where is None or (where[0], where[2]) not in mixed)
                place(name, _load_one_sharded(files, in_file, name, shape, kind, mesh, dtype, load_in_4bit,
                                              double_quant, prequantized, name in packed, keep_4bit))
    module_name = {in_file[name]: name for name in to_read}
    for stored_name, array in ([] if mesh is not None else iter_tensors(files, [in_file[name] for name in to_read])):
        name = module_name[stored_name]
        check_finite(stored_name, array, str(files.tensor_to_file[stored_name]))
        base = name
        suffix = ""
        for s in BNB_SUFFIXES:
            if name.endswith("." + s):
                base, suffix = name[: -len(s) - 1], s
                break
        spec = expected.get(base)
        if base in packed:
            group = pending_bnb.setdefault(base, {})
            group[suffix] = array
            needed = {"", "absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
            state = json.loads(bytes(group["quant_state.bitsandbytes__nf4"]).decode()) \
                if "quant_state.bitsandbytes__nf4" in group else None
            if state is not None and "nested_offset" in state:
                needed |= {"nested_absmax", "nested_quant_map"}
            if not needed <= set(group):
                continue
            weight = NF4Weight.from_bnb(pending_bnb.pop(base))
            if tuple(weight.shape) != spec[0]:
                raise CheckpointError(f"tensor {in_file[base]!r} in {str(file_of[base])!r} has shape "
                                      f"{tuple(weight.shape)}, but config.json implies {spec[0]}")
            weight = jax.device_put(weight)
            where = names.locate(base)
            keep = load_in_4bit and spec[1] == "linear" and (where is None or (where[0], where[2]) not in mixed)
            place(base, weight if keep else weight.dequantize(dtype))  # the output layer stays dense
            continue
        kind = spec[1]
        if kind == "linear" and load_in_4bit and not prequantized:
            place(name, _quantize_on_device(array, dtype, double_quant))
        else:
            place(name, jnp.asarray(array).astype(dtype))

    if pending_bnb:
        raise CheckpointError(f"incomplete 4-bit tensors in {str(directory)!r}: {sorted(pending_bnb)}")
    stacked.write_into(params)
    if prequantized and not load_in_4bit:
        warnings.warn(f"{directory} holds a bitsandbytes 4-bit checkpoint; load_in_4bit=False dequantizes it to "
                      f"{jnp.dtype(dtype).name}", stacklevel=3)
    unused = sorted(set(header_shapes) - set(to_read) - {f"{family.OUTPUT_LAYER}.weight"})
    unused = [in_file[n] for n in unused if not n.endswith("rotary_emb.inv_freq")]
    if unused:
        warnings.warn(f"{len(unused)} tensors in {str(directory)!r} are not used by the model: {unused[:8]}",
                      stacklevel=3)
    return params, {"source": "bnb-4bit" if prequantized else "16bit"}


def _renamed_hint(family: ModuleType, name: str) -> str:
    from fastlora_jax.models.registry import checkpoint_name
    stored = checkpoint_name(family, name)
    return f" (transformers saves it as {stored!r})" if stored != name else ""


def abstract_base_params(family: ModuleType, cfg, dtype, load_in_4bit: bool, double_quant: bool = True) -> dict:
    """The base pytree as `jax.ShapeDtypeStruct` leaves (NF4 leaves included), with no weights anywhere:
    for counting parameters or planning memory of a large model from its config alone."""
    def build():
        params: dict = {}
        for name, (shape, kind) in family.top_tensors(cfg).items():
            value = jnp.zeros(shape, dtype)
            if kind == "linear" and load_in_4bit:
                value = NF4Weight.quantize(value, blocksize=64, double_quant=double_quant)
            set_path(params, name, value)
        for prefix, (depth, table) in family.layer_stacks(cfg).items():
            for rel, (shape, kind) in table.items():
                one = jnp.zeros(shape, dtype)
                if kind == "linear" and load_in_4bit:
                    one = NF4Weight.quantize(one, blocksize=64, double_quant=double_quant)
                set_path(params, f"{prefix}.{rel}",
                         jax.tree.map(lambda x, d=depth: jnp.broadcast_to(x, (d,) + x.shape), one))
        return params
    return jax.eval_shape(build)


def random_base_params(family: ModuleType, cfg, dtype, load_in_4bit: bool, seed: int = 0, std: float = 0.02,
                       double_quant: bool = True, mesh=None) -> dict:
    """A base pytree of random weights drawn and quantized on the device (benchmarks: no files needed). With a
    `mesh`, every tensor is drawn (and quantized) straight into its shards, as `load_base_params` places them."""
    key = jax.random.key(seed)
    # Drawn in `dtype` directly: an fp32 draw of a 128k-vocab embedding would be the run's peak.
    draw = jax.jit(lambda k, shape: jax.random.normal(k, shape, dtype) * jnp.asarray(std, dtype), static_argnums=1)

    def make(k, shape, kind):
        if mesh is None:
            value = jnp.ones(shape, dtype) if kind == "norm" else draw(k, shape)
            if kind == "linear" and load_in_4bit:
                value = NF4Weight.quantize(value, blocksize=64, double_quant=double_quant)
            return value
        quantized = kind == "linear" and load_in_4bit
        target = _linear_sharding(tuple(shape), mesh, double_quant) if quantized else \
            NamedSharding(mesh, shd.dense_spec(tuple(shape), kind, mesh.shape[shd.FSDP]))
        value = _random_fn(tuple(shape), jnp.dtype(dtype), target, float(std), kind == "norm")(k)
        return quantize_sharded(value, dtype, double_quant, mesh) if quantized else value

    params: dict = {}
    for n, (name, (shape, kind)) in enumerate(family.top_tensors(cfg).items()):
        set_path(params, name, make(jax.random.fold_in(key, n), shape, kind))
    stacks = family.layer_stacks(cfg)
    stacked = _StackedLeaves(stack_depths(family, cfg), mesh)
    for s, (prefix, (depth, table)) in enumerate(stacks.items()):
        stack_key = key if s == 0 else jax.random.fold_in(key, 10 ** 6 + s)
        for i in range(depth):
            for n, (rel, (shape, kind)) in enumerate(table.items()):
                stacked.put(prefix, rel, i, make(jax.random.fold_in(stack_key, 1000 * (i + 1) + n), shape, kind))
    stacked.write_into(params)
    return params


@lru_cache(maxsize=None)
def _random_fn(shape, dtype, sharding, std: float, ones: bool):
    if ones:
        return jax.jit(lambda k: jnp.ones(shape, dtype), out_shardings=sharding)
    return jax.jit(lambda k: jax.random.normal(k, shape, dtype) * jnp.asarray(std, dtype), out_shardings=sharding)
