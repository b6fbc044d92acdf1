"""NIH ChestX-ray14 (Wang et al. 2017), mapped onto the CheXpert observations so datasets pool.

``ROOT`` holds ``Data_Entry_2017*.csv``, optionally ``train_val_list.txt`` / ``test_list.txt``, and the
PNGs in ``images/`` or the distributed ``images_001/images/`` ... ``images_012/images/`` folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from xrayfm.data.base import XrayDataset
from xrayfm.data.csvio import read_csv_strict, require_columns
from xrayfm.data.labels import CHEXPERT_LABELS, LabelPolicy
from xrayfm.errors import DataError, list_offenders

# NIH finding -> CheXpert observation, for the findings both datasets define the same way.
NIH_TO_CHEXPERT = {
    "No Finding": "No Finding",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
# NIH findings with no CheXpert counterpart: parsed (so a typo is caught) but not used as targets.
NIH_UNMAPPED = {"Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening"}
SPLIT_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}


class NIHChestXray14(XrayDataset):
    """ChestX-ray14 images with CheXpert-named targets; CheXpert labels NIH lacks are always masked.

    Args:
        root: folder with ``Data_Entry_2017*.csv`` and the images.
        split: ``train`` (train_val_list.txt), ``test`` (test_list.txt) or ``all``.
    """

    kind = "nih"
    pathologies = CHEXPERT_LABELS

    def __init__(self, root: str | Path, split: str = "all", policy: str | LabelPolicy | None = None) -> None:
        super().__init__(root, split, policy)
        entries = sorted(self.root.glob("Data_Entry_2017*.csv"))
        if not entries:
            raise DataError(f"no Data_Entry_2017*.csv under {self.root}")
        self.csv_path = entries[-1]
        df = read_csv_strict(self.csv_path)
        required = [
            "Image Index",
            "Finding Labels",
            "Follow-up #",
            "Patient ID",
            "Patient Age",
            "Patient Gender",
            "View Position",
        ]
        require_columns(df, required, self.csv_path)

        if split != "all":
            if split not in SPLIT_LISTS:
                raise DataError(f"unknown NIH split {split!r}; use train, test or all")
            list_path = self.root / SPLIT_LISTS[split]
            if not list_path.exists():
                raise DataError(f"split {split!r} needs {list_path}")
            names = set(list_path.read_text().split())
            df = df[df["Image Index"].isin(names)]

        findings = df["Finding Labels"].str.split("|")
        known = set(NIH_TO_CHEXPERT) | NIH_UNMAPPED
        unknown = sorted({f for fs in findings for f in fs} - known)
        if unknown:
            raise DataError(f"{self.csv_path}: unknown findings {list_offenders(unknown)}")
        raw = np.full((len(df), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
        for nih, chexpert in NIH_TO_CHEXPERT.items():
            raw[:, CHEXPERT_LABELS.index(chexpert)] = findings.map(lambda fs, n=nih: n in fs).to_numpy(
                np.float32
            )
        self.unlabelled = [name for name in CHEXPERT_LABELS if name not in NIH_TO_CHEXPERT.values()]

        patient = "nih" + df["Patient ID"].str.zfill(5)
        located = self._locate_images()
        names = df["Image Index"]
        self.csv = pd.DataFrame(
            {
                "path": names.map(lambda n: located.get(n, str(self.root / "images" / n))).to_numpy(),
                "relpath": names.to_numpy(),
                "patient_id": patient.to_numpy(),
                "study_id": (patient + "/followup" + df["Follow-up #"]).to_numpy(),
                "view": "Frontal",
                "projection": df["View Position"].to_numpy(),
                "sex": df["Patient Gender"].map({"M": "Male", "F": "Female"}).fillna("Unknown").to_numpy(),
                "age": pd.to_numeric(df["Patient Age"], errors="coerce").to_numpy(),
            }
        )
        self.raw_labels = raw
        self._finish()

    def _locate_images(self) -> dict[str, str]:
        """Map image file name -> path across ``images/`` and ``images_0NN/images/`` (one directory scan)."""
        found: dict[str, str] = {}
        for folder in sorted(self.root.glob("images*")):
            for sub in (folder / "images", folder):
                if sub.is_dir():
                    with os.scandir(sub) as it:
                        for entry in it:
                            if entry.name.endswith(".png"):
                                found[entry.name] = entry.path
        return found
