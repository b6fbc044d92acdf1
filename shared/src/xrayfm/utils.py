"""Small file and JSON helpers every layer shares: strict JSON, atomic writes, SHA-256, a file lock.

This is the lowest layer of the library (beside :mod:`xrayfm.errors`): it imports only the standard
library and numpy, never torch, so the torch-free services can use it too. Each helper exists once;
look here before writing another.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.errors import XrayfmError, list_offenders

# ------------------------------------------------------------------------------------------------ JSON


def to_jsonable(obj: Any, *, strict: bool = False, where: str = "value") -> Any:
    """A strict-JSON copy of `obj`: numpy/torch scalars and arrays become Python, tuples and sets lists,
    paths strings, and NaN/inf ``None`` (JSON has no NaN; an undefined AUROC is ``null``).

    With ``strict=True`` anything else (and a non-string key) raises :class:`XrayfmError` naming where
    it is: use it for metadata that must round-trip exactly (checkpoints). Otherwise unknown objects
    become their float value when they have one, else their text.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        if strict:
            bad = [k for k in obj if not isinstance(k, str)]
            if bad:
                raise XrayfmError(f"{where} has non-string keys {list_offenders(bad)}: JSON needs strings")
        return {str(k): to_jsonable(v, strict=strict, where=f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v, strict=strict, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if strict:
        raise XrayfmError(f"{where} is a {type(obj).__name__}: it must be plain JSON data")
    if hasattr(obj, "item"):  # torch / numpy 0-d values
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return to_jsonable(obj.item())
    if hasattr(obj, "tolist"):  # torch tensors and other array-likes with several values
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return to_jsonable(obj.tolist())
    try:
        return to_jsonable(float(obj))
    except (TypeError, ValueError):
        return str(obj)


def read_json(path: str | os.PathLike, default: Any = ...) -> Any:
    """Parse a JSON file; `default` (when given) for a missing file; a clear error for a broken one.

    The error names the file and the position of the fault, never the file's contents.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if default is ...:
            raise XrayfmError(f"file not found: {path}") from None
        return default
    try:
        return json.loads(text)
    except ValueError as exc:
        position = f"line {exc.lineno}, column {exc.colno}" if hasattr(exc, "lineno") else "unknown position"
        raise XrayfmError(f"{path} is not valid JSON ({position})") from None


# ---------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` in one rename.

    A crash or an exception leaves `path` as it was (old content or absent) and removes the temporary
    file, so readers never see half a file. Use it for writers that want a file name (np.save, safetensors).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to `path` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (see :func:`to_jsonable`), atomically, ending in a newline."""
    atomic_write(path, json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    rename(2) cannot replace a non-empty folder, so an existing `out_dir` is first renamed aside and
    deleted after the swap; the previous folder is never modified in place.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{token}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_tree(out.parent, files=False)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (when asked) and its entries to disk, where the OS supports it."""
    targets = [p for p in folder.iterdir() if p.is_file()] if files else []
    for target in [*targets, folder]:
        with contextlib.suppress(OSError):
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------- SHA-256


def sha256_bytes(*parts: bytes | str) -> str:
    """Hex SHA-256 of one or more parts (text is UTF-8; parts are separated, so ("ab","c") != ("a","bc"))."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        raise XrayfmError(f"file not found: {path}") from None


def sha256_folder(path: str | os.PathLike) -> str:
    """Hex SHA-256 over a folder's files (relative names and bytes, sorted); a file hashes as itself."""
    root = Path(path)
    if not root.is_dir():
        return sha256_file(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- file lock


class LockBusy(XrayfmError):
    """Another process holds the lock (only raised when not waiting for it)."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `path` for the block; the file is created if needed.

    With ``wait=False`` a held lock raises :class:`LockBusy` at once. The lock is released when the block
    ends or the process dies, so a killed holder never leaves it stuck.
    """
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockBusy(f"{lock} is locked by another process") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
