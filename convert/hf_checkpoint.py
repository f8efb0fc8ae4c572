"""Reading a local Hugging Face checkpoint directory tensor by tensor.

The checkpoint is never held in host memory whole: safetensors' lazy reader (`safe_open`) hands out one
tensor at a time, and each shard is opened only while its tensors are read. Every failure names the file
(and tensor) so that a broken download never turns into a silently wrong model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def numpy_dtype(name: str):
    """The numpy dtype safetensors files hold for a dtype name ("float32", "bfloat16", "float16")."""
    import ml_dtypes
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as the model it claims to be."""


@dataclass(frozen=True)
class CheckpointFiles:
    """Where each tensor of a checkpoint lives: tensor name -> shard path."""

    directory: Path
    tensor_to_file: dict[str, Path]

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.tensor_to_file.values()))


def read_config_dict(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist or is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: a Hugging Face model directory needs config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON: {err}") from None


def find_checkpoint_files(directory: str | os.PathLike) -> CheckpointFiles:
    """Locate `model.safetensors` or the shards listed in `model.safetensors.index.json`."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    single_path = directory / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{str(index_path)!r} is not a safetensors index (needs 'weight_map'): {err}") from None
        tensor_to_file = {name: directory / fname for name, fname in weight_map.items()}
        for path in sorted(set(tensor_to_file.values())):
            if not path.is_file():
                raise FileNotFoundError(f"shard {str(path)!r} listed in {str(index_path)!r} does not exist")
        return CheckpointFiles(directory, tensor_to_file)
    if single_path.is_file():
        tensor_to_file = {name: single_path for name in _tensor_names(single_path)}
        return CheckpointFiles(directory, tensor_to_file)
    found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = f" (found {found}: only safetensors checkpoints are read; re-save with safe_serialization=True)" if found else ""
    raise FileNotFoundError(f"no weights in {str(directory)!r}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {err}") from None


def iter_tensors(files: CheckpointFiles, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` one tensor at a time, in file order.

    Each tensor is read through its own short-lived `safe_open`: the file is memory-mapped only while that
    tensor is copied out, so the mapped pages of a 5 GB shard never pile up in the process's resident
    memory. bfloat16 tensors come back as numpy arrays of `ml_dtypes.bfloat16`.
    """
    wanted = list(files.tensor_to_file) if names is None else names
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name not in files.tensor_to_file:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {str(files.directory)!r}")
        by_file.setdefault(files.tensor_to_file[name], []).append(name)
    for path, tensor_names in by_file.items():
        for name in tensor_names:
            try:
                with safe_open(path, framework="numpy") as f:
                    if name not in f.keys():
                        raise CheckpointError(f"tensor {name!r} is listed for {str(path)!r} but that file does not hold it")
                    array = f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as err:
                if isinstance(err, CheckpointError):
                    raise
                raise CheckpointError(
                    f"cannot read tensor {name!r} from {str(path)!r} (truncated or corrupt?): {err}") from None
            yield name, array


def tensor_shapes(files: CheckpointFiles) -> dict[str, tuple[int, ...]]:
    """Shapes from the headers only: lets a loader check a checkpoint before reading any data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files.files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {err}") from None
    return shapes


# ------------------------------------------------------------------------------------------ writing


def atomic_write_bytes(path: Path, data: bytes) -> None:
    from fastlora_jax.atomic import atomic_write_bytes as write
    write(path, data)


def atomic_save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict | None = None) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))


def save_tensors(tensors, directory, max_shard_bytes: int | None = None) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` with `model.safetensors.index.json`, as
    transformers lays them out. `tensors` is a dict or an iterator of `(name, array)`: one shard at a time
    is held in memory. Shards are written under temporary names and renamed once all of them exist."""
    directory = Path(directory)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".shard-", suffix=".safetensors.tmp")
        os.close(fd)
        atomic_save_safetensors(shard, Path(tmp), metadata={"format": "pt"})
        written.append((Path(tmp), list(shard)))

    try:
        for name, value in items:
            if max_shard_bytes is not None and shard and size + value.nbytes > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = value
            size += value.nbytes
            total += value.nbytes
        if len(written) == 0:
            atomic_save_safetensors(shard, directory / SINGLE_FILE, metadata={"format": "pt"})
            return
        flush()
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    weight_map = {}
    for k, (tmp, names) in enumerate(written):
        fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, directory / fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    atomic_write_bytes(directory / INDEX_FILE, json.dumps(index, indent=2).encode())
