"""Planning a phantom dataset: patients, their studies and images, and the patient-level train/valid split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid")


@dataclass
class Patient:
    """One planned patient: their studies (image counts), split and number in the written dataset."""

    index: int  # planning index: the patient's seed key, independent of split and numbering
    studies: list[int]  # images per study
    split: str = "train"
    number: int = 0  # the NNNNN of patientNNNNN

    @property
    def images(self) -> int:
        """Images over all of the patient's studies."""
        return sum(self.studies)


def plan_chest(rng: np.random.Generator, n: int) -> list[Patient]:
    """n single-image studies; about 8% of patients (at least one when n >= 4) have two studies."""
    twice = max(1, round(0.08 * n)) if n >= 4 else 0
    counts = [[1, 1]] * twice + [[1]] * (n - 2 * twice)
    order = rng.permutation(len(counts))
    return [Patient(index=i, studies=list(counts[j])) for i, j in enumerate(order)]


def plan_bone(rng: np.random.Generator, n: int, need_two: bool) -> list[Patient]:
    """Studies of 1-3 images; about 15% of patients have two studies; n images in all."""
    patients: list[Patient] = []
    total = 0
    while total < n:
        room = n - total - (1 if need_two and not patients else 0)
        studies = []
        for _ in range(2 if rng.random() < 0.15 else 1):
            k = min(int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])), room - sum(studies))
            if k > 0:
                studies.append(k)
        patients.append(Patient(index=len(patients), studies=studies))
        total += sum(studies)
    return patients


def assign_splits(rng: np.random.Generator, patients: list[Patient], valid_fraction: float) -> None:
    """Patient-level split: whole patients go to valid until it holds ~valid_fraction of the images."""
    n = sum(p.images for p in patients)
    target = 0 if valid_fraction == 0 else min(n - 1, max(1, round(n * valid_fraction)))
    got = 0
    for i in rng.permutation(len(patients)):
        if got >= target:
            break
        if got + patients[i].images <= n - 1:  # keep at least one training image
            patients[i].split = "valid"
            got += patients[i].images
    number = 0
    for split in SPLITS:
        for p in patients:
            if p.split == split:
                number += 1
                p.number = number


__all__ = ["SPLITS", "Patient", "assign_splits", "plan_bone", "plan_chest"]
