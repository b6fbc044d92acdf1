"""The user's own task: a folder per class, or a CSV with a path column and label columns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from xrayfm.data.base import XrayDataset
from xrayfm.data.csvio import read_labelled_csv, require_columns
from xrayfm.data.images import SUPPORTED_SUFFIXES
from xrayfm.errors import DataError, list_offenders


class ImageFolder(XrayDataset):
    """``ROOT/<class>/**/image`` (or ``ROOT/<split>/<class>/...`` when split folders exist).

    Classes are the sub-folder names in sorted order; labels are one-hot over them. There is no patient
    information in a folder, so each image is its own patient and study (say so when splitting).
    """

    kind = "folder"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        super().__init__(root, split, policy="u-ones")
        base = self.root / split if (self.root / split).is_dir() else self.root
        if not base.is_dir():
            raise DataError(f"not a folder: {base}")
        classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise DataError(f"{base} needs at least two class sub-folders, found {classes}")
        self.pathologies = classes
        rows, labels, ignored = [], [], []
        for k, name in enumerate(classes):
            for path in sorted((base / name).rglob("*")):
                if not path.is_file() or path.name.startswith("."):
                    continue
                if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                    ignored.append(str(path.relative_to(self.root)))
                    continue
                rel = str(path.relative_to(self.root))
                rows.append(
                    {"path": str(path), "relpath": rel, "patient_id": rel, "study_id": rel, "class": name}
                )
                labels.append(np.eye(len(classes), dtype=np.float32)[k])
        self.skipped.add("not an image file (by suffix)", ignored)
        self.csv = pd.DataFrame(rows, columns=["path", "relpath", "patient_id", "study_id", "class"])
        self.raw_labels = np.array(labels, dtype=np.float32).reshape(-1, len(classes))
        self._finish()


class CsvDataset(XrayDataset):
    """A CSV with an image-path column and label columns (1 / 0 / -1 uncertain / blank).

    Paths may be absolute or relative to the CSV's folder. Without ``label_columns`` every column other
    than the path/patient/study columns is a label.
    """

    kind = "csv"

    def __init__(
        self,
        csv_file: str | Path,
        path_column: str = "path",
        label_columns: Sequence[str] | None = None,
        patient_column: str | None = None,
        study_column: str | None = None,
        policy: str | None = None,
    ) -> None:
        csv_file = Path(csv_file).expanduser().resolve()
        if not csv_file.is_file():
            raise DataError(f"label file not found: {csv_file}")
        super().__init__(csv_file.parent, csv_file.stem, policy)
        header = pd.read_csv(csv_file, nrows=0).columns.tolist()
        id_columns = [c for c in (path_column, patient_column, study_column) if c]
        require_columns(pd.DataFrame(columns=header), id_columns, csv_file)
        if label_columns is None:
            label_columns = [c for c in header if c not in id_columns]
        if not label_columns:
            raise DataError(f"{csv_file} has no label columns besides {id_columns}")
        self.pathologies = list(label_columns)
        df, raw = read_labelled_csv(csv_file, self.pathologies)
        rel = df[path_column].str.strip()
        empty = rel == ""
        if empty.any():
            raise DataError(
                f"{csv_file}: empty {path_column!r} on lines {list_offenders((np.flatnonzero(empty) + 2).tolist())}"
            )
        absolute = rel.map(lambda p: str(p if Path(p).is_absolute() else csv_file.parent / p))
        self.csv = pd.DataFrame(
            {
                "path": absolute,
                "relpath": rel,
                "patient_id": df[patient_column] if patient_column else rel,
                "study_id": df[study_column]
                if study_column
                else (df[patient_column] if patient_column else rel),
            }
        )
        self.raw_labels = raw
        self._finish()
