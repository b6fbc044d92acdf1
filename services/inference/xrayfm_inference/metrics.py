"""The inference worker's Prometheus metrics (served on XRAYFM_WORKER_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("xrayfm_worker_requests_total", "Requests handled by this worker", ["outcome"])
BATCH_SIZE = Histogram("xrayfm_worker_batch_size", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64))
INFERENCE_SECONDS = Histogram(
    "xrayfm_worker_inference_seconds", "Preprocess + forward + explanation time per batch", buckets=_LATENCY
)
QUEUE_WAIT_SECONDS = Histogram(
    "xrayfm_worker_queue_wait_seconds",
    "From the gateway's submission to the worker's pick-up",
    buckets=_LATENCY,
)
BATCHER_WAIT_SECONDS = Histogram(
    "xrayfm_worker_batcher_wait_seconds", "Time a request waited for its batch to start", buckets=_LATENCY
)
BATCH_MAX = Gauge(
    "xrayfm_worker_batch_max", "Most images per model batch (XRAYFM_BATCH_MAX, or measured with auto)"
)
MODEL_LOADED = Gauge("xrayfm_worker_model_loaded", "1 when the served model is loaded and answering")
MODEL = Info("xrayfm_worker_model", "The served model (name, version, sha256, device)")


def observe_batch(size: int, seconds: float, waits: list[float]) -> None:
    """Record one batch (the MicroBatcher's callback)."""
    BATCH_SIZE.observe(size)
    INFERENCE_SECONDS.observe(seconds)
    for wait in waits:
        BATCHER_WAIT_SECONDS.observe(max(0.0, wait))
