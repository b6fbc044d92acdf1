"""A torch Dataset over a preprocessing cache (see :mod:`xrayfm.data.cache`): no JPEG work per epoch.

Attributes follow torchxrayvision: ``pathologies``, ``csv`` (usable rows, with ``status`` and
``cache_row``), ``raw_labels`` (1/0/-1/NaN as cached), ``labels`` (after the policy chosen here),
``images`` (the np.memmap [N, S, S] uint8 of the whole cache) and ``manifest``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from xrayfm.data.cache.layout import FILES, FORCE_HINT, VERIFY_MODES, read_index, read_manifest, stale_sources
from xrayfm.data.labels import LabelPolicy, parse_policy
from xrayfm.errors import CacheMismatchError, DataError, XrayfmError, list_offenders


class CachedDataset(Dataset):
    """Images and labels from a cache built by ``prepare_cache``.

    Args:
        cache_dir: the cache folder.
        policy: uncertainty/blank policy applied to the raw labels now (e.g. ``"u-zeros"``).
        transform: called on a uint8 tensor [1, S, S]; default: scale to float [0, 1].
        verify: ``stat`` (default) refuses a cache whose source files changed (size/mtime); ``size``,
            ``exists``, or ``none`` (e.g. a cache copied to a node without the source images).
        indices: cache rows (= the source dataset's row numbers) to use, e.g. one split; rows that
            were skipped when caching (missing/unreadable) are always left out.

    ``ds[i]`` is ``{"image": float [C, S, S], "labels": float32 [L] (masked -> 0), "mask": float32 [L]
    (1 = observed), "index": i}``; ``ds.csv.cache_row[i]`` maps ``i`` back to the cache/source row.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        policy: str | LabelPolicy | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        verify: str = "stat",
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if verify not in VERIFY_MODES:
            raise XrayfmError(f"unknown verify mode {verify!r}; choose from {', '.join(VERIFY_MODES)}")
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.manifest: dict[str, Any] = read_manifest(self.cache_dir)
        if not self.manifest.get("complete"):
            raise DataError(
                f"cache {self.cache_dir} is incomplete (a prepare run was interrupted); "
                "rerun the same prepare command to finish it"
            )
        index = read_index(self.cache_dir, self.manifest)
        if verify != "none":
            changed = stale_sources(index, mode=verify)
            if changed:
                raise CacheMismatchError(
                    f"cache {self.cache_dir} is stale: {len(changed)} source file(s) changed or went missing "
                    f"since caching: {list_offenders(changed)}; {FORCE_HINT}, or pass verify='none' to use "
                    "the cached pixels anyway"
                )
        self.pathologies: list[str] = list(self.manifest["pathologies"])
        self.size: int = int(self.manifest["size"])
        self.transform = transform
        self.policy = parse_policy(policy, self.pathologies)

        rows = np.arange(len(index)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(index)):
            raise DataError(
                f"indices must be cache rows in 0..{len(index) - 1}, got {rows.min()}..{rows.max()}"
            )
        usable = (index["status"] == "ok").to_numpy()
        excluded = index["status"].iloc[rows[~usable[rows]]].value_counts()
        self.excluded: dict[str, int] = {str(k): int(v) for k, v in excluded.items()}
        rows = rows[usable[rows]]
        if len(rows) == 0:
            raise DataError(
                f"no usable images in cache {self.cache_dir} for the requested rows "
                f"(excluded: {self.excluded or 'none requested'})"
            )
        self._rows = rows
        table = index.iloc[rows].reset_index(drop=True)
        self.csv: pd.DataFrame = table.drop(columns=self.pathologies).assign(cache_row=rows)
        self.raw_labels: np.ndarray = np.ascontiguousarray(table[self.pathologies].to_numpy(np.float32))
        self.labels: np.ndarray = self.policy.apply(self.raw_labels, self.pathologies)
        self._targets = torch.from_numpy(np.nan_to_num(self.labels, nan=0.0))
        self._masks = torch.from_numpy((~np.isnan(self.labels)).astype(np.float32))
        self._images: np.memmap | None = None

    @property
    def images(self) -> np.memmap:
        """The whole cache array [N, S, S] uint8, opened read-only on first use (also in each worker)."""
        if self._images is None:
            n, s = int(self.manifest["images"]), self.size
            self._images = np.memmap(
                self.cache_dir / FILES["images"], dtype=np.uint8, mode="r", shape=(n, s, s)
            )
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) pickle the dataset: send the path, not the mapped array.
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = int(i) % len(self)
        image = torch.from_numpy(np.array(self.images[self._rows[i]]))[None]  # copy out of the memmap
        image = self.transform(image) if self.transform is not None else image.float().div_(255.0)
        # clone: a view would keep the whole [N, L] label storage alive in every batch sent between processes
        return {
            "image": image,
            "labels": self._targets[i].clone(),
            "mask": self._masks[i].clone(),
            "index": i,
        }

    def __repr__(self) -> str:
        return (
            f"CachedDataset({str(self.cache_dir)!r}, images={len(self)}, size={self.size}, "
            f"kind={self.manifest.get('kind')!r}, split={self.manifest.get('split')!r}, "
            f"policy={self.policy.describe()!r}, excluded={self.excluded})"
        )


__all__ = ["CachedDataset"]
