"""Patient-level splits and label subsampling: no patient ever lands on both sides."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, StratifiedGroupKFold

from xrayfm.data.base import XrayDataset
from xrayfm.errors import DataError


def split_by_patient(
    dataset: XrayDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation) with each patient wholly on one side; ``val_fraction`` of patients."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = dataset.csv["patient_id"].to_numpy()
    if len(np.unique(groups)) < 2:
        raise DataError("a patient-level split needs at least two patients")
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return np.sort(train), np.sort(val)


def kfold_by_patient(
    dataset: XrayDataset, folds: int, seed: int = 0, labels: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """The fold (0..folds-1) of every row, each patient wholly in one fold, and whether it is stratified.

    With binary ``labels`` (one per row, 1/0, both classes present) sklearn's StratifiedGroupKFold keeps
    the share of positives alike across folds; otherwise GroupKFold balances the fold sizes. Both are
    shuffled with ``seed``.
    """
    groups = dataset.csv["patient_id"].to_numpy()
    n_patients = len(np.unique(groups))
    if folds < 2 or n_patients < folds:
        raise DataError(f"{folds} folds need at least {max(folds, 2)} patients; the data has {n_patients}")
    y = None if labels is None else np.asarray(labels, dtype=np.float64)
    stratified = y is not None and not np.isnan(y).any() and np.unique(y).size == 2
    if stratified:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(groups), -1, dtype=np.int64)
    target = y if stratified else np.zeros(len(groups))
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(groups)), target, groups=groups)):
        fold_of[held_out] = k
    return fold_of, stratified


def subsample_groups(
    dataset: XrayDataset,
    fraction: float | None = None,
    max_groups: int | None = None,
    by: str = "study_id",
    seed: int = 0,
) -> np.ndarray:
    """Row indices keeping a random ``fraction`` (or at most ``max_groups``) of studies/patients, seeded.

    Whole groups are kept, so every image of a kept study stays (labels are per study in MURA).
    """
    groups = dataset.csv[by].to_numpy()
    unique = np.unique(groups)
    n = len(unique)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"label fraction must be in (0, 1], got {fraction}")
        n = max(1, round(fraction * len(unique)))
    if max_groups is not None:
        n = min(n, max_groups)
    kept = np.random.default_rng(seed).choice(unique, size=n, replace=False)
    return np.flatnonzero(np.isin(groups, kept))
