"""PEFT adapter files <-> the LoRA pytree, and merged 16-bit exports.

PEFT's `adapter_model.safetensors` keys are `base_model.model.<module>.<tensor>` (the adapter name is
dropped): `lora_A.weight` [r, in], `lora_B.weight` [out, r], `lora_embedding_A` [r, vocab],
`lora_embedding_B` [dim, r], `lora_magnitude_vector` [out], a modules_to_save copy as `<module>.weight`,
a trained bias as `<module>.bias` (`<module>.base_layer.bias` when the module also has LoRA).
Every write goes to a temporary name first and is renamed, so a failed save leaves the old file intact.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.convert.hf_checkpoint import atomic_write_bytes, numpy_dtype, save_tensors
from fastlora_jax.lora import LoraLayout, get_node, set_node, split_module

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _entries(layout: LoraLayout):
    """(PEFT key, tree path, layer index or None, slicer) for every tensor an adapter file holds."""
    target_names = {t.name for t in layout.targets}
    stacks = layout.stacks
    for t in layout.targets:
        path, index = split_module(t.name, stacks)
        if t.kind == "embedding":
            yield PREFIX + f"{t.name}.lora_embedding_A", path + ("lora_embedding_A",), index, (slice(0, t.r),)
            yield PREFIX + f"{t.name}.lora_embedding_B", path + ("lora_embedding_B",), index, (slice(None), slice(0, t.r))
            continue
        yield PREFIX + f"{t.name}.lora_A.weight", path + ("lora_A",), index, (slice(0, t.r),)
        yield PREFIX + f"{t.name}.lora_B.weight", path + ("lora_B",), index, (slice(None), slice(0, t.r))
        if layout.spec.use_dora:
            yield PREFIX + f"{t.name}.lora_magnitude_vector", path + ("lora_magnitude_vector",), index, ()
    for name in layout.saved_tensors:
        path, index = split_module(name, stacks)
        yield PREFIX + name, path, index, ()
    for name in layout.trainable_biases:
        path, index = split_module(name, stacks)
        key = f"{name}.base_layer.bias" if name in target_names else f"{name}.bias"
        yield PREFIX + key, path + ("bias",), index, ()


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_base_layer_keys(layout: LoraLayout) -> dict[str, str]:
    """PEFT key -> module name of the base weights PEFT adds to an adapter file when an embedding layer
    is named in target_modules (its `save_embedding_layers="auto"`: `<module>.base_layer.weight`)."""
    tm = layout.spec.target_modules
    if not any(name in tm for name in EMBEDDING_LAYER_NAMES):  # `in` on a str is a substring test, as in PEFT
        return {}
    return {PREFIX + f"{t.name}.base_layer.weight": t.name for t in layout.targets
            if t.name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES}


def peft_state_dict(layout: LoraLayout, tree: dict) -> dict[str, jax.Array]:
    """PEFT's adapter state dict from `lora_params` or any pytree shaped like it (gradients, say)."""
    out = {}
    for key, path, index, slicer in _entries(layout):
        value = get_node(tree, path)
        if index is not None:
            value = value[index]
        out[key] = value[slicer] if slicer else value
    return out


def load_peft_state_dict(layout: LoraLayout, lora_params: dict, state: dict, where: str,
                         base_tensor=None) -> dict:
    """Write PEFT's tensors into a copy of `lora_params`; every tensor must be consumed and none missing.

    Embedding base weights that PEFT stores beside the adapter must equal the model's own (`base_tensor`)."""
    expected = {key: (path, index, slicer) for key, path, index, slicer in _entries(layout)}
    base_layers = embedding_base_layer_keys(layout)
    for key, module in base_layers.items():
        if key in state and base_tensor is not None:
            ours = base_tensor(module + ".weight")
            theirs = np.asarray(state[key], np.float32)
            if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-2, atol=1e-3):
                raise ValueError(f"adapter {where} stores {key!r} with shape {theirs.shape}, which differs from the "
                                 f"base model's {module}.weight {ours.shape} (a resized or retrained embedding?)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(base_layers))
    if missing or unexpected:
        raise ValueError(f"adapter {where} does not fit the model: missing keys {missing[:6]}, "
                         f"unexpected keys {unexpected[:6]}")
    tree = jax.tree.map(lambda x: x, lora_params)
    for key, (path, index, slicer) in expected.items():
        current = get_node(tree, path)
        value = jnp.asarray(np.asarray(state[key]), dtype=current.dtype)
        target_shape = current[index][slicer].shape if index is not None else current[slicer].shape if slicer else current.shape
        if value.shape != target_shape:
            raise ValueError(f"adapter tensor {key!r} in {where} has shape {value.shape}; the model expects {target_shape}")
        full_index = ((index,) if index is not None else ()) + (slicer or ())
        set_node(tree, path, current.at[full_index].set(value) if full_index else value)
    return tree


# ------------------------------------------------------------------------------------------ files


def to_numpy(value) -> np.ndarray:
    """A host copy; an array sharded over processes is gathered (every process must call this)."""
    from fastlora_jax.sharding import to_host
    return to_host(value)


CONFIG_DIGEST = "fastlora_adapter_config_sha256"
# The config fields that say what the tensors are (their shapes, scaling and placement). Others (where the base
# lives, dropout, inference_mode, init) may be edited by hand without making the pair inconsistent.
TENSOR_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                 "use_rslora", "use_dora", "modules_to_save", "bias", "layers_to_transform", "layers_pattern",
                 "peft_type", "task_type")


def config_digest(config_dict: dict) -> str:
    """What ties an adapter's weights file to its config: a digest of the config's tensor fields."""
    import hashlib
    kept = {k: config_dict.get(k) for k in TENSOR_FIELDS}
    if isinstance(kept["target_modules"], list):
        kept["target_modules"] = sorted(kept["target_modules"])
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def deterministic_safetensors(blob: bytes) -> bytes:
    """The same file with its `__metadata__` keys sorted: safetensors writes them in hash-map order, which
    changes between calls, so two saves of the same adapter would differ in bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, so the data offsets stay aligned
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def save_adapter(directory, layout: LoraLayout, lora_params: dict, config_dict: dict,
                 extra_tensors: dict | None = None) -> Path:
    """PEFT's two files, committed together (`atomic.commit_files`): a failure while either is written leaves
    the previous adapter whole. The weights' metadata carries a digest of the config, so a pair that a crash
    between the two renames left mismatched is refused on read instead of loading wrong."""
    from safetensors.numpy import save

    from fastlora_jax.atomic import commit_files
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: to_numpy(v) for k, v in peft_state_dict(layout, lora_params).items()}
    state.update(extra_tensors or {})
    from fastlora_jax.sharding import is_writer
    if not is_writer():  # a multi-process run: process 0 writes the files
        return directory
    metadata = {"format": "pt", CONFIG_DIGEST: config_digest(config_dict)}
    commit_files(directory, {
        ADAPTER_WEIGHTS: lambda: deterministic_safetensors(
            save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata=metadata)),
        ADAPTER_CONFIG: lambda: (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()})
    return directory


def read_adapter_config(directory) -> dict:
    """adapter_config.json as a dict; every failure names the file."""
    config_path = Path(directory) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({err}); the adapter is corrupt or "
                         f"half-written") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} holds a JSON {type(config).__name__}, not an object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}; only 'LORA' adapters are supported")
    return config


def read_adapter(directory) -> tuple[dict, dict]:
    """(adapter_config dict, tensors) from a PEFT adapter directory; a corrupt, truncated, non-finite or
    mismatched file is refused with its name."""
    from safetensors import SafetensorError, safe_open

    from fastlora_jax.validate import check_finite
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} not found (adapter_model.bin is not read: save with safetensors)")
    try:
        with safe_open(weights, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read adapter weights {str(weights)!r} (truncated or corrupt?): {err}") from None
    digest = metadata.get(CONFIG_DIGEST)
    if digest is not None and digest != config_digest(config):
        raise ValueError(f"{str(weights)!r} was written with a different {ADAPTER_CONFIG} than the one beside it "
                         f"(its r, lora_alpha, targets or another field that defines the tensors differ: a save "
                         f"interrupted between the two files, or an edited config); save the adapter again")
    for name, value in tensors.items():
        check_finite(name, value, str(weights))
    return config, tensors


# ------------------------------------------------------------------------------------------ merge


def merged_weight(weight_oi: np.ndarray, a_ri, b_or, scaling: float, magnitude_o=None) -> np.ndarray:
    """W + s·B·A in fp32 (DoRA: rescaled row-wise to the magnitude vector), as PEFT's merge does."""
    w = np.asarray(weight_oi, np.float32)
    delta = scaling * (np.asarray(b_or, np.float32) @ np.asarray(a_ri, np.float32))
    merged = w + delta
    if magnitude_o is not None:
        norm = np.linalg.norm(merged, axis=1)
        merged = merged * (np.asarray(magnitude_o, np.float32) / norm)[:, None]
    return merged


def merged_tensors(model, base_source):
    """Yield `(name, array)` for every HF tensor of the merged model, in the model's dtype, one at a time.
    `base_source(name)` gives the original base tensor as numpy (from the 16-bit checkpoint) or None
    (then the in-memory weight, dequantized)."""
    layout: LoraLayout = model.lora_layout
    lora = model.lora_params
    np_dtype = numpy_dtype(model.dtype.name)
    by_module = {t.name: t for t in layout.targets}
    saved = set(layout.saved_tensors)
    trained_bias = {f"{n}.bias" for n in layout.trainable_biases}
    names = model.tensor_names()
    if unties_head(model):
        names.append("lm_head.weight")
    for name in names:
        module, leaf = name.rsplit(".", 1)
        path, index = split_module(module, layout.stacks)
        if name in saved or name in trained_bias:
            value = get_node(lora, path + (leaf,))
            yield name, to_numpy(value[index] if index is not None else value).astype(np_dtype)
            continue
        value = base_source(name)
        if value is None:
            value = model.base_tensor(name)
        t = by_module.get(module)
        if t is not None and leaf == "weight":
            node = get_node(lora, path)
            if t.kind == "embedding":
                a, b = to_numpy(node["lora_embedding_A"])[: t.r], to_numpy(node["lora_embedding_B"])[:, : t.r]
                value = np.asarray(value, np.float32) + t.scaling * (b @ a).T
            else:
                sel = (lambda x: x[index]) if index is not None else (lambda x: x)
                a = to_numpy(sel(node["lora_A"]))[: t.r]
                b = to_numpy(sel(node["lora_B"]))[:, : t.r]
                mag = to_numpy(sel(node["lora_magnitude_vector"])) if layout.spec.use_dora else None
                value = merged_weight(value, a, b, t.scaling, mag)
        yield name, np.asarray(value).astype(np_dtype)


def unties_head(model) -> bool:
    """A tied model whose adapter changes the embedding or the head must be exported untied: merged into
    one shared matrix, the change would reach the other side too and the export would not be the model."""
    if not model.cfg.tie_word_embeddings:
        return False
    layout = model.lora_layout
    touched = {t.name for t in layout.targets} | set(layout.modules_to_save)
    return bool(touched & {model.family.OUTPUT_LAYER, model.family.EMBED_TOKENS})


def save_merged(model, directory, tokenizer=None, max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """A plain HF checkpoint (config.json without quantization_config, safetensors shards, tokenizer), with
    tensor names as transformers' save_pretrained writes them (`families.checkpoint_name`).

    Written into a temporary sibling directory that is renamed into place when complete (a failure leaves the
    previous export, or nothing); an existing non-empty directory is replaced only if it holds a previous
    export or adapter."""
    from fastlora_jax.convert.hf_checkpoint import find_checkpoint_files, iter_tensors
    from fastlora_jax.models.registry import checkpoint_name, stored_names

    from fastlora_jax.atomic import staged_directory

    directory = Path(directory)
    files = None
    if model.weights_source == "16bit" and getattr(model, "model_dir", None) is not None:
        files = find_checkpoint_files(model.model_dir)
        in_file = stored_names(model.family, files.tensor_to_file)
    elif model.is_4bit:
        why = ("LoftQ replaced the base weights" if model.weights_source == "loftq"
               else "the base was loaded from a 4-bit checkpoint")
        warnings.warn(f"{why}: merging into the dequantized NF4 weights in memory "
                      "(not the original 16-bit weights)", stacklevel=3)

    def base_source(name):
        if files is None or name not in in_file:
            return None
        return next(iter_tensors(files, [in_file[name]]))[1]

    renamed = ((checkpoint_name(model.family, name), value) for name, value in merged_tensors(model, base_source))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if unties_head(model):
        config["tie_word_embeddings"] = False
    config["dtype"] = model.dtype.name
    from fastlora_jax.sharding import is_writer
    if not is_writer():  # a multi-process run: every process takes part in gathering sharded tensors; 0 writes
        for _ in renamed:
            pass
        return directory
    with staged_directory(directory, replace_if=_is_export, what="merged export directory") as tmp:
        save_tensors(renamed, tmp, max_shard_bytes)
        atomic_write_bytes(tmp / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


def _is_export(directory: Path) -> bool:
    """A directory that holds a Hugging Face checkpoint or an adapter (what an export may replace)."""
    names = ("config.json", "model.safetensors", "model.safetensors.index.json", ADAPTER_CONFIG)
    return any((Path(directory) / n).is_file() for n in names)
