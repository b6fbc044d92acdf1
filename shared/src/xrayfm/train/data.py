"""From a training config to train/validation views over preprocessing caches.

A config names either a raw dataset (``kind``/``root``/``split``: its cache is prepared, or reused when
current) or a prepared ``cache``. Validation comes from a separate split/cache, or from a seeded
patient-level split of the training cache (no patient on both sides).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.data.base import SYNTHETIC_MARKER, XrayDataset
from xrayfm.data.cache import prepare_cache, read_manifest
from xrayfm.data.splits import kfold_by_patient, split_by_patient, subsample_groups
from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.data.transforms import build_transform
from xrayfm.errors import CacheMismatchError, DataError, list_offenders
from xrayfm.models.checkpoint import STATE_JSON
from xrayfm.train.config import TrainConfig
from xrayfm.train.distributed import DistEnv, barrier
from xrayfm.train.sampler import RawImage, SeededView


@dataclass
class TaskData:
    """Train/validation views, label names and where they came from (for checkpoint metadata)."""

    train: SeededView
    val: SeededView
    names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    draw_weights: np.ndarray | None = None  # per training image; None: each image once an epoch


def reader_options(config: TrainConfig) -> dict[str, Any]:
    """Options of ``open_dataset`` for ``config.kind`` (labels stay raw: the policy is applied later)."""
    options: dict[str, Any] = {}
    if config.kind == "mura" and config.body_parts:
        options["body_parts"] = list(config.body_parts)
    if config.kind == "chexpert" and config.frontal_only:
        options["frontal_only"] = True
    return options


def ensure_cache(
    config: TrainConfig,
    split: str,
    cache_dir: str | Path | None,
    env: DistEnv,
    *,
    check: Callable[[XrayDataset], object] | None = None,
    replace: bool = False,
) -> Path:
    """The cache folder for ``split``: prepared from the raw dataset by rank 0 when ``config.kind`` is set.

    ``check`` sees the opened dataset before any image is cached (it raises to refuse it, so a dataset
    that cannot serve leaves no cache behind). With ``replace``, a cache built from other images or
    settings is rebuilt instead of refused (for a cache the caller owns, such as a report's own)."""
    from xrayfm.data import open_dataset

    if config.kind is None:
        if cache_dir is None:
            raise DataError(
                f"no cache for split {split!r}: give the dataset (--kind/--root) or a cache folder"
            )
        return Path(cache_dir).expanduser().resolve()
    out = Path(cache_dir) if cache_dir else Path(config.out) / "cache" / split
    out = out.expanduser().resolve()
    if env.is_main:
        dataset = open_dataset(config.kind, config.root, split=split, **reader_options(config))
        if check is not None:
            check(dataset)
        settings = {"size": int(config.size), "mode": config.resize_mode, "progress": config.progress_bar}
        prepare_or_replace(dataset, out, replace or owns_cache(config, cache_dir), **settings)
    barrier(env)
    return out


def owns_cache(config: TrainConfig, cache_dir: str | Path | None) -> bool:
    """True when the run may rebuild the cache it would use from other images or settings: a cache of its
    own (none named, so under its ``out`` folder) while it has no resumable state (``out/last/``). A run
    that failed before training leaves such a cache, and its rerun with other images must not be refused
    for it; a run that can resume keeps refusing, so it never mixes two datasets."""
    return cache_dir is None and not (Path(config.out) / "last" / STATE_JSON).exists()


def prepare_or_replace(dataset: XrayDataset, out: Path, replace: bool, **settings: Any) -> None:
    """prepare_cache(dataset, out); a cache there built from other images or settings is refused
    (CacheMismatchError) unless `replace`, when it is rebuilt."""
    try:
        prepare_cache(dataset, out, **settings)
    except CacheMismatchError:
        if not replace:
            raise
        prepare_cache(dataset, out, force=True, **settings)


def open_cache(path: Path, config: TrainConfig) -> CachedDataset:
    """A CachedDataset of uint8 images after checking its size matches the config."""
    manifest = read_manifest(path)
    if config.size is not None and int(manifest["size"]) != int(config.size):
        raise DataError(
            f"cache {path} holds {manifest['size']} px images but the model expects {config.size} px; "
            "prepare a cache of that size"
        )
    return CachedDataset(path, policy=config.policy, transform=RawImage(), verify=config.verify)


def label_columns(pathologies: list[str], wanted: list[str] | None) -> list[int] | None:
    """Column indices of ``wanted`` labels (None: all). A name matches its label exactly or, when no label
    is spelt so, ignoring case (a folder ``pneumonia/`` serves the label ``Pneumonia``); an unknown name,
    or one that matches two labels ignoring case, is an error."""
    if not wanted:
        return None
    columns, unknown, ambiguous = [], [], []
    for name in wanted:
        if name in pathologies:
            columns.append(pathologies.index(name))
            continue
        folded = [i for i, label in enumerate(pathologies) if label.casefold() == name.casefold()]
        if len(folded) == 1:
            columns.append(folded[0])
        elif folded:
            ambiguous.append(f"{name} ({' or '.join(pathologies[i] for i in folded)})")
        else:
            unknown.append(name)
    if unknown:
        raise DataError(
            f"unknown labels {list_offenders(unknown)} (matched ignoring case); this dataset has "
            f"{', '.join(pathologies)}"
        )
    if ambiguous:
        raise DataError(
            f"labels matching several of this dataset's ignoring case: {list_offenders(ambiguous)}"
        )
    return columns


def is_synthetic(manifest: dict[str, Any]) -> bool:
    """Whether a cache was built from xrayfm's synthetic phantoms (their root holds SYNTHETIC.md)."""
    root = manifest.get("root")
    return bool(root) and (Path(root) / SYNTHETIC_MARKER).exists()


def cache_fingerprint(dataset: CachedDataset) -> dict[str, Any]:
    """What identifies a cache's content: path, manifest fingerprint and label-table hash."""
    m = dataset.manifest
    return {
        "cache": str(dataset.cache_dir),
        "kind": m.get("kind"),
        "split": m.get("split"),
        "synthetic": is_synthetic(m),
        "fingerprint": m.get("fingerprint"),
        "table_sha256": m.get("table_sha256"),
    }


def load_task_data(config: TrainConfig, env: DistEnv, mean, std) -> TaskData:
    """Prepare/open the caches named by ``config`` and build the train and validation views."""
    train_dir = ensure_cache(config, config.split, config.cache, env)
    train_base = open_cache(train_dir, config)
    pathologies = list(train_base.pathologies)
    columns = label_columns(pathologies, config.labels)
    names = pathologies if columns is None else [pathologies[c] for c in columns]

    if config.val_split is not None or config.val_cache is not None:
        val_dir = ensure_cache(config, config.val_split or "valid", config.val_cache, env)
        val_base = open_cache(val_dir, config)
        if list(val_base.pathologies) != pathologies:
            raise DataError(
                f"validation cache {val_dir} has labels {val_base.pathologies}, training has {pathologies}"
            )
        train_rows, val_rows = np.arange(len(train_base)), np.arange(len(val_base))
        split_info = {"validation": "separate", "val_cache": cache_fingerprint(val_base)}
    elif config.folds is not None:
        val_base = train_base
        fold_of, stratified = kfold_by_patient(
            train_base, config.folds, config.split_seed, stratify_labels(train_base, columns)
        )
        train_rows, val_rows = np.flatnonzero(fold_of != config.fold), np.flatnonzero(fold_of == config.fold)
        split_info = {
            "validation": "k-fold",
            "folds": config.folds,
            "fold": config.fold,
            "stratified": stratified,
            "seed": config.split_seed,
        }
    else:
        val_base = train_base
        train_rows, val_rows = split_by_patient(train_base, config.val_fraction, seed=config.split_seed)
        split_info = {
            "validation": "patient split",
            "val_fraction": config.val_fraction,
            "seed": config.split_seed,
        }

    size, channels = int(train_base.size), config.channels
    train_tf = build_transform(config.augment, size, mean, std, channels, hflip=config.hflip)
    val_tf = build_transform(False, size, mean, std, channels)
    train = SeededView(train_base, train_tf, config.seed, train_rows, columns)
    val = SeededView(val_base, val_tf, config.seed, val_rows, columns)
    info = {"train_cache": cache_fingerprint(train_base), **split_info}
    return TaskData(train, val, names, info)


def stratify_labels(base: CachedDataset, columns: list[int] | None) -> np.ndarray | None:
    """The one binary target per row that k-fold splits stratify by, or None (several labels)."""
    y = base.labels if columns is None else base.labels[:, columns]
    return y[:, 0] if y.shape[1] == 1 else None


def subsample(
    view: SeededView, fraction: float | None, max_groups: int | None, by: str, seed: int
) -> SeededView:
    """A view keeping a seeded ``fraction`` (or at most ``max_groups``) of the groups (studies/patients)."""
    if fraction is None and max_groups is None:
        return view
    if by not in view.csv:
        raise DataError(f"cannot subsample by {by!r}: the cache has no such column")
    kept = subsample_groups(view, fraction=fraction, max_groups=max_groups, by=by, seed=seed)
    return view.with_rows(view.rows[kept])


def subsample_labelled(
    data: TaskData, fraction: float | None, max_groups: int | None, by: str, seed: int
) -> TaskData:
    """``data`` with only a seeded share of its labelled groups (``subsample``). A separate validation set
    is kept whole. A validation split drawn from the training data (patient split, k-fold) comes from the
    same share: the groups are drawn from both sides together and each side keeps its own, so that a
    run told to use few labels validates on none beyond them."""
    if data.info.get("validation") == "separate" or (fraction is None and max_groups is None):
        return replace(data, train=subsample(data.train, fraction, max_groups, by, seed))
    train, val = data.train, data.val
    kept = subsample(
        train.with_rows(np.concatenate([train.rows, val.rows])), fraction, max_groups, by, seed
    ).rows
    return replace(
        data,
        train=train.with_rows(train.rows[np.isin(train.rows, kept)]),
        val=val.with_rows(val.rows[np.isin(val.rows, kept)]),
    )


def describe_views(data: TaskData) -> dict[str, Any]:
    """Counts of images/patients/studies per side, plus the manifest hash of the training data."""
    sides = {}
    for side, view in (("train", data.train), ("val", data.val)):
        csv = view.csv
        sides[side] = {
            "images": len(view),
            "patients": int(csv["patient_id"].nunique()) if "patient_id" in csv else None,
            "studies": int(csv["study_id"].nunique()) if "study_id" in csv else None,
        }
    payload = {
        **data.info,
        "train_rows_sha256": _rows_sha(data.train.rows),
        "val_rows_sha256": _rows_sha(data.val.rows),
    }
    manifest_sha = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    synthetic = bool(data.info["train_cache"]["synthetic"])
    return {**payload, **sides, "synthetic": synthetic, "manifest_sha256": manifest_sha}


def _rows_sha(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


__all__ = [
    "TaskData",
    "describe_views",
    "ensure_cache",
    "is_synthetic",
    "label_columns",
    "load_task_data",
    "stratify_labels",
    "subsample",
    "subsample_labelled",
]
