"""The common shape of every dataset reader (in the spirit of torchxrayvision).

A reader parses label files only; it never decodes an image until asked. Inspect it from a REPL::

    ds = CheXpert("CheXpert-v1.0-small", split="valid")
    ds.pathologies      # label names, in order
    ds.csv              # one row per image: path (absolute), patient_id, study_id, metadata...
    ds.raw_labels       # [N, L] float32 as the files say: 1, 0, -1 (uncertain), NaN (blank)
    ds.labels           # [N, L] float32 after the policy: 1, 0, NaN (masked)
    ds[0]               # {"image": uint8 [H, W] grey, "labels": [L], "index": 0}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrayfm.data.labels import LabelPolicy, count_raw, count_targets, parse_policy
from xrayfm.errors import DataError

# Written by `xrayfm synth` into every generated dataset root (see xrayfm.data.synth).
SYNTHETIC_MARKER = "SYNTHETIC.md"


@dataclass
class SkipReport:
    """Rows a reader left out, by reason, with a few examples of each (never silent)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, items: list[str]) -> None:
        if not items:
            return
        self.counts[reason] = self.counts.get(reason, 0) + len(items)
        self.examples.setdefault(reason, []).extend(items[: 5 - len(self.examples.get(reason, []))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": dict(self.examples)}


class XrayDataset:
    """Base class: subclasses fill ``csv``, ``raw_labels`` and ``pathologies`` in ``__init__``."""

    kind: str = "base"
    pathologies: list[str]
    csv: pd.DataFrame
    raw_labels: np.ndarray

    def __init__(self, root: str | Path, split: str, policy: str | LabelPolicy | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.split = split
        self._policy_spec = policy
        self.skipped = SkipReport()
        # Labels this dataset does not annotate at all (e.g. NIH has no "Lung Opacity"): always masked,
        # whatever the blank policy says, so that datasets pool without inventing negatives.
        self.unlabelled: list[str] = []
        self.synthetic = False

    # -- labels -----------------------------------------------------------------------------------
    @property
    def policy(self) -> LabelPolicy:
        return parse_policy(self._policy_spec, self.pathologies)

    @property
    def labels(self) -> np.ndarray:
        """Targets after the uncertainty/blank policy: 1, 0 or NaN (masked)."""
        targets = self.policy.apply(self.raw_labels, self.pathologies)
        for name in self.unlabelled:
            targets[:, self.pathologies.index(name)] = np.nan
        return targets

    def subset(self, indices) -> XrayDataset:
        """A copy holding only the given rows (e.g. one side of a patient-level split)."""
        indices = np.asarray(indices)
        out = copy.copy(self)
        out.csv = self.csv.iloc[indices].reset_index(drop=True)
        out.raw_labels = self.raw_labels[indices]
        return out

    def _finish(self) -> None:
        """Checks every reader runs at the end of ``__init__``."""
        self.synthetic = (self.root / SYNTHETIC_MARKER).exists()
        if len(self.csv) == 0:
            raise DataError(
                f"{self.kind} split {self.split!r} under {self.root} has no images after filtering"
            )
        self.csv = self.csv.reset_index(drop=True)
        self.raw_labels = np.ascontiguousarray(self.raw_labels, dtype=np.float32)
        if self.raw_labels.shape != (len(self.csv), len(self.pathologies)):
            raise AssertionError("reader produced labels that do not line up with its rows")

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.csv)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from xrayfm.data.images import read_image

        return {"image": read_image(self.csv.at[index, "path"]), "labels": self.labels[index], "index": index}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"labels={len(self.pathologies)}, policy={self.policy.describe()!r})"
        )

    # -- summaries ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What `xrayfm inspect` prints: counts per label (raw and after policy) and per group."""
        csv = self.csv
        out: dict[str, Any] = {
            "dataset": self.kind,
            "synthetic": self.synthetic,
            "root": str(self.root),
            "split": self.split,
            "policy": self.policy.describe(),
            "images": len(csv),
            "patients": int(csv["patient_id"].nunique()),
            "studies": int(csv["study_id"].nunique()),
            "labels": count_raw(self.raw_labels, self.pathologies),
            "targets": count_targets(self.labels, self.pathologies),
            "unlabelled": list(self.unlabelled),
            "skipped": self.skipped.as_dict(),
        }
        groups = {
            "view": "views",
            "projection": "projections",
            "body_part": "body_parts",
            "sex": "sexes",
            "class": "classes",
        }
        for column, key in groups.items():
            if column in csv:
                out[key] = {
                    str(k): int(v) for k, v in csv[column].value_counts(dropna=False).sort_index().items()
                }
        return out
