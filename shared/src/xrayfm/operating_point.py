"""A model's chosen decision threshold: ``operating_point.json`` beside its ``meta.json``.

A binary model answers its label when ``p >= threshold``. The threshold that fits a clinic is chosen from
an evaluation's candidate points (``xrayfm evaluate`` reports Youden's and those reaching a target
sensitivity or specificity) and recorded per model version, with where it came from; every answer then
states the threshold and its source. Without one the answer says the default 0.5 is not calibrated.

Torch-free: the model store writes this file, inference reads it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.utils import atomic_write_json, read_json

FILE = "operating_point.json"
DEFAULT_THRESHOLD = 0.5
DEFAULT_SOURCE = "default 0.5 (not calibrated)"
MAX_SOURCE = 300


def check_operating_point(point: dict[str, Any]) -> dict[str, Any]:
    """The point with a threshold in [0, 1] and a non-empty ``source`` of at most 300 characters."""
    threshold = point.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise XrayfmError(f"threshold must be a number, got {threshold!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise XrayfmError(f"threshold must lie in [0, 1], got {threshold}")
    source = point.get("source")
    if not isinstance(source, str) or not source.strip() or len(source) > MAX_SOURCE:
        raise XrayfmError(
            f"source must be a text of 1 to {MAX_SOURCE} characters saying where the threshold comes from"
        )
    return {**point, "threshold": float(threshold), "source": source.strip()}


def read_operating_point(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The operating point recorded in `folder`, or None."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    return check_operating_point(read_json(path))


def write_operating_point(folder: str | os.PathLike, point: dict[str, Any] | None) -> dict[str, Any] | None:
    """Record `point` (``threshold``, ``source``, and optionally ``rule``, ``label``, ``sensitivity``,
    ``specificity``, ``set_by``) in `folder`, stamped with ``set_at``; None removes it."""
    path = Path(folder) / FILE
    if point is None:
        path.unlink(missing_ok=True)
        return None
    point = {**check_operating_point(point), "set_at": time.time()}
    atomic_write_json(path, point)
    return point


def served_threshold(folder: str | os.PathLike | None, meta: dict[str, Any]) -> tuple[float, str]:
    """The threshold a model decides with, and its source: the folder's operating point, else the
    checkpoint's ``meta["threshold"]``, else the uncalibrated default."""
    point = read_operating_point(folder) if folder is not None and Path(folder).is_dir() else None
    if point is not None:
        return point["threshold"], point["source"]
    if meta.get("threshold") is not None:
        return float(meta["threshold"]), "the checkpoint's meta.json"
    return DEFAULT_THRESHOLD, DEFAULT_SOURCE


__all__ = [
    "DEFAULT_SOURCE",
    "DEFAULT_THRESHOLD",
    "FILE",
    "check_operating_point",
    "read_operating_point",
    "served_threshold",
    "write_operating_point",
]
