"""Micro-batching inside one worker process: requests arriving together are run as one batch.

Celery has no batching of its own (the `celery-batches` add-on bypasses Celery's acknowledgement and
time-limit machinery), so each request stays an ordinary Celery task, run in a worker thread, which
hands its image to this batcher and waits for its own answer. One inference thread takes the first
waiting request, waits up to `wait_s` for up to `max_batch - 1` more, and runs requests with the same
options as one batch.

With `expected` (the worker's count of requests it has taken from the queue but not yet handed here),
the window is only waited while such requests are on their way: a lone request runs at once (no fixed
batching delay at low load), and under load the batch fills with the requests already being decoded.
Without it, every batch waits the full window for company.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RunBatch = Callable[[list[np.ndarray], bool, str], list[Any]]


@dataclass
class _Item:
    image: np.ndarray
    explain: bool
    method: str
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Collects single requests into batches for `run_batch(images, explain, method) -> results`."""

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int = 8,
        wait_s: float = 0.005,
        on_batch: Callable[[int, float, list[float]], None] | None = None,
        expected: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_s)
        self._on_batch = on_batch  # (batch size, seconds, per-item seconds waited in the batcher)
        self._expected = expected  # requests on their way to submit() (None: always wait the window)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="xrayfm-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray, explain: bool = True, method: str = "rollout") -> Future:
        """Queue one image; the returned future gets its result dict (or the batch's exception)."""
        item = _Item(image=image, explain=explain, method=method)
        self._queue.put(item)
        return item.future

    def busy_for(self) -> float:
        """Seconds the current batch has been running (0 when idle): a stuck model shows here."""
        started = self._busy_since
        return 0.0 if started is None else time.monotonic() - started

    def close(self) -> None:
        """Stop the inference thread after the batches already queued."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: _Item) -> list[_Item]:
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if self._expected is not None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if left <= 0 or self._expected() <= 0:
                        break  # nobody else is on the way: run now
                    try:  # someone is: look again in 1 ms slices until the window closes
                        item = self._queue.get(timeout=min(left, 0.001))
                    except queue.Empty:
                        continue
            else:
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is None:  # close(): put the sentinel back for the loop
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            groups: dict[tuple[bool, str], list[_Item]] = {}
            for item in batch:
                groups.setdefault((item.explain, item.method), []).append(item)
            for (explain, method), items in groups.items():
                self._run(items, explain, method)

    def _run(self, items: list[_Item], explain: bool, method: str) -> None:
        items = [item for item in items if item.future.set_running_or_notify_cancel()]
        if not items:
            return
        start = time.monotonic()
        self._busy_since = start
        try:
            results = self._run_batch([item.image for item in items], explain, method)
            if len(results) != len(items):
                raise RuntimeError(f"batch of {len(items)} gave {len(results)} results")
        except Exception as exc:  # every waiting request gets the error, none hangs
            log.exception("batch of %d failed", len(items))
            for item in items:
                item.future.set_exception(exc)
        else:
            for item, result in zip(items, results, strict=True):
                item.future.set_result(result)
        finally:
            self._busy_since = None
        if self._on_batch is not None:
            self._on_batch(len(items), time.monotonic() - start, [start - item.enqueued for item in items])
