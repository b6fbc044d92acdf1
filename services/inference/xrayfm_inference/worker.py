"""The Celery inference worker: loads the served model once, batches requests, answers with
probabilities and heatmaps.

Run with a thread pool (requests wait in threads while the batcher runs the model)::

    celery -A xrayfm_inference.worker worker --pool=threads --concurrency=16 --loglevel=INFO
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from celery import signals
from celery.exceptions import Reject

from xrayfm.errors import XrayfmError
from xrayfm_inference import metrics
from xrayfm_inference.batcher import MicroBatcher
from xrayfm_inference.celery_app import make_celery
from xrayfm_inference.config import WorkerSettings
from xrayfm_inference.heartbeat import Heartbeat
from xrayfm_inference.protocol import EXPLAIN_METHODS, PREDICT_TASK, decode_request
from xrayfm_inference.swap import ServingWatcher, poll_seconds

log = logging.getLogger("xrayfm.worker")

SETTINGS = WorkerSettings.from_env()
app = make_celery(SETTINGS.queue)


class InferenceTimeout(XrayfmError):
    """The model did not answer within the task time limit."""


class WorkerNotReady(XrayfmError):
    """The worker has no model loaded (it failed to load, or is still loading)."""


@dataclass
class Runtime:
    """What a running worker holds: the model (behind its predictor and batcher) or the load error.

    The predictor is replaced as a whole (one attribute) when a promoted version loads; each batch reads
    it once, so a batch in flight finishes on the model it started with."""

    predictor: Any = None
    batcher: MicroBatcher | None = None
    heartbeat: Heartbeat | None = None
    watcher: ServingWatcher | None = None
    error: str | None = None
    loading: bool = True

    @property
    def served(self) -> Any:
        """The served model (``xrayfm.inference.ServedModel``), or None."""
        predictor = self.predictor
        return None if predictor is None else predictor.served

    def describe(self) -> dict[str, Any]:
        """The heartbeat's content."""
        stuck = self.batcher is not None and self.batcher.busy_for() > SETTINGS.queue.task_time_limit_s
        return {
            "ready": self.served is not None and not stuck,
            "loading": self.loading,
            "error": self.error or ("a batch has run longer than the time limit" if stuck else None),
            "model": self.served.info() if self.served is not None else None,
            "swap_error": self.watcher.error if self.watcher is not None else None,
            "batch_max": SETTINGS.batch_max,
            "pid": os.getpid(),
        }


RUNTIME = Runtime()
_START_LOCK = threading.Lock()


def start_runtime(hostname: str) -> Runtime:
    """Load the model, start the batcher, the metrics endpoint and the heartbeat (once per process)."""
    with _START_LOCK:
        if RUNTIME.heartbeat is not None:
            return RUNTIME
        if SETTINGS.metrics_port:
            from prometheus_client import start_http_server

            try:
                start_http_server(SETTINGS.metrics_port, addr=SETTINGS.metrics_addr)
            except OSError as exc:  # serving matters more than metrics: say so and go on
                log.error(
                    "no metrics endpoint on %s:%s: %s", SETTINGS.metrics_addr, SETTINGS.metrics_port, exc
                )
        RUNTIME.heartbeat = Heartbeat(SETTINGS.queue, hostname, RUNTIME.describe).start()
        ref = None
        try:
            from xrayfm_inference.store import resolve_model

            ref = resolve_model(SETTINGS.model_path, SETTINGS.model_store)
            _load_model(ref)
        except Exception as exc:  # the worker stays up and says why in its heartbeat (/ready shows it)
            RUNTIME.error = f"model failed to load: {exc}"
            log.error(RUNTIME.error)
        finally:
            RUNTIME.loading = False
        poll_s = poll_seconds()
        if SETTINGS.model_path is None and poll_s > 0:  # serving from the store: follow promotions
            served_ref = ref if RUNTIME.predictor is not None else None
            RUNTIME.watcher = ServingWatcher(SETTINGS.model_store, poll_s, _load_model, served_ref).start()
        RUNTIME.heartbeat.beat()
        return RUNTIME


def _run_batch(images: list, explain_maps: bool, method: str) -> list[dict[str, Any]]:
    """One batch on the predictor current at this batch boundary; each answer names that model."""
    predictor = RUNTIME.predictor  # read once: a swap during this batch does not touch it
    results = predictor.predict(images, explain_maps=explain_maps, method=method)
    info = predictor.served.info()
    for result in results:
        result["model"] = info
    return results


def _load_model(ref) -> None:
    """Load `ref` (a ``store.ModelRef``), warm it up, then serve it: at start, or to replace the model
    served now (the swap happens only once the new model answered its warm-up)."""
    import torch

    from xrayfm.inference import Predictor, load_served_model

    if SETTINGS.torch_threads:
        torch.set_num_threads(SETTINGS.torch_threads)
    t0 = time.perf_counter()
    served = load_served_model(ref.path, SETTINGS.device, name=ref.name, version=ref.version)
    predictor = Predictor(served)
    predictor.predict([_warmup_image()], explain_maps=True, method=SETTINGS.explain_method)
    previous = RUNTIME.served
    RUNTIME.predictor = predictor  # the atomic swap: the next batch runs on the new model
    if RUNTIME.batcher is None:
        RUNTIME.batcher = MicroBatcher(
            _run_batch, SETTINGS.batch_max, SETTINGS.batch_wait_ms / 1000.0, on_batch=metrics.observe_batch
        )
    RUNTIME.error = None
    info = served.info()
    metrics.MODEL.info({k: str(info[k]) for k in ("name", "version", "sha256", "device")})
    metrics.MODEL_LOADED.set(1)
    log.info(
        "serving %s/%s (sha256 %s) on %s, loaded in %.1f s%s",
        served.name, served.version, served.sha256[:12], served.device, time.perf_counter() - t0,
        f" (replaces {previous.name}/{previous.version})" if previous is not None else "",
    )  # fmt: skip


def _warmup_image():
    import numpy as np

    return np.zeros((64, 64), dtype=np.uint8)


@signals.worker_init.connect
def _on_worker_init(sender=None, **_kwargs: Any) -> None:
    start_runtime(getattr(sender, "hostname", None) or f"worker@{os.getpid()}")


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_kwargs: Any) -> None:
    if RUNTIME.watcher is not None:
        RUNTIME.watcher.stop()
    if RUNTIME.heartbeat is not None:
        RUNTIME.heartbeat.stop()
    if RUNTIME.batcher is not None:
        RUNTIME.batcher.close()


@app.task(name=PREDICT_TASK, bind=True)
def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
    """One request: grey pixels in, the answer out. Expected failures are returned as ``{"error": ...}``;
    a timeout or a missing model raises (the task fails with that message)."""
    picked_up = time.time()
    if RUNTIME.batcher is None or RUNTIME.predictor is None:
        # No model here (it failed to load): give the message back for a worker that has one. The
        # gateway sends nothing while no worker is ready, and its own timeout bounds the caller's wait.
        metrics.REQUESTS.labels("not_ready").inc()
        log.warning("no model loaded (%s); requeueing %s", RUNTIME.error, self.request.id)
        time.sleep(1.0)
        raise Reject(WorkerNotReady(RUNTIME.error or "no model loaded"), requeue=True)
    try:
        image, options = decode_request(payload)
        if options["method"] not in EXPLAIN_METHODS:
            raise XrayfmError(
                f"unknown explanation method {options['method']!r}; choose one of {EXPLAIN_METHODS}"
            )
    except XrayfmError as exc:
        metrics.REQUESTS.labels("bad_request").inc()
        return {"error": {"type": "bad_request", "message": str(exc)}}
    queue_wait = max(0.0, picked_up - options["submitted_at"])
    metrics.QUEUE_WAIT_SECONDS.observe(queue_wait)
    future = RUNTIME.batcher.submit(image, options["explain"], options["method"])
    try:
        result = future.result(timeout=SETTINGS.queue.task_time_limit_s)
    except FutureTimeout:
        future.cancel()
        metrics.REQUESTS.labels("timeout").inc()
        raise InferenceTimeout(
            f"inference did not finish within XRAYFM_TASK_TIME_LIMIT={SETTINGS.queue.task_time_limit_s} s"
        ) from None
    except XrayfmError as exc:  # e.g. an explanation method the served architecture does not support
        metrics.REQUESTS.labels("bad_request").inc()
        return {"error": {"type": "bad_request", "message": str(exc)}}
    metrics.REQUESTS.labels("ok").inc()
    result["worker"] = self.request.hostname
    result["timings"]["queue_wait_ms"] = 1000 * queue_wait
    result["timings"]["worker_ms"] = 1000 * (time.time() - picked_up)
    return result
