"""CheXpert (Irvin et al. 2019) in its official layout.

``ROOT`` is ``CheXpert-v1.0[-small]/`` holding ``train.csv`` and ``valid.csv``; image paths in the CSVs
are relative to ROOT's parent (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``).
``ROOT`` may also be a CSV file itself (e.g. ``train.csv.gz``): labels without images are enough to inspect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xrayfm.data.base import XrayDataset
from xrayfm.data.csvio import read_labelled_csv, require_columns
from xrayfm.data.labels import CHEXPERT_LABELS, LabelPolicy
from xrayfm.data.paths import resolve_under_root
from xrayfm.errors import DataError, list_offenders

META_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
_PATH_RE = r"(?P<patient_id>patient\d+)/(?P<study>study\d+)/(?P<image>[^/]+)$"


def find_split_csv(root: Path, split: str) -> Path:
    """The label file of a split: ``ROOT/{split}.csv`` (or ``.csv.gz``), or ROOT itself when it is a file."""
    if root.is_file():
        return root
    for name in (f"{split}.csv", f"{split}.csv.gz"):
        if (root / name).exists():
            return root / name
    raise DataError(f"no {split}.csv under {root} (expected the CheXpert layout: train.csv, valid.csv)")


class CheXpert(XrayDataset):
    """CheXpert images and their 14 observations.

    Args:
        root: the dataset folder (``CheXpert-v1.0-small``) or a label CSV.
        split: ``train`` or ``valid`` (the file ``{split}.csv``).
        policy: uncertainty/blank policy, e.g. ``"u-ones"`` or ``"u-zeros;Atelectasis=u-ones;Edema=u-ones"``.
        frontal_only: keep frontal views only (lateral rows are counted in ``skipped``).
    """

    kind = "chexpert"
    pathologies = CHEXPERT_LABELS

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        policy: str | LabelPolicy | None = None,
        frontal_only: bool = False,
    ) -> None:
        root = Path(root).expanduser().resolve()
        csv_path = find_split_csv(root, split)
        image_root = csv_path.parent if root.is_file() else root
        super().__init__(image_root, split, policy)
        self.csv_path = csv_path

        df, raw = read_labelled_csv(csv_path, CHEXPERT_LABELS)
        require_columns(df, META_COLUMNS, csv_path)

        ids = df["Path"].str.extract(_PATH_RE)
        bad = ids["patient_id"].isna()
        if bad.any():
            rows = [f"row {i + 2}: {df['Path'].iat[i]!r}" for i in np.flatnonzero(bad.to_numpy())]
            raise DataError(
                f"{csv_path}: paths not in the patientN/studyN/view layout: {list_offenders(rows)}"
            )

        csv = pd.DataFrame(
            {
                "path": resolve_under_root(image_root, df["Path"]),
                "relpath": df["Path"],
                "patient_id": ids["patient_id"],
                "study_id": ids["patient_id"] + "/" + ids["study"],
                "view": df["Frontal/Lateral"],
                "projection": df["AP/PA"].replace("", "unknown"),
                "sex": df["Sex"],
                "age": pd.to_numeric(df["Age"], errors="coerce"),
            }
        )
        if frontal_only:
            keep = (csv["view"] == "Frontal").to_numpy()
            self.skipped.add("lateral view (frontal_only)", csv.loc[~keep, "relpath"].tolist())
            csv, raw = csv[keep], raw[keep]
        self.csv, self.raw_labels = csv, raw
        self._finish()
