"""Resolving the relative image paths that dataset CSVs contain."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def resolve_under_root(root: Path, relpaths: pd.Series) -> pd.Series:
    """Turn CSV paths like ``CheXpert-v1.0-small/valid/patient1/...`` into absolute paths under ``root``.

    CheXpert and MURA write paths relative to the folder *above* the dataset root, starting with the
    root's own name. We drop that first component and join the rest to ``root``, so a root that was
    renamed (``CheXpert-v1.0`` vs ``-small``, or a mount point) still resolves.
    """
    rest = relpaths.str.split("/", n=1).str[1].fillna("")
    prefix = str(root) + "/"
    return prefix + rest
