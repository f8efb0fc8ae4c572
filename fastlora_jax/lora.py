"""LoRA as a separate trainable pytree laid over the frozen base, with PEFT 0.21's semantics.

Three trees, one set of paths (HF module names, each stack of layers stacked on a leading axis: the
family's `layer_stacks`, e.g. `model.layers` for Llama, `model.visual.blocks` and
`model.language_model.layers` for Qwen-VL; `L` below is the depth of the module's stack; which HF layer each
stack position is comes from `registry.StackMap`):
- `base_params`: frozen, never differentiated.
- `lora_params`: everything trainable. Per adapted module `lora_A` [L, r, in] / `lora_B` [L, out, r]
  (embeddings: `lora_embedding_A` [r, vocab] / `lora_embedding_B` [dim, r]), DoRA's
  `lora_magnitude_vector`, and full trainable copies (`weight`, `bias`) for `modules_to_save` and for
  `bias="all"|"lora_only"`. The key names are PEFT's, so the export is a path rename.
- `lora_meta`: static per-module arrays that are not trained: `scaling` [L] (0 for a layer outside
  layers_to_transform), `targeted` [L] and `override_mask` [L] (which layers a stacked trainable copy
  replaces).

Why stacked with padding: each stack runs under `jax.lax.scan`, so every layer's adapter in it must have
one shape. A layer with a smaller rank (rank_pattern) keeps zeros in its extra rows of A and columns of B,
and an untargeted layer has scaling 0. Those zeros get zero gradients, so they stay zero under
SGD/Adam/AdamW, and the math is exactly PEFT's. Counts and files come from the real shapes (`LoraLayout`),
never from the padded arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.models.registry import StackMap, checkpoint_tensors, stack_depths
from fastlora_jax.lora_config import LoraSpec, TargetInfo, resolve_modules_to_save, resolve_targets
from fastlora_jax.quant import NF4Weight

LLAMA_STACKS = {"model.layers": None}  # split_module's default: the one stack of a text model


@dataclass(frozen=True)
class LoraLayout:
    """What is adapted where: the resolved PEFT config, with real (unpadded) shapes for counts and files."""

    spec: LoraSpec
    targets: tuple[TargetInfo, ...]
    modules_to_save: tuple[str, ...]
    trainable_biases: tuple[str, ...]  # module names whose bias is trained (bias="all"/"lora_only")
    saved_tensors: tuple[str, ...]  # HF tensor names that modules_to_save copies hold
    module_shapes: dict = field(default_factory=dict, compare=False)  # module name -> weight shape (out, in)
    stacks: dict = field(default_factory=dict, compare=False)  # stack prefix -> depth (families.stack_depths)
    embed_tokens: str = field(default="model.embed_tokens", compare=False)  # what a tied lm_head shares

    @property
    def targeted_module_names(self) -> list[str]:
        return [t.name for t in self.targets]


# --------------------------------------------------------------------------------------------- paths


def _stack_map(stacks) -> StackMap:
    return stacks if isinstance(stacks, StackMap) else StackMap.identity(stacks)


def split_module(name: str, stacks=LLAMA_STACKS) -> tuple[tuple[str, ...], int | None]:
    """A module/tensor name -> (pytree path, stack position or None), the layer index dropped from inside a stack.

    `model.layers.3.self_attn.q_proj` -> (("model", "layers", "self_attn", "q_proj"), 3) when `model.layers`
    is one of `stacks` (a `registry.StackMap`, or a `{prefix: depth}` mapping of identity stacks). Names outside
    every stack keep all their parts: `model.visual.merger.mlp.0` -> (("model", "visual", "merger", "mlp", "0"),
    None). Mllama's `model.language_model.layers.3.cross_attn.q_proj` is position 0 of the stack
    `model.language_model.cross_attention_layers` when layer 3 is its first cross-attention layer.
    """
    where = _stack_map(stacks).locate(name)
    if where is None:
        return tuple(name.split(".")), None
    key, position, rest = where
    return (*key.split("."), *rest.split(".")), position


def stack_of(path, stacks) -> str:
    """The stack key a stacked pytree path lies under (its leading axis is that stack's layers)."""
    for prefix in stacks:
        parts = tuple(prefix.split("."))
        if tuple(path[: len(parts)]) == parts:
            return prefix
    raise KeyError(f"path {'.'.join(path)!r} is in none of the stacks {sorted(stacks)}")


def join_module(path, index: int | None, stacks) -> str:
    """The inverse of `split_module`: the dotted HF name of position `index` of a stacked path."""
    if index is None:
        return ".".join(path)
    key = stack_of(path, stacks)
    return _stack_map(stacks).module_name(key, index, ".".join(path[len(key.split(".")):]))


def get_node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_node(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def module_weight_shapes(family, cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Module name -> (weight shape, kind) for every module with a weight, from the family's table."""
    shapes = {}
    stacks = stack_depths(family, cfg)
    for key, (depth, table) in family.layer_stacks(cfg).items():
        for i in range(depth):
            for rel, (shape, kind) in table.items():
                if rel.endswith(".weight"):
                    shapes[stacks.module_name(key, i, rel[:-7])] = (shape, kind)
    for name, (shape, kind) in family.top_tensors(cfg).items():
        if name.endswith(".weight"):
            shapes[name[:-7]] = (shape, kind)
    if cfg.tie_word_embeddings:
        shapes[family.OUTPUT_LAYER] = (shapes[family.EMBED_TOKENS][0], "lm_head")
    return shapes


BIAS_KINDS = ("linear_bias", "norm_bias")  # PEFT's bias="all" trains every parameter named *bias*


def module_biases(family, cfg) -> list[str]:
    """Modules with a bias (linear layers and LayerNorms), in stack-then-top order."""
    stacks = stack_depths(family, cfg)
    out = [stacks.module_name(key, i, rel[:-5]) for key, (depth, table) in family.layer_stacks(cfg).items()
           for i in range(depth) for rel, (_, kind) in table.items() if kind in BIAS_KINDS]
    return out + [name[:-5] for name, (_, kind) in family.top_tensors(cfg).items() if kind in BIAS_KINDS]


# ---------------------------------------------------------------------------------------------- init


def _init_pair(rng: np.random.Generator, init, r: int, fan_in: int, out: int, embedding: bool):
    """(A, B) as PEFT's `reset_lora_parameters` draws them (torch's kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)))."""
    if embedding:  # A [r, vocab], B [dim, r]; PEFT: A zeros, B normal (init True/"gaussian"); both random if False
        a = np.zeros((r, fan_in), np.float32) if init is not False else rng.standard_normal((r, fan_in)).astype(np.float32)
        b = rng.standard_normal((out, r)).astype(np.float32)
        return a, b
    if init == "gaussian":
        a = (rng.standard_normal((r, fan_in)) / r).astype(np.float32)
    else:
        a = rng.uniform(-1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in), (r, fan_in)).astype(np.float32)
    if init is False:  # PEFT leaves nn.Linear's own init on B: the adapter changes the output from the start
        b = rng.uniform(-1 / np.sqrt(r), 1 / np.sqrt(r), (out, r)).astype(np.float32)
    else:
        b = np.zeros((out, r), np.float32)
    return a, b


def _dense(weight, dtype=jnp.float32):
    if isinstance(weight, NF4Weight):
        return weight.dequantize(dtype)
    return jnp.asarray(weight).astype(dtype) if not isinstance(weight, jax.ShapeDtypeStruct) else weight


def build_lora(family, cfg, base_params: dict, spec: LoraSpec, random_state: int = 3407, *,
               original_weight=None, return_base: bool = False):
    """Resolve PEFT's targets on the family's module list and create `(lora_params, lora_meta, layout)`.

    With `return_base=True` the result is `(lora_params, lora_meta, layout, new_base_params)`, where
    `new_base_params` is None unless `init_lora_weights="loftq"` replaced base weights (LoftQ rewrites the
    base of every targeted module, as PEFT's `LoraLayer.loftq_init` does; the input tree is not modified).
    `original_weight(hf_tensor_name) -> np.ndarray | None` gives LoftQ the full-precision weight of an NF4
    base (e.g. re-read from the 16-bit checkpoint); without it, or when it returns None, the dequantized
    NF4 weight stands in (with a warning). A 16-bit base is its own original.
    """
    loftq = spec.init_lora_weights == "loftq"
    if loftq and not return_base:
        raise ValueError("init_lora_weights='loftq' replaces base weights: call build_lora(..., return_base=True) "
                         "and use the returned base params")
    if loftq:
        _, loftq_iter = _loftq_settings(spec)
    modules = family.module_list(cfg)
    stacks = stack_depths(family, cfg)
    embed_path = tuple(family.EMBED_TOKENS.split("."))
    # layers_to_transform indices are checked against the largest HF layer index (PEFT parses them from the names).
    targets = resolve_targets(spec, modules, stacks.layer_count, output_layer_names=(family.OUTPUT_LAYER,))
    saved = resolve_modules_to_save(spec, modules, targets)
    shapes = module_weight_shapes(family, cfg)
    target_names = {t.name for t in targets}
    biases = module_biases(family, cfg)
    if spec.bias == "all":
        trainable_biases = [b for b in biases if not any(b == s or b.startswith(s + ".") for s in saved)]
    elif spec.bias == "lora_only":
        trainable_biases = [b for b in biases if b in target_names]
    else:
        trainable_biases = []
    tensor_names = [name for name, _, _ in checkpoint_tensors(family, cfg)]
    if cfg.tie_word_embeddings and "lm_head" in saved:
        tensor_names.append("lm_head.weight")
    saved_tensors = [n for n in tensor_names if any(n.startswith(m + ".") for m in saved)]
    layout = LoraLayout(spec, tuple(targets), tuple(saved), tuple(trainable_biases), tuple(saved_tensors),
                        {name: shape for name, (shape, _) in shapes.items()}, stacks, family.EMBED_TOKENS)

    rng = np.random.default_rng(random_state)
    lora: dict = {}
    meta: dict = {}
    new_base = _copy_containers(base_params) if loftq else None
    # Group layer targets by their path inside a layer: one stacked, rank-padded array per group.
    groups: dict[tuple, list[tuple[TargetInfo, int | None]]] = {}
    for t in targets:
        path, index = split_module(t.name, stacks)
        groups.setdefault(path if index is not None else ("__top__",) + path, []).append((t, index))
    for key, placed in groups.items():
        infos = [t for t, _ in placed]
        top = key[0] == "__top__"
        path = key[1:] if top else key
        (out, fan_in) = shapes[infos[0].name][0]
        embedding = infos[0].kind == "embedding"
        if embedding:
            out, fan_in = fan_in, out  # embedding weight is [vocab, dim]: A [r, vocab], B [dim, r]
        r_max = max(t.r for t in infos)
        stack = 1 if top else stacks[stack_of(path, stacks)]
        a = np.zeros((stack, r_max, fan_in), np.float32)
        b = np.zeros((stack, out, r_max), np.float32)
        scaling = np.zeros((stack,), np.float32)
        targeted = np.zeros((stack,), bool)
        if loftq:
            if embedding:
                raise NotImplementedError(f"init_lora_weights='loftq' on the embedding target {infos[0].name!r} "
                                          "is not supported (LoftQ applies to linear modules)")
            _loftq_group(new_base, path, top, placed, a, b, stacks, embed_path, loftq_iter, original_weight)
        for t, index in placed:
            i = 0 if top else index
            if not loftq:
                a[i, : t.r], b[i, :, : t.r] = _init_pair(rng, spec.init_lora_weights, t.r, fan_in, out, embedding)
            scaling[i], targeted[i] = t.scaling, True
        node: dict = {}
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        node[names[0]], node[names[1]] = (jnp.asarray(a[0]), jnp.asarray(b[0])) if top else (jnp.asarray(a), jnp.asarray(b))
        m = {"scaling": jnp.asarray(scaling[0] if top else scaling), "targeted": jnp.asarray(targeted[0] if top else targeted)}
        if spec.use_dora:
            if embedding:
                raise NotImplementedError("use_dora=True on an embedding target is not supported")
            node["lora_magnitude_vector"] = _dora_magnitude(new_base if loftq else base_params, path, top, node, m,
                                                            embed_path)
        set_node(lora, path, node)
        set_node(meta, path, m)

    for name in saved:
        _add_trainable_copy(lora, meta, base_params, name, stacks, embed_path, keys=None)
    for name in trainable_biases:
        _add_trainable_copy(lora, meta, base_params, name, stacks, embed_path, keys=("bias",))
    if return_base:
        return lora, meta, layout, new_base
    return lora, meta, layout


# --------------------------------------------------------------------------------------------- LoftQ


def _loftq_settings(spec: LoraSpec) -> tuple[int, int]:
    config = dict(spec.loftq_config or {})
    bits = int(config.get("loftq_bits", 4))
    num_iter = int(config.get("loftq_iter", 1))
    if bits != 4:
        raise NotImplementedError(f"loftq_config['loftq_bits']={bits} is not supported; only 4 (NF4) is implemented")
    if num_iter <= 0:
        raise ValueError(f"loftq_config['loftq_iter'] must be > 0, got {num_iter}")
    return bits, num_iter


def _copy_containers(tree):
    """A copy of the dict structure (leaves shared), so replacing leaves leaves the input tree intact."""
    if isinstance(tree, dict):
        return {k: _copy_containers(v) for k, v in tree.items()}
    return tree


def loftq_matrix(weight, reduced_rank: int, num_iter: int = 1):
    """PEFT 0.21 `loftq_init` (4 bits) on one 2-D weight, in float32 jnp.

    Returns `(qweight, dequantized, lora_A, lora_B)`: the NF4Weight of the last quantized residual
    (bnb NF4, blocksize 64, compress_statistics=False), its float32 dequantized value, A = R [r, in] and
    B = L [out, r] of `_low_rank_decomposition`.
    """
    w = jnp.asarray(weight).astype(jnp.float32)
    res = w
    for i in range(num_iter):
        qweight = NF4Weight.quantize(res, blocksize=64, double_quant=False)
        dequantized = qweight.dequantize(jnp.float32)
        res = w - dequantized
        u, s, vh = jnp.linalg.svd(res, full_matrices=False)
        root = jnp.sqrt(s[:reduced_rank])
        lora_b = u[:, :reduced_rank] * root[None, :]  # U @ sqrt(diag(S)[:, :r])
        lora_a = root[:, None] * vh[:reduced_rank]  # sqrt(diag(S)[:r, :]) @ Vh
        if i + 1 == num_iter:
            break
        res = w - lora_b @ lora_a
    return qweight, dequantized, lora_a, lora_b


def _with_dtype(q: NF4Weight, dtype_name: str) -> NF4Weight:
    """The same NF4 storage, labelled with another original dtype (what `dequantize()` returns by default)."""
    shape, _, blocksize, nested_blocksize, double_quant = q._aux()
    return NF4Weight.tree_unflatten((shape, dtype_name, blocksize, nested_blocksize, double_quant),
                                    q.tree_flatten()[0])


def _loftq_group(new_base, path, top, placed, a, b, stacks, embed_path, num_iter, original_weight):
    """LoftQ for every target of one (stacked) module: fill A/B in place and replace its base weight leaf.

    A 16-bit base becomes the dequantized NF4 value (as PEFT's). An NF4 base is rebuilt as a whole stacked
    leaf without double quantization: targeted layers hold the LoftQ NF4 residual, the other layers plain
    NF4 of their original weight (so every layer of the stack shares one storage layout).
    """
    import warnings

    tied = top and path == ("lm_head",) and "lm_head" not in new_base
    base_path = embed_path if tied else path  # tied lm_head: the shared weight (PEFT: same Parameter)
    module = get_node(new_base, base_path)
    leaf = module["weight"]
    by_layer = {(0 if top else index): t for t, index in placed}
    nf4 = isinstance(leaf, NF4Weight)
    stack = 1 if top else stacks[stack_of(path, stacks)]
    warned = False

    def original(i):
        nonlocal warned
        layer_leaf = leaf if top else jax.tree.map(lambda x: x[i], leaf)
        if not nf4:
            return jnp.asarray(layer_leaf).astype(jnp.float32)
        name = (f"{by_layer[i].name}.weight" if i in by_layer else
                f"{join_module(path, None if top else i, stacks)}.weight")
        value = original_weight(name) if original_weight is not None else None
        if value is None:
            if not warned:
                warnings.warn(f"LoftQ: no original full-precision weight for {name!r} (base is 4-bit); using the "
                              "dequantized NF4 weight instead", stacklevel=4)
                warned = True
            return layer_leaf.dequantize(jnp.float32)
        return jnp.asarray(np.asarray(value, dtype=np.float32))

    layers = []
    for i in range(stack):
        t = by_layer.get(i)
        if t is None:
            if nf4:  # re-quantize plainly so the stack has one layout (no double quant)
                w = original(i).astype(leaf.dtype)
                layers.append(_with_dtype(NF4Weight.quantize(w, blocksize=64, double_quant=False), leaf._aux()[1]))
            else:
                layers.append(leaf if top else leaf[i])
            continue
        qweight, dequantized, lora_a, lora_b = loftq_matrix(original(i), t.r, num_iter)
        k = lora_a.shape[0]  # min(r, out, in), as PEFT's slicing of diag(S) gives
        a[i, :k] = np.asarray(lora_a)
        b[i, :, :k] = np.asarray(lora_b)
        layers.append(_with_dtype(qweight, leaf._aux()[1]) if nf4 else dequantized.astype(leaf.dtype))
    if top:
        new_leaf = layers[0]
    else:
        new_leaf = NF4Weight.stack(layers) if nf4 else jnp.stack(layers)
    parent = get_node(new_base, base_path[:-1]) if len(base_path) > 1 else new_base
    parent[base_path[-1]] = {**module, "weight": new_leaf}


def _dora_magnitude(base_params, path, top, node, meta, embed_path):
    """||W + s·B·A|| per output row, as PEFT initialises `lora_magnitude_vector`."""
    weight = get_node(base_params, path)["weight"] if not (top and path == ("lm_head",) and "lm_head" not in base_params) \
        else get_node(base_params, embed_path)["weight"]

    def one(w, a, b, s):
        return jnp.linalg.norm(_dense(w) + s * (b @ a), axis=1)

    if top:
        return one(weight, node["lora_A"], node["lora_B"], meta["scaling"])
    return jax.vmap(one)(weight, node["lora_A"], node["lora_B"], meta["scaling"])


def _add_trainable_copy(lora, meta, base_params, name, stacks, embed_path, keys):
    """A trainable full copy of module `name` (all its tensors, or only `keys`), masked to its layers."""
    path, index = split_module(name, stacks)
    if path == ("lm_head",) and "lm_head" not in base_params:
        source = {"weight": get_node(base_params, embed_path)["weight"]}  # tied: the copy starts from it
    else:
        source = get_node(base_params, path)
    if keys is not None:
        source = {k: source[k] for k in keys}
    copy = jax.tree.map(lambda w: _dense(w), source, is_leaf=lambda x: isinstance(x, NF4Weight))
    node = lora
    for key in path:
        node = node.setdefault(key, {})
    for k, v in copy.items():
        node[k] = v
    if index is not None:
        mask_node = meta
        for key in path:
            mask_node = mask_node.setdefault(key, {})
        depth = stacks[stack_of(path, stacks)]
        mask = np.asarray(mask_node.get("override_mask", np.zeros((depth,), bool)))
        mask = mask.copy()
        mask[index] = True
        mask_node["override_mask"] = jnp.asarray(mask)


# -------------------------------------------------------------------------------------------- combine


def combine(base: dict, lora: dict | None, meta: dict | None) -> dict:
    """The tree the family's forward reads: base modules with LoRA branches and trainable copies over them.

    A stacked trainable copy replaces the base only in the layers of its `override_mask` (a `where`, so
    no gradient reaches the other layers' entries).
    """
    if lora is None:
        return base
    return _combine(base, lora, meta or {})


def _combine(base, lora, meta):
    if not isinstance(base, dict):
        return lora
    out = dict(base)
    mask = meta.get("override_mask")
    for key, value in lora.items():
        if isinstance(value, dict):
            out[key] = _combine(base.get(key, {}), value, meta.get(key, {}))
        elif key in ("weight", "bias") and key in base and mask is not None:
            shape = (mask.shape[0],) + (1,) * (value.ndim - 1)
            out[key] = jnp.where(mask.reshape(shape), value, _dense(base[key], value.dtype))
        else:
            out[key] = value
    for key, value in meta.items():
        if not isinstance(value, dict) and key != "override_mask":
            out[key] = value
    return out


# -------------------------------------------------------------------------------------------- counting


def count_parameters(base_params: dict, layout: LoraLayout, cfg) -> tuple[int, int]:
    """(trainable, all) exactly as PEFT's `get_nb_trainable_parameters` counts the same config on the HF
    model: 4-bit weights at their logical size, a tied embedding once, and a modules_to_save copy in both
    the trainable and the total count (PEFT keeps the original and the copy)."""
    base_total = sum(logical_size(leaf) for leaf in jax.tree.leaves(base_params, is_leaf=_is_nf4))
    trainable = 0
    for t in layout.targets:
        out, fan_in = layout.module_shapes[t.name]
        trainable += t.r * (fan_in + out)
        if layout.spec.use_dora:
            trainable += out if t.kind != "embedding" else 0
    for name in layout.modules_to_save:
        trainable += _module_size(base_params, name, layout)
    bias_trainable = 0
    for name in layout.trainable_biases:
        out = layout.module_shapes[name][0]
        bias_trainable += out
    return trainable + bias_trainable, base_total + trainable


def _module_size(base_params, name, layout: LoraLayout) -> int:
    path, index = split_module(name, layout.stacks)
    if path == ("lm_head",) and "lm_head" not in base_params:
        path = tuple(layout.embed_tokens.split("."))
    total = sum(logical_size(leaf) for leaf in jax.tree.leaves(get_node(base_params, path), is_leaf=_is_nf4))
    return total // layout.stacks[stack_of(path, layout.stacks)] if index is not None else total


def _is_nf4(x) -> bool:
    return isinstance(x, NF4Weight)


def logical_size(leaf) -> int:
    """Elements a leaf stands for: an NF4 weight counts at its unquantized size, times its stack depth."""
    return int(np.prod(leaf.shape))  # NF4Weight.shape is logical: stack axes + the unquantized shape
