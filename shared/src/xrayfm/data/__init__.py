"""Datasets in their official layouts, decoding, the preprocessing cache and synthetic phantoms.

    from xrayfm.data import open_dataset
    ds = open_dataset("chexpert", "CheXpert-v1.0-small", split="valid", policy="u-ones")

Names are imported lazily, so that listing the dataset kinds (``xrayfm --help``) does not pay for pandas.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xrayfm.errors import DataError

if TYPE_CHECKING:
    from xrayfm.data.base import XrayDataset

DATASET_KINDS = ("chexpert", "mura", "nih", "folder", "csv")

_EXPORTS = {
    "CHEXPERT_LABELS": "xrayfm.data.labels",
    "COMPETITION_TASKS": "xrayfm.data.labels",
    "LabelPolicy": "xrayfm.data.labels",
    "parse_policy": "xrayfm.data.labels",
    "XrayDataset": "xrayfm.data.base",
}


def open_dataset(kind: str, root: str | Path, split: str | None = None, **options: Any) -> XrayDataset:
    """Open a dataset reader by kind (``chexpert``, ``mura``, ``nih``, ``folder``, ``csv``).

    ``split`` defaults to each layout's natural one (train; ``all`` for NIH; ignored for csv).
    Options go to the reader (``policy``, ``frontal_only``, ``body_parts``, ``path_column``...).
    """
    from xrayfm.data.chexpert import CheXpert
    from xrayfm.data.folder import CsvDataset, ImageFolder
    from xrayfm.data.mura import MURA
    from xrayfm.data.nih import NIHChestXray14

    options = {k: v for k, v in options.items() if v is not None}
    if kind == "chexpert":
        return CheXpert(root, split or "train", **options)
    if kind == "mura":
        return MURA(root, split or "train", **options)
    if kind == "nih":
        return NIHChestXray14(root, split or "all", **options)
    if kind == "folder":
        return ImageFolder(root, split or "train", **options)
    if kind == "csv":
        return CsvDataset(root, **options)
    raise DataError(f"unknown dataset kind {kind!r}; choose from {', '.join(DATASET_KINDS)}")


def split_source(spec: str) -> tuple[str, str, str | None]:
    """A dataset named ``KIND:ROOT[:SPLIT]`` (the --data of ``xrayfm gate`` and ``xrayfm calibrate``, a
    calibrate job's ``data``) -> (kind, root, split or None). A split is the last ``:``-part when it holds
    no ``/``."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in DATASET_KINDS or not rest:
        raise DataError(f"{spec!r}: expected KIND:ROOT[:SPLIT] with KIND one of {', '.join(DATASET_KINDS)}")
    root, sep, split = rest.rpartition(":")
    if sep and split and "/" not in split and root:
        return kind, root, split
    return kind, rest, None


def open_sources(specs: list[str]) -> tuple[list[Path], list[str], list[tuple[str, XrayDataset]]]:
    """The datasets named ``KIND:ROOT[:SPLIT]``: their image paths, their patient groups (prefixed by the
    source's position, so that the ids of two datasets never merge) and each (spec, dataset)."""
    paths: list[Path] = []
    groups: list[str] = []
    opened = []
    for n, spec in enumerate(specs):
        kind, root, split = split_source(spec)
        ds = open_dataset(kind, root, split=split)
        paths += [Path(p) for p in ds.csv["path"]]
        groups += [f"{n}:{g}" for g in ds.csv["patient_id"]]
        opened.append((spec, ds))
    return paths, groups, opened


__all__ = sorted([*_EXPORTS, "DATASET_KINDS", "open_dataset", "open_sources", "split_source"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xrayfm.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
