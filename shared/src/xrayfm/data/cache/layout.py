"""The cache folder on disk: its files, manifest and index, how to read them and how to tell it is stale.

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

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from xrayfm.errors import CacheMismatchError, DataError, XrayfmError
from xrayfm.utils import sha256_bytes

FORMAT = "xrayfm-cache"
FORMAT_VERSION = 1
VERIFY_MODES = ("stat", "size", "exists", "none")
FILES = {
    "images": "images.u8",
    "manifest": "manifest.json",
    "index": "index.csv",
    "done": "done.npy",
    "unreadable": "unreadable.json",
}
LOCK_FILE = ".lock"
STAT_COLUMNS = ("src_size", "src_mtime_ns", "status")
ID_COLUMNS = ("path", "patient_id", "study_id")
FORCE_HINT = "pass force=True to prepare_cache (CLI: xrayfm prepare --force) to rebuild it"


# -- fingerprints ------------------------------------------------------------------------------------
def stat_sources(paths: Sequence[str], progress: bool) -> tuple[np.ndarray, np.ndarray]:
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


def stats_sha(sizes: np.ndarray, mtimes: np.ndarray) -> str:
    """``stats_sha256`` of the manifest: the sources' sizes and mtimes."""
    return sha256_bytes(
        np.ascontiguousarray(sizes, dtype="<i8").tobytes(), np.ascontiguousarray(mtimes, "<i8").tobytes()
    )


def source_fingerprint(paths: Sequence[str], size: int, mode: str) -> str:
    """``fingerprint`` of the manifest: the settings and the ordered list of sources."""
    return sha256_bytes(f"{FORMAT} v{FORMAT_VERSION} size={size} mode={mode}", "\n".join(paths))


def table_sha(table: pd.DataFrame) -> str:
    """``table_sha256`` of the manifest: the index table's columns and values (csv + raw labels)."""
    return sha256_bytes(
        ",".join(map(str, table.columns)), pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()
    )


# -- reading -----------------------------------------------------------------------------------------
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
def changed_rows(
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
    sizes, mtimes = stat_sources(paths, progress=False)
    old_sizes, old_mtimes = index["src_size"].to_numpy(), index["src_mtime_ns"].to_numpy()
    rows = np.flatnonzero(changed_rows(old_sizes, old_mtimes, sizes, mtimes, mode) & handled)
    return [paths[r] for r in rows]


__all__ = [
    "FILES",
    "FORCE_HINT",
    "FORMAT",
    "FORMAT_VERSION",
    "ID_COLUMNS",
    "LOCK_FILE",
    "STAT_COLUMNS",
    "VERIFY_MODES",
    "changed_rows",
    "read_index",
    "read_manifest",
    "source_fingerprint",
    "stale_sources",
    "stat_sources",
    "stats_sha",
    "table_sha",
    "verify_cache",
]
