"""A pooled, unlabelled image corpus for self-supervised pre-training: many sources, one set of images.

A pool names its sources (any mix of dataset kinds and folders, each cached like any training data) and
the splits whose patients must stay out (held-out evaluation sets)::

    {"sources": [{"kind": "images", "root": ".../kermany-pneumonia/labels.csv", "patient_column": "patient_id"},
                 {"kind": "nih", "root": ".../nih-cxr14-1000-64", "split": "train"}],
     "exclude": [{"kind": "nih", "root": ".../nih-cxr14-1000-64", "split": "test"}]}

Rules, in order: labels are ignored; a source that *is* a held-out split (CheXpert/MURA ``valid``, NIH
``test``) is refused unless it says ``"held_out_ok": true``; the held-out split of every CheXpert, MURA
and NIH source is excluded by default (when present); an image whose patient appears in an excluded
split never enters; an image already in the pool (same file, or the same cached pixels) enters once.
Patient ids are per dataset (kind + root), so ``patient1`` of two datasets are two patients.
Every count is recorded per source (``PooledData.info``), for the checkpoint's metadata.

Source keys: ``kind`` (chexpert, mura, nih, folder, csv, or ``images``: unlabelled files listed by a
CSV or found under a folder), ``root``, ``split``, ``cache`` (a prepared cache, or where to prepare
one), ``name``, reader options (``body_parts``, ``frontal_only``; for ``images``: ``path_column`` or
``path_template``, ``patient_column``), ``held_out_ok``, ``weight``.

Sampling: without weights every pooled image is drawn once an epoch, so a source's share of training is
its share of the images. With a ``weight`` on every source, a source's share of the draws is its weight
over the sum (drawn with replacement, an epoch being as many draws as the pool has training images): a
large source cannot dominate a small one. :func:`draw_weights` turns the shares into per-image weights;
``PooledData.info`` records the sampling and each source's ``share``, for the checkpoint's metadata.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from xrayfm.data.base import XrayDataset
from xrayfm.data.csvio import read_csv_strict, require_columns
from xrayfm.data.images import SUPPORTED_SUFFIXES
from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.errors import DataError
from xrayfm.train.config import PretrainConfig
from xrayfm.train.data import cache_fingerprint, is_synthetic, owns_cache, prepare_or_replace
from xrayfm.train.distributed import DistEnv, barrier
from xrayfm.train.sampler import RawImage

# The official evaluation split of each labelled layout: never pooled unless asked, excluded by default.
HELD_OUT = {"chexpert": "valid", "mura": "valid", "nih": "test"}
SOURCE_KEYS = {"kind", "root", "split", "cache", "name", "held_out_ok", "weight"}
READER_OPTIONS = {"body_parts", "frontal_only", "path_column", "path_template", "patient_column"}
_EMPTY = torch.zeros(0)


class UnlabelledImages(XrayDataset):
    """Images without labels: the rows of a CSV (``root`` is the CSV file) or every image under a folder.

    A CSV gives paths relative to its folder (``path_column``, or ``path_template``: a ``str.format``
    pattern over the row's columns, e.g. ``"png/{image_id}.png"``, that must stay inside that folder) and,
    optionally, patient ids (``patient_column``); a folder knows no patients, so each image is its own.
    """

    kind = "images"
    pathologies: list[str] = []

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        path_column: str = "path",
        patient_column: str | None = None,
        path_template: str | None = None,
    ) -> None:
        root = Path(root).expanduser().resolve()
        super().__init__(root.parent if root.is_file() else root, split)
        if root.is_file():
            df = read_csv_strict(root)
            needed = [] if path_template else [path_column]
            require_columns(df, needed + ([patient_column] if patient_column else []), root)
            rel = df[path_column].str.strip() if not path_template else _templated(df, path_template, root)
            patients = df[patient_column].str.strip() if patient_column else rel
        elif root.is_dir():
            files = sorted(
                p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
            )
            rel = pd.Series([str(p.relative_to(root)) for p in files], dtype=str)
            patients = rel
        else:
            raise DataError(f"not a CSV file or folder: {root}")
        paths = rel.map(lambda p: str(p if Path(p).is_absolute() else self.root / p))
        self.csv = pd.DataFrame({"path": paths, "relpath": rel, "patient_id": patients, "study_id": patients})
        self.raw_labels = np.zeros((len(self.csv), 0), dtype=np.float32)
        self._finish()


def _templated(df: pd.DataFrame, template: str, csv_file: Path) -> pd.Series:
    """``template`` filled from each row of ``df``; a path that would leave the CSV's folder is refused."""
    folder = csv_file.parent
    try:  # plain column names only: no attribute or index lookups, conversions or format specs
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise DataError(f"{csv_file}: path_template {template!r} is not a format pattern: {exc}") from exc
    bad = [f for f, spec, conv in fields if f not in df.columns or spec or conv]
    if bad or not fields:
        raise DataError(
            f"{csv_file}: path_template {template!r} cannot be filled from its columns "
            f"({', '.join(map(repr, bad)) or 'it names none'}; columns: {', '.join(df.columns)})"
        )
    rel = pd.Series([template.format(**row) for row in df.to_dict("records")], dtype=str)
    outside = [p for p in rel if not (folder / p).resolve().is_relative_to(folder)]
    if outside:
        raise DataError(f"{csv_file}: path_template {template!r} leads outside its folder ({outside[0]!r})")
    return rel


@dataclass
class Source:
    """One entry of ``pool["sources"]`` or ``pool["exclude"]``."""

    kind: str | None
    root: str | None
    split: str | None
    cache: str | None = None
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    held_out_ok: bool = False
    weight: float | None = None  # the source's share of the training draws (relative to the others)

    @classmethod
    def parse(cls, item: dict[str, Any], where: str) -> Source:
        unknown = set(item) - SOURCE_KEYS - READER_OPTIONS
        if unknown:
            raise DataError(
                f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(SOURCE_KEYS | READER_OPTIONS)})"
            )
        options = {k: item[k] for k in READER_OPTIONS if item.get(k) is not None}
        return cls(
            item.get("kind"),
            item.get("root"),
            item.get("split"),
            item.get("cache"),
            item.get("name"),
            options,
            bool(item.get("held_out_ok", False)),
            None if item.get("weight") is None else float(item["weight"]),
        )

    def open(self) -> XrayDataset:
        """The dataset reader of this source (labels are read but never used)."""
        from xrayfm.data import open_dataset

        if self.kind == "images":
            return UnlabelledImages(self.root, self.split or "all", **self.options)
        return open_dataset(self.kind, self.root, split=self.split, **self.options)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": self.root, "split": self.split, **self.options}


def pool_sources(config: PretrainConfig) -> tuple[list[Source], list[Source]]:
    """(sources, excluded splits) of ``config.pool``, or of the single --kind/--root/--split or --cache."""
    if config.pool:
        sources = [Source.parse(s, f"pool source {i}") for i, s in enumerate(config.pool["sources"])]
        exclude = [Source.parse(s, f"pool exclude {i}") for i, s in enumerate(config.pool.get("exclude", []))]
    else:
        sources = [Source(config.kind, config.root, config.split, config.cache)]
        exclude = []
    for i, s in enumerate(sources):
        if s.kind in HELD_OUT and s.split == HELD_OUT[s.kind] and not s.held_out_ok:
            raise DataError(
                f"pool source {i} is the held-out {s.kind} split {s.split!r}: it must stay out of pre-training "
                '(say "held_out_ok": true to pool it anyway)'
            )
    return sources, exclude


def default_exclusions(sources: list[Source], explicit: list[Source]) -> list[Source]:
    """The held-out split of each CheXpert/MURA/NIH source's dataset, unless already excluded or pooled."""
    have = {(s.kind, str(Path(s.root).resolve()), s.split) for s in explicit if s.root}
    out = []
    for s in sources:
        if s.kind not in HELD_OUT or s.root is None or s.held_out_ok:
            continue
        key = (s.kind, str(Path(s.root).resolve()), HELD_OUT[s.kind])
        if key not in have:
            have.add(key)
            out.append(Source(s.kind, s.root, HELD_OUT[s.kind]))
    return out


def _namespace(kind: Any, root: Any) -> str:
    return f"{kind}:{root}"


class PooledImages(Dataset):
    """The pooled images: uint8 [1, S, S] items from several caches, no labels (``labels`` is [N, 0]).

    ``csv`` has ``source``, ``path``, ``patient_id`` (``<kind>:<root>:<id>``: per dataset) and ``study_id``.
    """

    def __init__(self, parts: list[CachedDataset], picks: list[np.ndarray], names: list[str]) -> None:
        self.parts = parts
        self.size = int(parts[0].size)
        self.part = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(picks)])
        self.row = np.concatenate(picks).astype(np.int64)
        tables = []
        for part, pick, name in zip(parts, picks, names, strict=True):
            ns = _namespace(part.manifest.get("kind"), part.manifest.get("root"))
            sub = part.csv.iloc[pick]
            tables.append(
                pd.DataFrame(
                    {
                        "source": name,
                        "path": sub["path"].astype(str).to_numpy(),
                        "patient_id": (ns + ":" + sub["patient_id"].astype(str)).to_numpy(),
                        "study_id": (ns + ":" + sub["study_id"].astype(str)).to_numpy(),
                    }
                )
            )
        self.csv = pd.concat(tables, ignore_index=True)
        self.labels = np.zeros((len(self.csv), 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.parts[int(self.part[i])][int(self.row[i])]
        return {"image": item["image"], "labels": _EMPTY, "mask": _EMPTY, "index": int(i)}


@dataclass
class PooledData:
    """The pooled dataset and what went into it (per-source counts, exclusions, fingerprints)."""

    images: PooledImages
    info: dict[str, Any]


def _source_cache(config: PretrainConfig, source: Source, index: int, env: DistEnv) -> Path:
    """The cache of one source: prepared by rank 0 (or reused when current); a bare ``cache`` is used as is."""
    if source.kind is None:
        return Path(source.cache).expanduser().resolve()
    name = source.name or f"{index}-{source.kind}-{source.split or 'all'}"
    out = (
        Path(source.cache)
        if source.cache
        else Path(config.out) / "cache" / "pool" / re.sub(r"[^\w.-]", "_", name)
    )
    out = out.expanduser().resolve()
    if env.is_main:
        settings = {"size": int(config.size), "mode": config.resize_mode, "progress": config.progress_bar}
        prepare_or_replace(source.open(), out, owns_cache(config, source.cache), **settings)
    barrier(env)
    return out


def _pixel_digest(images: np.memmap, row: int) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(images[row]).tobytes(), digest_size=16).digest()


def build_pool(config: PretrainConfig, env: DistEnv) -> PooledData:
    """Prepare/open every source's cache and pool their images under the rules of the module docstring."""
    sources, explicit = pool_sources(config)
    exclude = explicit + default_exclusions(sources, explicit)

    excluded_patients: set[str] = set()
    exclusions = []
    for s in exclude:
        entry = {**s.describe(), "default": s not in explicit}
        try:
            reader = s.open()
        except DataError as exc:
            if s in explicit:
                raise DataError(f"cannot read the excluded split {s.describe()}: {exc}") from exc
            exclusions.append({**entry, "patients": 0, "note": f"not present ({exc})"})
            continue
        ns = _namespace(reader.kind, reader.root)
        patients = set(reader.csv["patient_id"].astype(str))
        excluded_patients |= {f"{ns}:{p}" for p in patients}
        exclusions.append({**entry, "patients": len(patients), "images": len(reader)})

    parts, picks, names, per_source = [], [], [], []
    seen_paths: set[str] = set()
    seen_pixels: set[bytes] = set()
    for i, s in enumerate(sources):
        cache_dir = _source_cache(config, s, i, env)
        part = CachedDataset(cache_dir, transform=RawImage(), verify=config.verify)
        if parts and part.size != parts[0].size:
            raise DataError(
                f"pool caches differ in size: {parts[0].cache_dir} {parts[0].size} px, {cache_dir} {part.size} px"
            )
        ns = _namespace(part.manifest.get("kind"), part.manifest.get("root"))
        patient = (ns + ":" + part.csv["patient_id"].astype(str)).to_numpy()
        paths = part.csv["path"].astype(str).to_numpy()
        rows = part.csv["cache_row"].to_numpy()
        counts = {"excluded_patient": 0, "duplicate_file": 0, "duplicate_pixels": 0}
        keep = []
        for j in range(len(part)):
            if patient[j] in excluded_patients:
                counts["excluded_patient"] += 1
                continue
            if paths[j] in seen_paths:
                counts["duplicate_file"] += 1
                continue
            digest = _pixel_digest(part.images, int(rows[j]))
            if digest in seen_pixels:
                counts["duplicate_pixels"] += 1
                continue
            seen_paths.add(paths[j])
            seen_pixels.add(digest)
            keep.append(j)
        if not keep:
            raise DataError(
                f"pool source {i} ({s.describe()}) has no image left after exclusions and de-duplication"
            )
        name = s.name or f"{i}-{part.manifest.get('kind')}-{part.manifest.get('split')}"
        kept = np.asarray(keep, dtype=np.int64)
        parts.append(part)
        picks.append(kept)
        names.append(name)
        per_source.append(
            {
                "name": name,
                **s.describe(),
                "cache": cache_fingerprint(part),
                "usable": len(part),
                "unusable": part.excluded,
                **counts,
                "images": len(kept),
                "patients": int(len(set(patient[kept]))),
            }
        )
    pooled = PooledImages(parts, picks, names)
    weighted = all(s.weight is not None for s in sources)  # all or none: checked with the config
    total = sum(s.weight or 0.0 for s in sources)
    for entry, s in zip(per_source, sources, strict=True):
        entry["share"] = (s.weight or 0.0) / total if weighted else entry["images"] / len(pooled)
    info = {
        "sampling": "weighted by source" if weighted else "each image once an epoch",
        "sources": per_source,
        "exclude": exclusions,
        "images": len(pooled),
        "patients": int(pooled.csv["patient_id"].nunique()),
        "synthetic": any(is_synthetic(p.manifest) for p in parts),
    }
    return PooledData(pooled, info)


def draw_weights(pooled: PooledImages, info: dict[str, Any], rows: np.ndarray) -> np.ndarray | None:
    """Per-image draw weights of the pooled images at `rows` (the training split) that give each source its
    share of ``info`` (weights sum to 1); None when the pool is not weighted by source. A source with no
    image among `rows` gives its share to the others."""
    if info.get("sampling") != "weighted by source":
        return None
    part = pooled.part[rows]
    shares = np.array([s["share"] for s in info["sources"]], dtype=np.float64)
    counts = np.bincount(part, minlength=len(shares))  # every source present in `rows` counts >= 1
    weights = shares[part] / counts[part]
    return weights / weights.sum()


def check_no_leak(pooled: PooledImages, readers: list[XrayDataset]) -> list[str]:
    """Pooled images whose file, or whose patient, belongs to one of ``readers`` (e.g. evaluation splits)."""
    paths, patients = set(pooled.csv["path"]), set(pooled.csv["patient_id"])
    leaks = []
    for reader in readers:
        ns = _namespace(reader.kind, reader.root)
        for path, pid in zip(
            reader.csv["path"].astype(str), reader.csv["patient_id"].astype(str), strict=True
        ):
            if path in paths or f"{ns}:{pid}" in patients:
                leaks.append(path)
    return leaks


__all__ = [
    "HELD_OUT",
    "PooledData",
    "PooledImages",
    "Source",
    "UnlabelledImages",
    "build_pool",
    "draw_weights",
    "check_no_leak",
    "default_exclusions",
    "pool_sources",
]
