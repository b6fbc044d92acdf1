"""Build the preprocessing cache: ``prepare_cache`` decodes every image once, on all cores, into a folder.

Each source image is decoded once (``read_image_resized``: ``pad`` keeps the whole image and its aspect
ratio, ``crop`` / ``stretch`` also exist) into the memory-mapped array of the folder described in
:mod:`xrayfm.data.cache.layout`. A build is resumable (``done.npy`` records the rows handled), a no-op on
unchanged sources, refused on changed ones unless ``force=True``, and never runs twice at once on a folder.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from xrayfm.data.base import XrayDataset
from xrayfm.data.cache.layout import (
    FILES,
    FORCE_HINT,
    FORMAT,
    FORMAT_VERSION,
    LOCK_FILE,
    STAT_COLUMNS,
    changed_rows,
    read_index,
    read_manifest,
    source_fingerprint,
    stat_sources,
    stats_sha,
    table_sha,
)
from xrayfm.data.images import RESIZE_MODES, read_image_resized
from xrayfm.errors import CacheMismatchError, DataError, ImageDecodeError, XrayfmError, list_offenders
from xrayfm.utils import LockBusy, atomic_path, atomic_write_json, file_lock

MODES = RESIZE_MODES  # pad (default: keeps the whole image), crop, stretch
FLUSH_SECONDS = 2.0  # how often the parent persists done.npy while workers run


# -- small helpers -----------------------------------------------------------------------------------
def _save_done(path: Path, done: np.ndarray) -> None:
    """Write done.npy atomically (a kill leaves the previous one)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append ".npy"
        np.save(f, done)


def _default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Refuse to let two prepare runs write the same cache at once (advisory lock on ``out/.lock``)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(out / LOCK_FILE, wait=False))
        except LockBusy:
            raise XrayfmError(
                f"another process is writing the cache at {out}; wait for it to finish"
            ) from None
        yield


# -- the index table ---------------------------------------------------------------------------------
def _build_table(dataset: XrayDataset) -> tuple[pd.DataFrame, list[str]]:
    """The dataset's csv plus its raw labels (one column per pathology); returns (table, csv columns)."""
    pathologies = [str(p) for p in dataset.pathologies]
    raw = np.asarray(dataset.raw_labels, dtype=np.float32)
    csv = dataset.csv.reset_index(drop=True)
    if "path" not in csv:
        raise DataError(f"dataset {type(dataset).__name__} has no 'path' column in its csv")
    if raw.shape != (len(csv), len(pathologies)):
        raise DataError(
            f"raw_labels shape {raw.shape} does not match {len(csv)} rows x {len(pathologies)} labels"
        )
    # The raw label columns are authoritative; csv columns with a clashing name are dropped.
    reserved = set(pathologies) | set(STAT_COLUMNS)
    csv_columns = [str(c) for c in csv.columns if str(c) not in reserved]
    table = csv[csv_columns].copy()
    table["path"] = table["path"].astype(str)
    labels = pd.DataFrame(raw, columns=pathologies)
    return pd.concat([table, labels], axis=1), csv_columns


# -- staleness ---------------------------------------------------------------------------------------
def _describe_changes(paths: Sequence[str], old_sizes, sizes, rows: np.ndarray) -> list[str]:
    out = []
    for r in rows:
        what = "now missing" if sizes[r] < 0 else "now present" if old_sizes[r] < 0 else "modified"
        out.append(f"{paths[r]} ({what})")
    return out


def _changed_settings(manifest: dict[str, Any], size: int, mode: str) -> list[str]:
    return [
        f"{key}: cached {manifest.get(key)!r}, asked {want!r}"
        for key, want in (("size", size), ("mode", mode))
        if manifest.get(key) != want
    ]


# -- workers -----------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(images_path: str, shape: tuple[int, int, int], size: int, mode: str) -> None:
    """Runs once per worker process: open the shared array read-write."""
    _WORKER["images"] = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    _WORKER["size"], _WORKER["mode"] = size, mode


def _init_pool_worker(parent: int, *args: Any) -> None:
    """Pool workers leave Ctrl-C to the parent, which records progress and shuts the pool down,
    and exit on their own if the parent (pid ``parent``) is killed outright (kill -9, OOM killer)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _init_worker(*args)


def _exit_with_parent(parent: int) -> None:
    # ProcessPoolExecutor workers would otherwise wait forever on a queue whose writer died.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _process_chunk(rows: list[int], paths: list[str]) -> tuple[list[int], dict[int, dict[str, str]]]:
    """Decode ``paths`` into ``images[rows]``; returns the rows and {row: error} for skipped ones."""
    images, size, mode = _WORKER["images"], _WORKER["size"], _WORKER["mode"]
    errors: dict[int, dict[str, str]] = {}
    for row, path in zip(rows, paths, strict=True):
        try:
            pixels = read_image_resized(path, size, mode=mode)
        except (ImageDecodeError, FileNotFoundError) as exc:
            status = "unreadable" if os.path.exists(path) else "missing"
            errors[row] = {"path": path, "status": status, "error": str(exc)}
            continue
        if pixels.shape != (size, size) or pixels.dtype != np.uint8:
            raise AssertionError(f"read_image_resized gave {pixels.dtype} {pixels.shape} for {path}")
        images[row] = pixels
    images.flush()  # pixels reach the file before the parent marks these rows done
    return rows, errors


def _run_chunks(chunks: list[tuple[list[int], list[str]]], init_args: tuple, workers: int) -> Iterator[tuple]:
    """Yield chunk results as they finish: in this process for one worker, else in a process pool."""
    if not chunks:
        return
    if workers <= 1:
        _init_worker(*init_args)
        try:
            for rows, paths in chunks:
                yield _process_chunk(rows, paths)
        finally:
            _WORKER.clear()
        return
    # spawn: workers start clean (no inherited threads or locks from torch in the parent).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_pool_worker, initargs=(os.getpid(), *init_args)
    ) as pool:
        pending = {pool.submit(_process_chunk, rows, paths) for rows, paths in chunks}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


# -- prepare -----------------------------------------------------------------------------------------
def _summary(
    manifest: dict[str, Any], out: Path, written: int, seconds: float, **extra: Any
) -> dict[str, Any]:
    counts = manifest["counts"]
    return {
        "cache": str(out),
        "images": manifest["images"],
        "usable": counts["ok"],
        "written": written,
        "skipped": manifest["skipped"],
        "seconds": round(seconds, 3),
        "images_per_s": round(written / seconds, 1) if written and seconds > 0 else None,
        **extra,
    }


def _skip_report(
    status: np.ndarray, paths: Sequence[str], errors: dict[int, dict[str, str]]
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for reason in ("missing", "unreadable"):
        rows = np.flatnonzero(status == reason)
        if len(rows):
            counts[reason] = len(rows)
            examples[reason] = [
                f"{paths[r]}: {errors[r]['error']}" if r in errors else paths[r] for r in rows[:5]
            ]
    return {"total": sum(counts.values()), "counts": counts, "examples": examples}


def _remove_cache_files(out: Path) -> None:
    """Delete the cache files and the temporaries a killed write may have left (``.NAME.*.tmp``)."""
    for name in FILES.values():
        for path in (out / name, out / (name + ".tmp"), *out.glob(f".{name}.*.tmp")):
            path.unlink(missing_ok=True)


def prepare_cache(
    dataset: XrayDataset,
    out: str | Path,
    size: int = 224,
    mode: str = "pad",
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
    chunk: int = 256,
    force: bool = False,
) -> dict[str, Any]:
    """Decode every image of ``dataset`` once into a memory-mapped cache under ``out``.

    Resumable (a killed run continues where it stopped), a no-op when nothing changed, and refuses
    (CacheMismatchError) when sources or settings changed unless ``force=True`` rebuilds it.
    Missing/unreadable images are skipped and reported (``strict=True`` raises DataError instead).
    Returns a summary: images, usable, written, skipped (counts and examples), seconds, no_op.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise XrayfmError(f"unknown resize mode {mode!r}; choose from {', '.join(MODES)}")
    if int(size) < 1 or int(chunk) < 1:
        raise XrayfmError(f"size and chunk must be positive (got size={size}, chunk={chunk})")
    size, chunk = int(size), int(chunk)
    workers = _default_workers() if workers is None else max(1, int(workers))
    out = Path(out).expanduser().resolve()

    table, csv_columns = _build_table(dataset)
    paths = table["path"].tolist()
    n = len(paths)
    if n == 0:
        raise DataError(f"dataset {type(dataset).__name__} has no rows to cache")
    fingerprint = source_fingerprint(paths, size, mode)
    table_hash = table_sha(table)

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if force:
            _remove_cache_files(out)
        sizes, mtimes = stat_sources(paths, progress)
        missing_now = np.flatnonzero(sizes < 0)
        if strict and len(missing_now):
            raise DataError(
                f"{len(missing_now)} source image(s) missing: {list_offenders(paths[r] for r in missing_now)}"
            )

        state = _resume_state(out, paths, sizes, mtimes, size, mode, fingerprint)
        resumed = no_op = False
        if state is None:
            done = np.zeros(n, dtype=bool)
            errors: dict[int, dict[str, str]] = {}
            manifest = _new_manifest(dataset, csv_columns, n, size, mode, fingerprint)
            with open(out / FILES["images"], "wb") as f:
                f.truncate(n * size * size)  # sparse file; workers fill their rows
        else:
            manifest, done, errors, old_sizes, old_mtimes = state
            # Rows not yet handled take the current stat; handled rows were checked unchanged.
            sizes = np.where(done, old_sizes, sizes)
            mtimes = np.where(done, old_mtimes, mtimes)
            resumed = not manifest["complete"]
            no_op = manifest["complete"] and manifest["table_sha256"] == table_hash

        written = 0
        if not no_op:
            # Missing sources need no worker: mark them handled now.
            missing_rows = np.flatnonzero(~done & (sizes < 0))
            for r in missing_rows:
                errors[int(r)] = {"path": paths[r], "status": "missing", "error": "file not found"}
            done[missing_rows] = True
            if not manifest["complete"]:
                _write_index(out, table, sizes, mtimes, done, errors)
                atomic_write_json(out / FILES["manifest"], manifest)
                _save_done(out / FILES["done"], done)

            todo = np.flatnonzero(~done)
            init_args = (str(out / FILES["images"]), (n, size, size), size, mode)
            written = _fill(
                out, paths, todo, done, errors, sizes, mtimes, init_args, workers, chunk, progress
            )

            status = _write_index(out, table, sizes, mtimes, done, errors)
            manifest.update(
                complete=True,
                finished=datetime.now(UTC).isoformat(timespec="seconds"),
                stats_sha256=stats_sha(sizes, mtimes),
                table_sha256=table_hash,
                counts={k: int((status == k).sum()) for k in ("ok", "missing", "unreadable")},
                skipped=_skip_report(status, paths, errors),
            )
            atomic_write_json(out / FILES["manifest"], manifest)

    summary = _summary(
        manifest,
        out,
        written,
        time.perf_counter() - start,
        no_op=no_op,
        resumed=resumed,
        index_updated=state is not None and not no_op and not resumed,
    )
    skipped = manifest["skipped"]
    examples = [e for ex in skipped["examples"].values() for e in ex]
    if strict and skipped["total"]:
        raise DataError(
            f"{skipped['total']} image(s) could not be cached {skipped['counts']}: {list_offenders(examples)}"
        )
    if manifest["counts"]["ok"] == 0:
        raise DataError(
            f"no usable images: all {n} were skipped {skipped['counts']}; e.g. {list_offenders(examples)}"
        )
    return summary


def _new_manifest(
    dataset: XrayDataset, csv_columns: list[str], n: int, size: int, mode: str, fingerprint: str
) -> dict[str, Any]:
    from xrayfm import __version__

    root = getattr(dataset, "root", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": getattr(dataset, "kind", type(dataset).__name__),
        "root": str(root) if root is not None else None,
        "split": getattr(dataset, "split", None),
        "pathologies": [str(p) for p in dataset.pathologies],
        "csv_columns": csv_columns,
        "images": n,
        "size": size,
        "mode": mode,
        "dtype": "uint8",
        "shape": [n, size, size],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "xrayfm_version": __version__,
        "complete": False,
        "fingerprint": fingerprint,
        "stats_sha256": None,
        "table_sha256": None,
        "counts": {},
        "skipped": {"total": 0, "counts": {}, "examples": {}},
    }


def _resume_state(
    out: Path, paths: list[str], sizes: np.ndarray, mtimes: np.ndarray, size: int, mode: str, fingerprint: str
):
    """Load an existing cache at ``out`` after checking it matches; None when there is none."""
    if not (out / FILES["manifest"]).exists():
        leftovers = [name for name in FILES.values() if (out / name).exists()]
        if leftovers:
            raise CacheMismatchError(f"{out} holds {', '.join(leftovers)} but no manifest.json; {FORCE_HINT}")
        return None
    manifest = read_manifest(out)
    changed = _changed_settings(manifest, size, mode)
    if changed:
        raise CacheMismatchError(
            f"cache {out} was built with other settings ({'; '.join(changed)}); {FORCE_HINT}"
        )
    if manifest["fingerprint"] != fingerprint:
        index = read_index(out, manifest)
        old = index["path"].tolist()
        added, removed = sorted(set(paths) - set(old)), sorted(set(old) - set(paths))
        detail = "; ".join(
            part
            for part in (
                f"{len(added)} new: {list_offenders(added, 5)}" if added else "",
                f"{len(removed)} gone: {list_offenders(removed, 5)}" if removed else "",
                "same files in another order" if not added and not removed else "",
            )
            if part
        )
        raise CacheMismatchError(
            f"cache {out} was built from another list of images ({detail}); {FORCE_HINT}"
        )
    images = out / FILES["images"]
    n = len(paths)
    if not images.exists() or images.stat().st_size != n * size * size:
        raise CacheMismatchError(
            f"{images} is missing or has the wrong size: the cache is damaged; {FORCE_HINT}"
        )
    done_path = out / FILES["done"]
    done = np.load(done_path) if done_path.exists() else np.zeros(0, dtype=bool)
    if done.shape != (n,) or done.dtype != bool:
        raise CacheMismatchError(f"{done_path} is missing or does not match {n} rows; {FORCE_HINT}")
    errors = _read_errors(out, done)
    if manifest["complete"] and manifest["stats_sha256"] == stats_sha(sizes, mtimes):
        # Fast path: nothing changed on disk; no need to read index.csv.
        return manifest, done, errors, sizes, mtimes
    index = read_index(out, manifest)
    old_sizes, old_mtimes = index["src_size"].to_numpy(), index["src_mtime_ns"].to_numpy()
    bad = np.flatnonzero(changed_rows(old_sizes, old_mtimes, sizes, mtimes, "stat") & done)
    if len(bad):
        raise CacheMismatchError(
            f"cache {out} is stale: {len(bad)} source file(s) changed since caching: "
            f"{list_offenders(_describe_changes(paths, old_sizes, sizes, bad))}; {FORCE_HINT}"
        )
    return manifest, done, errors, old_sizes, old_mtimes


def _read_errors(out: Path, done: np.ndarray) -> dict[int, dict[str, str]]:
    """The skip log; entries for rows not marked done (a run killed between two writes) are redone."""
    path = out / FILES["unreadable"]
    logged = json.loads(path.read_text()) if path.exists() else {}
    return {int(r): e for r, e in logged.items() if done[int(r)]}


def _fill(out, paths, todo, done, errors, sizes, mtimes, init_args, workers, chunk, progress) -> int:
    """Decode the rows in ``todo``; persist progress in done.npy regularly. Returns rows handled."""
    if workers > 1:  # small jobs get smaller chunks, so that every worker has several to balance
        chunk = max(1, min(chunk, -(-len(todo) // (4 * workers))))
    chunks = [
        (todo[i : i + chunk].tolist(), [paths[r] for r in todo[i : i + chunk]])
        for i in range(0, len(todo), chunk)
    ]
    handled, last_flush = 0, time.monotonic()

    def flush() -> None:
        atomic_write_json(out / FILES["unreadable"], {str(r): e for r, e in sorted(errors.items())})
        _save_done(out / FILES["done"], done)

    bar = tqdm(
        total=len(done),
        initial=int(done.sum()),
        desc="caching",
        unit="img",
        disable=not progress,
        smoothing=0.05,
    )
    try:
        for rows, chunk_errors in _run_chunks(chunks, init_args, min(workers, len(chunks))):
            for r, e in chunk_errors.items():
                errors[r] = e
                if e["status"] == "missing":  # vanished since the stat: record it as missing
                    sizes[r] = mtimes[r] = -1
            done[rows] = True
            handled += len(rows)
            bar.update(len(rows))
            if time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()
                last_flush = time.monotonic()
    finally:
        bar.close()
        flush()
    return handled


def _write_index(
    out: Path,
    table: pd.DataFrame,
    sizes: np.ndarray,
    mtimes: np.ndarray,
    done: np.ndarray,
    errors: dict[int, dict[str, str]],
) -> np.ndarray:
    """Write index.csv (dataset columns, raw labels, source stats, status); returns the status column."""
    status = np.where(done, "ok", "pending").astype(object)
    for r, e in errors.items():
        status[r] = e["status"]
    index = table.copy()
    index["src_size"], index["src_mtime_ns"], index["status"] = sizes, mtimes, status
    with atomic_path(out / FILES["index"]) as tmp:
        index.to_csv(tmp, index=False)
    return status


__all__ = ["MODES", "prepare_cache"]
