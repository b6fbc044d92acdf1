"""Preprocessing cache: decode every radiograph once, then train from a memory-mapped uint8 array.

``prepare_cache(dataset, out)`` decodes each source image once (``read_image_resized``: ``pad`` keeps the
whole image and its aspect ratio, ``crop`` / ``stretch`` also exist), on all cores, into a folder that
epochs read without any JPEG work.

Cache folder layout (plain, readable formats only; nothing is ever pickled)::

    images.u8        raw uint8 array, N x S x S, C order, no header:
                     np.memmap("images.u8", dtype=np.uint8, mode="r", shape=(N, S, S))
    manifest.json    format and version, dataset kind/root/split, pathologies, size, mode, created,
                     xrayfm version, counts, ``complete`` flag, skips with examples, and fingerprints:
                     ``fingerprint`` = sha256 of the settings + the ordered source list,
                     ``stats_sha256`` (source sizes/mtimes), ``table_sha256`` (csv + raw labels)
    index.csv        one row per source image, in dataset order (row i <-> images[i]): the dataset's csv
                     columns, the RAW labels (one column per pathology: 1 / 0 / -1 / blank), ``src_size``,
                     ``src_mtime_ns`` (-1 when missing) and ``status`` in {ok, missing, unreadable, pending}
    done.npy         bool [N]: rows already handled (written or skipped); a killed run resumes from it
    unreadable.json  {row: {"path", "status", "error"}} for the rows that could not be decoded
    .lock            taken while a prepare run writes the folder (two runs never write at once)

Labels are stored raw, so the uncertainty policy is chosen when loading (``CachedDataset(policy=...)``).
A rerun with the same settings on unchanged sources is a no-op; changed sources or settings raise
:class:`~xrayfm.errors.CacheMismatchError` until the cache is rebuilt with ``force=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from xrayfm.data.images import RESIZE_MODES, read_image_resized
from xrayfm.errors import CacheMismatchError, DataError, ImageDecodeError, XrayfmError, list_offenders

FORMAT = "xrayfm-cache"
FORMAT_VERSION = 1
MODES = RESIZE_MODES  # pad (default: keeps the whole image), crop, stretch
VERIFY_MODES = ("stat", "size", "exists", "none")
FILES = {
    "images": "images.u8",
    "manifest": "manifest.json",
    "index": "index.csv",
    "done": "done.npy",
    "unreadable": "unreadable.json",
}
STAT_COLUMNS = ("src_size", "src_mtime_ns", "status")
ID_COLUMNS = ("path", "patient_id", "study_id")
FLUSH_SECONDS = 2.0  # how often the parent persists done.npy while workers run
FORCE_HINT = "pass force=True to prepare_cache (CLI: xrayfm prepare --force) to rebuild it"


# -- small helpers -----------------------------------------------------------------------------------
def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary sibling and rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def _save_done(path: Path, done: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare .tmp name
            np.save(f, done)

    _write_atomic(path, write)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stat_sources(paths: Sequence[str], progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Size and mtime (ns) of every source; -1 for files that do not exist."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for i, p in enumerate(tqdm(paths, desc="stat sources", unit="file", disable=not progress, leave=False)):
        try:
            st = os.stat(p)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _stats_sha(sizes: np.ndarray, mtimes: np.ndarray) -> str:
    return _sha256(
        np.ascontiguousarray(sizes, dtype="<i8").tobytes(), np.ascontiguousarray(mtimes, "<i8").tobytes()
    )


def _source_fingerprint(paths: Sequence[str], size: int, mode: str) -> str:
    return _sha256(f"{FORMAT} v{FORMAT_VERSION} size={size} mode={mode}", "\n".join(paths))


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Refuse to let two prepare runs write the same cache at once (advisory lock, POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock, carry on
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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


def _table_sha(table: pd.DataFrame) -> str:
    return _sha256(
        ",".join(map(str, table.columns)), pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()
    )


def read_index(cache_dir: Path, manifest: dict[str, Any]) -> pd.DataFrame:
    """index.csv with its dtypes: ids as text, labels float32 (blank = NaN), source stats int64."""
    dtypes: dict[str, Any] = {c: str for c in ID_COLUMNS if c in manifest["csv_columns"]}
    dtypes.update({p: np.float32 for p in manifest["pathologies"]})
    dtypes.update({"src_size": np.int64, "src_mtime_ns": np.int64, "status": str})
    index = pd.read_csv(cache_dir / FILES["index"], dtype=dtypes)
    if len(index) != manifest["images"]:
        raise CacheMismatchError(
            f"{cache_dir / FILES['index']} has {len(index)} rows, manifest says "
            f"{manifest['images']}: the cache is damaged; {FORCE_HINT}"
        )
    return index


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """manifest.json of a cache, after checking it is a cache this version of xrayfm reads."""
    path = Path(cache_dir) / FILES["manifest"]
    if not path.exists():
        raise DataError(
            f"{cache_dir} is not an xrayfm cache (no {FILES['manifest']}); build it with prepare_cache"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path} has format {manifest.get('format')!r} v{manifest.get('format_version')}, this xrayfm "
            f"reads {FORMAT} v{FORMAT_VERSION}; {FORCE_HINT}"
        )
    return manifest


# -- staleness ---------------------------------------------------------------------------------------
def _changed_rows(
    old_sizes: np.ndarray, old_mtimes: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray, mode: str
) -> np.ndarray:
    """Bool mask of rows whose source differs from what was recorded (``mode``: stat, size or exists)."""
    existed, exists = old_sizes >= 0, sizes >= 0
    if mode == "exists":
        return existed & ~exists
    changed = existed != exists
    changed |= existed & exists & (old_sizes != sizes)
    if mode == "stat":
        changed |= existed & exists & (old_mtimes != mtimes)
    return changed


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


def verify_cache(cache_dir: str | Path, mode: str = "stat") -> list[str]:
    """Source files that changed or went missing since they were cached (empty list: cache is current).

    ``mode``: ``stat`` compares size and mtime, ``size`` only the size (for copies that lose mtimes),
    ``exists`` only checks that cached files still exist.
    """
    if mode not in VERIFY_MODES[:-1]:
        raise XrayfmError(f"unknown verify mode {mode!r}; choose from {', '.join(VERIFY_MODES[:-1])}")
    cache_dir = Path(cache_dir)
    return stale_sources(read_index(cache_dir, read_manifest(cache_dir)), mode)


def stale_sources(index: pd.DataFrame, mode: str = "stat") -> list[str]:
    """Like :func:`verify_cache`, on an index table already read."""
    handled = (index["status"] != "pending").to_numpy()
    paths = index["path"].tolist()
    sizes, mtimes = _stat_sources(paths, progress=False)
    old_sizes, old_mtimes = index["src_size"].to_numpy(), index["src_mtime_ns"].to_numpy()
    rows = np.flatnonzero(_changed_rows(old_sizes, old_mtimes, sizes, mtimes, mode) & handled)
    return [paths[r] for r in rows]


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
    for name in FILES.values():
        for path in (out / name, out / (name + ".tmp")):
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
    fingerprint = _source_fingerprint(paths, size, mode)
    table_sha = _table_sha(table)

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if force:
            _remove_cache_files(out)
        sizes, mtimes = _stat_sources(paths, progress)
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
            no_op = manifest["complete"] and manifest["table_sha256"] == table_sha

        written = 0
        if not no_op:
            # Missing sources need no worker: mark them handled now.
            missing_rows = np.flatnonzero(~done & (sizes < 0))
            for r in missing_rows:
                errors[int(r)] = {"path": paths[r], "status": "missing", "error": "file not found"}
            done[missing_rows] = True
            if not manifest["complete"]:
                _write_index(out, table, sizes, mtimes, done, errors)
                _write_json(out / FILES["manifest"], manifest)
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
                stats_sha256=_stats_sha(sizes, mtimes),
                table_sha256=table_sha,
                counts={k: int((status == k).sum()) for k in ("ok", "missing", "unreadable")},
                skipped=_skip_report(status, paths, errors),
            )
            _write_json(out / FILES["manifest"], manifest)

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
    if manifest["complete"] and manifest["stats_sha256"] == _stats_sha(sizes, mtimes):
        # Fast path: nothing changed on disk; no need to read index.csv.
        return manifest, done, errors, sizes, mtimes
    index = read_index(out, manifest)
    old_sizes, old_mtimes = index["src_size"].to_numpy(), index["src_mtime_ns"].to_numpy()
    bad = np.flatnonzero(_changed_rows(old_sizes, old_mtimes, sizes, mtimes, "stat") & done)
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
        _write_json(out / FILES["unreadable"], {str(r): e for r, e in sorted(errors.items())})
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
    _write_atomic(out / FILES["index"], lambda p: index.to_csv(p, index=False))
    return status


__all__ = [
    "FILES",
    "FORMAT_VERSION",
    "prepare_cache",
    "read_index",
    "read_manifest",
    "stale_sources",
    "verify_cache",
]
