"""Deterministic data order and augmentation, so that a resumed or multi-process run sees the same data.

- :class:`EpochBatches` draws one permutation per epoch from a generator seeded by (seed, epoch), cuts it
  into global batches of ``batch_size x world_size`` and gives rank ``r`` its slice of each: the union of
  the ranks' slices is exactly the single-process batch of the same global size. ``start_batch`` skips
  batches already trained on (resume) without loading them. With ``weights`` an epoch is ``n`` draws with
  replacement, each index drawn with its weight (a pool weighted by source, :mod:`xrayfm.train.pool`),
  from the same (seed, epoch) generator.
- :class:`SeededView` applies the transform under an RNG seeded by (seed, epoch, sample), so a sample's
  augmentation does not depend on which process, worker or resumed run draws it. The sampler hands out
  ``(index, epoch)`` keys, so this holds with DataLoader workers too (no shared mutable epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from xrayfm.errors import DataError


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (numpy's SeedSequence)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, epoch)`` keys for one epoch and one rank; drops a last partial global batch."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start_batch: int = 0,
        weights: np.ndarray | None = None,
    ) -> None:
        self.n, self.batch_size, self.epoch, self.seed = n, batch_size, epoch, seed
        if weights is not None and len(weights) != n:
            raise DataError(f"{len(weights)} draw weights for {n} training images")
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.rank, self.world_size, self.shuffle, self.start_batch = rank, world_size, shuffle, start_batch
        if n // (batch_size * world_size) < 1:
            raise DataError(
                f"{n} training images cannot fill one global batch of {batch_size} x {world_size} processes"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def order(self) -> torch.Tensor:
        """This epoch's global order of sample indices (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield [(int(i), self.epoch) for i in order[first : first + self.batch_size]]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, int]]]:
    """Evaluation batches: rank ``r`` takes a contiguous share of ``range(n)``, in order."""
    mine = np.array_split(np.arange(n), world_size)[rank]
    return [[(int(i), 0) for i in mine[s : s + batch_size]] for s in range(0, len(mine), batch_size)]


class SeededView(Dataset):
    """A view of a cached dataset: chosen rows and label columns, and a per-(sample, epoch) seeded transform.

    ``base`` must return uint8 images (build it with ``transform=RawImage()``). Items are
    ``{"image", "labels", "mask", "index"}`` where ``index`` is the position in this view.
    """

    def __init__(
        self,
        base: Any,
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
        rows: Sequence[int] | np.ndarray | None = None,
        label_columns: Sequence[int] | None = None,
    ) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.rows = np.arange(len(base)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.columns = None if label_columns is None else list(label_columns)

    def __len__(self) -> int:
        return len(self.rows)

    def with_rows(self, rows: Sequence[int] | np.ndarray) -> SeededView:
        """The same base, transform, seed and label columns over other rows of the base."""
        return SeededView(self.base, self.transform, self.seed, rows, self.columns)

    @property
    def labels(self) -> np.ndarray:
        """Targets [N, L] of this view: 1, 0, NaN = masked."""
        y = self.base.labels[self.rows]
        return y if self.columns is None else y[:, self.columns]

    @property
    def csv(self):
        """The base's table restricted to this view's rows."""
        return self.base.csv.iloc[self.rows].reset_index(drop=True)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.base[int(self.rows[index])]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue seeds for every accelerator
            # backend (milliseconds per call, i.e. per image).
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            image = self.transform(item["image"])
        labels, mask = item["labels"], item["mask"]
        if self.columns is not None:
            labels, mask = labels[self.columns], mask[self.columns]
        return {"image": image, "labels": labels, "mask": mask, "index": index}


class RawImage:
    """Identity transform: keeps CachedDataset's uint8 [1, S, S] image (picklable, unlike a lambda)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image


__all__ = ["EpochBatches", "RawImage", "SeededView", "mix_seed", "shard_batches"]
