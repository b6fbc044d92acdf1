"""How many images a served model should run at once, measured rather than guessed.

The best serving batch depends on the model, the runtime and the hardware, and in opposite directions:
on one CPU thread, ViT-Ti with rollout in ONNX Runtime int8 runs fastest at batch 2-4 and slows down from
8 on (the rollout's attention maps outgrow the caches), while a GPU keeps gaining up to tens of images.
No fixed default suits both, so the inference worker (``XRAYFM_BATCH_MAX=auto``) times its own model at
load with :func:`auto_batch_max`, and ``bench/bench_throughput.py`` measures its bare-model reference with
the same :func:`throughput` and :func:`sweep`.

Timing is by hand (a loop over ``perf_counter``): what is timed is ``Predictor.run``, the very call the
worker's batcher makes, which no benchmarking library wraps any better.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TOLERANCE = 0.05  # sizes within 5% of the best rate count as equal; the smallest of them wins (latency)


def throughput(predictor: Any, batch: Any, seconds: float, method: str | None = "rollout") -> float:
    """Images/s of ``predictor.run`` (logits and `method`'s maps, None: logits only) on a preprocessed
    `batch`: one warm-up run, then repeats for at least `seconds` and at least 2 runs."""

    def once() -> None:
        predictor.run(batch, method is not None, method)
        predictor.synchronize(batch)

    once()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        once()
        runs += 1
    return runs * int(batch.shape[0]) / (time.perf_counter() - start)


def sweep(
    predictor: Any, images: list[np.ndarray], sizes: list[int], seconds: float, method: str | None = "rollout"
) -> dict[int, float]:
    """Images/s at each batch size, on batches cycled from `images` (grey uint8, any size)."""
    return {
        size: throughput(
            predictor, predictor.preprocess([images[i % len(images)] for i in range(size)]), seconds, method
        )
        for size in sizes
    }


def choose(rates: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest batch size whose rate is within `tolerance` of the best (a bigger batch that is not
    clearly faster only adds latency)."""
    if not rates:
        raise ValueError("no rates to choose from")
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1.0 - tolerance) * best)


def auto_batch_max(
    predictor: Any,
    limit: int,
    method: str | None = "rollout",
    budget_s: float = 10.0,
    seconds: float = 0.25,
) -> tuple[int, dict[int, float]]:
    """Measure batches of 1, 2, 4, ... up to `limit` on noise images of the model's input size and pick
    one with :func:`choose`; also returns the rates measured.

    The sweep stops at the first size that would overrun `budget_s` (estimated from the last size's rate),
    after two sizes in a row slower than the best so far (a bigger batch will not recover), and at the
    first size that fails to run (out of GPU memory, say: the sizes that ran are kept; batch 1 failing
    raises). The contents of the images do not change the speed of a dense model; noise keeps it honest
    anyway."""
    side = predictor.served.preprocessing.size
    images = list(np.random.default_rng(0).integers(0, 256, (2, side, side), dtype=np.uint8))
    rates: dict[int, float] = {}
    started, size, worse = time.perf_counter(), 1, 0
    while size <= max(1, limit):
        if rates:
            batch_s = size / rates[max(rates)]  # this size's batch time, guessed from the last rate
            expected = batch_s + max(2 * batch_s, seconds)  # a warm-up, then the runs of throughput()
            if time.perf_counter() - started + expected > budget_s:
                break
        try:
            rates[size] = sweep(predictor, images, [size], seconds, method)[size]
        except Exception as exc:  # noqa: BLE001 (any failure ends the sweep; the model runs at smaller sizes)
            if not rates:
                raise
            log.warning("batch of %d failed while measuring (%s); batches stay below it", size, exc)
            release = getattr(predictor, "release_memory", None)
            if release is not None:
                release()
            break
        worse = worse + 1 if rates[size] < max(rates.values()) else 0
        if worse >= 2:
            break
        size *= 2
    return choose(rates), rates
