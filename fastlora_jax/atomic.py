"""Multi-file artifacts committed as a whole.

A single file is written under a temporary name and renamed (`atomic_write_bytes`). Two kinds of
multi-file artifact need more:

- files that share a directory with other things (an adapter in a trainer's `output_dir`, beside
  `checkpoints/`): `commit_files` writes every file under a temporary name first and renames them only once
  all exist, so a failed write replaces nothing; the rename of each file is atomic and the files carry a
  digest of each other (see convert/peft.py) so the short window between two renames is detected on read;
- a directory that is the artifact (a merged export): `staged_directory` writes a temporary sibling
  directory and renames it into place, so the target is either the old export or the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_bytes(path: Path, data: bytes) -> Path:
    """`data` in a temporary file beside `path` (fsynced, with the permissions a plain open would give)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is as readable as any file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a failed write leaves the previous file intact."""
    tmp = stage_bytes(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(Path(path).parent)


def commit_files(directory, files: dict) -> None:
    """Write every `name -> bytes (or a callable returning bytes)` of `files` into `directory`, all or none:
    all are staged under temporary names first; only then are they renamed into place, in the given order."""
    directory = Path(directory)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            staged.append((stage_bytes(directory / name, data() if callable(data) else data), directory / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def staged_directory(target, replace_if=lambda path: True, what: str = "output"):
    """Yield a temporary sibling of `target` to write into; on success it becomes `target` (an existing
    `target` for which `replace_if(target)` holds is replaced; a non-empty one for which it does not is
    refused before anything is written). On failure the temporary directory is removed and `target` is
    untouched."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{what} {str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not replace_if(target):
        raise FileExistsError(f"{what} {str(target)!r} is a non-empty directory that does not hold a previous "
                              f"export; choose a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / "previous")
        elif target.is_dir():
            target.rmdir()
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", target)
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
