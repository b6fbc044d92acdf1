"""Choosing the serving batch size by measurement (xrayfm.inference.batching): the rule on a model whose
cost per batch is known (a fake clock), and one real sweep on a tiny checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import make_tiny_checkpoint
from xrayfm.inference import Predictor, batching, load_served_model


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedModel:
    """A predictor whose batch of `b` images takes `cost(b)` seconds on the fake clock."""

    def __init__(self, clock: FakeClock, cost, side: int = 32) -> None:
        self.clock, self.cost = clock, cost
        self.served = SimpleNamespace(preprocessing=SimpleNamespace(size=side))
        self.sizes: list[int] = []

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.zeros(len(images), 1, 4, 4)

    def run(self, batch: torch.Tensor, explain_maps: bool, method: str | None):
        self.sizes.append(int(batch.shape[0]))
        self.clock.now += self.cost(int(batch.shape[0]))
        return None, None, "fake"

    def synchronize(self, batch: torch.Tensor) -> None:
        """Nothing runs asynchronously here (PredictorBase.synchronize)."""


@pytest.fixture()
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(batching.time, "perf_counter", fake.perf_counter)
    return fake


def test_choose_takes_the_smallest_size_near_the_best():
    assert batching.choose({1: 50.0, 2: 58.2, 4: 58.7, 8: 55.0}) == 2  # 58.2 is within 5% of 58.7
    assert batching.choose({1: 10.0, 2: 19.0, 4: 30.0, 8: 40.0}) == 8
    assert batching.choose({1: 100.0, 2: 90.0}) == 1
    assert batching.choose({1: 100.0, 2: 100.0}, tolerance=0.0) == 1
    with pytest.raises(ValueError):
        batching.choose({})


def test_throughput_counts_images_per_second(clock):
    model = TimedModel(clock, lambda b: 0.01 + 0.005 * b)
    rate = batching.throughput(model, torch.zeros(4, 1, 4, 4), seconds=0.2)
    assert rate == pytest.approx(4 / 0.03)
    assert len(model.sizes) >= 1 + 7  # a warm-up, then runs for at least 0.2 s


def test_auto_picks_where_a_cpu_model_peaks(clock):
    """Cheaper per image up to 4, dearer beyond (the CPU case): 4 wins; the sweep stops two sizes after the
    peak instead of running the largest batches."""
    per_image = {1: 0.020, 2: 0.017, 4: 0.016, 8: 0.019, 16: 0.022, 32: 0.03, 64: 0.04}
    model = TimedModel(clock, lambda b: b * per_image[b])
    size, rates = batching.auto_batch_max(model, limit=64, budget_s=100)
    assert size == 4
    assert sorted(rates) == [1, 2, 4, 8, 16]
    assert rates[4] == pytest.approx(1 / 0.016)


def test_auto_on_a_gpu_like_model_takes_the_largest_useful_batch(clock):
    """A fixed cost per batch and little per image (the GPU case): bigger is better up to the limit, and
    the limit (the worker's threads) is respected."""
    model = TimedModel(clock, lambda b: 0.010 + 0.0001 * b)
    size, rates = batching.auto_batch_max(model, limit=16, budget_s=100)
    assert size == 16 and max(rates) == 16
    assert max(model.sizes) == 16


def test_auto_stays_within_its_time_budget(clock):
    """A slow model: the sweep stops before a size whose runs would overrun the budget."""
    model = TimedModel(clock, lambda b: 0.5 * b)  # 0.5 s per image, no gain from batching
    size, rates = batching.auto_batch_max(model, limit=64, budget_s=5.0, seconds=0.25)
    assert clock.now <= 5.0  # 1.5 s at batch 1, 3 s at batch 2; batch 4 would take 6 s
    assert sorted(rates) == [1, 2] and size == 1
    # no budget at all still measures batch 1, and picks it
    model = TimedModel(clock, lambda b: 0.5 * b)
    assert batching.auto_batch_max(model, limit=64, budget_s=0.0)[0] == 1


def test_a_size_that_fails_ends_the_sweep_and_the_sizes_that_ran_count(clock, caplog):
    """Out of memory at batch 8 (a GPU): the worker still loads, with the best size that ran."""

    def cost(b: int) -> float:
        if b >= 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.010 + 0.001 * b

    size, rates = batching.auto_batch_max(TimedModel(clock, cost), limit=64, budget_s=100)
    assert sorted(rates) == [1, 2, 4] and size == 4
    assert "batch of 8 failed while measuring" in caplog.text
    with pytest.raises(RuntimeError, match="out of memory"):  # not even one image: the model cannot serve
        batching.auto_batch_max(TimedModel(clock, lambda b: cost(8)), limit=64)


def test_auto_on_a_real_model(tmp_path):
    """A real tiny checkpoint through the torch predictor: a size within the limit and a rate per size."""
    served = load_served_model(make_tiny_checkpoint(tmp_path / "m", ["Effusion"]), device="cpu")
    size, rates = batching.auto_batch_max(Predictor(served), limit=4, budget_s=5.0, seconds=0.05)
    assert size in rates and set(rates) <= {1, 2, 4} and 1 in rates
    assert all(rate > 0 for rate in rates.values())
