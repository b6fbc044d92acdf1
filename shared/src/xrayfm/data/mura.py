"""MURA v1.1 (Rajpurkar et al. 2017) in its official layout.

``ROOT`` is ``MURA-v1.1/`` holding ``{split}_image_paths.csv`` and ``{split}_labeled_studies.csv`` (no
headers) and ``{split}/XR_<BODYPART>/patientN/studyN_{positive,negative}/imageK.png``. Paths in the CSVs
are relative to ROOT's parent. Labels are per study (1 = abnormal); every image inherits its study's label.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from xrayfm.data.base import XrayDataset
from xrayfm.data.csvio import read_csv_strict
from xrayfm.data.paths import resolve_under_root
from xrayfm.errors import DataError, list_offenders

_PATH_RE = r"(?P<study_dir>.*/(?P<body_part>XR_[A-Z]+)/(?P<patient_id>patient\d+)/(?P<study>study\d+)_(?P<folder_label>positive|negative))/[^/]+$"


class MURA(XrayDataset):
    """MURA musculoskeletal radiographs: one label, ``Abnormal``, at image and study level.

    Args:
        root: the ``MURA-v1.1`` folder.
        split: ``train`` or ``valid``.
        body_parts: keep only these (``XR_HUMERUS`` or ``HUMERUS``); others are counted in ``skipped``.
    """

    kind = "mura"
    pathologies = ["Abnormal"]

    def __init__(
        self, root: str | Path, split: str = "train", body_parts: Iterable[str] | None = None
    ) -> None:
        super().__init__(root, split, policy="u-ones")
        images_csv = self.root / f"{split}_image_paths.csv"
        studies_csv = self.root / f"{split}_labeled_studies.csv"
        images = read_csv_strict(images_csv, header=False, names=["relpath"])
        studies = read_csv_strict(studies_csv, header=False, names=["study_dir", "label"])

        parts = images["relpath"].str.extract(_PATH_RE)
        bad = parts["study_dir"].isna()
        if bad.any():
            raise DataError(
                f"{images_csv}: paths not in the XR_<PART>/patientN/studyN_<label>/image layout: "
                f"{list_offenders(images.loc[bad, 'relpath'].tolist())}"
            )
        study_labels = self._study_labels(studies, studies_csv)
        label = parts["study_dir"].map(study_labels)
        unlabelled = label.isna()
        if unlabelled.any():
            raise DataError(
                f"{images_csv}: images whose study is missing from {studies_csv.name}: "
                f"{list_offenders(images.loc[unlabelled, 'relpath'].tolist())}"
            )
        folder_label = (parts["folder_label"] == "positive").astype(float)
        disagree = folder_label != label
        if disagree.any():
            raise DataError(
                f"{studies_csv}: label disagrees with the study folder name for "
                f"{list_offenders(parts.loc[disagree, 'study_dir'].unique().tolist())}"
            )

        csv = pd.DataFrame(
            {
                "path": resolve_under_root(self.root, images["relpath"]),
                "relpath": images["relpath"],
                "body_part": parts["body_part"],
                "patient_id": parts["patient_id"],
                # A patient can have studies of several body parts, each numbered from 1.
                "study_id": parts["body_part"] + "/" + parts["patient_id"] + "/" + parts["study"],
                "study_label": label.astype(int),
            }
        )
        raw = label.to_numpy(dtype=np.float32)[:, None]
        if body_parts is not None:
            wanted = {b.upper() if b.upper().startswith("XR_") else "XR_" + b.upper() for b in body_parts}
            unknown = wanted - set(csv["body_part"])
            if unknown:
                raise DataError(
                    f"no images of body part(s) {sorted(unknown)}; present: {sorted(set(csv['body_part']))}"
                )
            keep = csv["body_part"].isin(wanted).to_numpy()
            self.skipped.add("other body part (body_parts filter)", csv.loc[~keep, "relpath"].tolist())
            csv, raw = csv[keep], raw[keep]
        self.csv, self.raw_labels = csv, raw
        self._finish()

    @staticmethod
    def _study_labels(studies: pd.DataFrame, path: Path) -> pd.Series:
        bad = ~studies["label"].str.strip().isin(["0", "1"])
        if bad.any():
            rows = [f"line {i + 1}: {studies['label'].iat[i]!r}" for i in np.flatnonzero(bad.to_numpy())]
            raise DataError(f"{path}: study labels must be 0 or 1: {list_offenders(rows)}")
        dirs = studies["study_dir"].str.rstrip("/")
        dup = dirs[dirs.duplicated()]
        if len(dup):
            raise DataError(f"{path}: studies listed twice: {list_offenders(dup.tolist())}")
        return pd.Series(studies["label"].str.strip().astype(float).to_numpy(), index=dirs.to_numpy())

    def summary(self) -> dict:
        out = super().summary()
        studies = self.study_table()
        out["study_labels"] = {
            "positive": int((studies["label"] == 1).sum()),
            "negative": int((studies["label"] == 0).sum()),
        }
        return out

    def study_table(self) -> pd.DataFrame:
        """One row per study: id, body part, label and image count (what study-level metrics use)."""
        return (
            self.csv.groupby("study_id")
            .agg(body_part=("body_part", "first"), label=("study_label", "first"), images=("path", "size"))
            .reset_index()
        )
