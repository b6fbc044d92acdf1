"""Datasets in their official layouts, decoding, the preprocessing cache and synthetic phantoms.

from xrayfm.data import open_dataset
ds = open_dataset("chexpert", "CheXpert-v1.0-small", split="valid", policy="u-ones")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xrayfm.data.base import XrayDataset
from xrayfm.data.labels import CHEXPERT_LABELS, COMPETITION_TASKS, LabelPolicy, parse_policy
from xrayfm.errors import DataError

DATASET_KINDS = ("chexpert", "mura", "nih", "folder", "csv")


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


__all__ = [
    "CHEXPERT_LABELS",
    "COMPETITION_TASKS",
    "DATASET_KINDS",
    "LabelPolicy",
    "XrayDataset",
    "open_dataset",
    "parse_policy",
]
