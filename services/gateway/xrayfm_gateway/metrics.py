"""The gateway's Prometheus metrics (``GET /metrics``): its own HTTP counters, plus training jobs by state,
running jobs' progress, jobs' last validation metrics and the served model, read at each scrape."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xrayfm.errors import XrayfmError
from xrayfm_stack.protocol import JOB_STATES
from xrayfm_stack.store import serving

log = logging.getLogger(__name__)

REQUESTS = Counter("xrayfm_gateway_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram(
    "xrayfm_gateway_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# livesum: with several gateway processes (xrayfm_gateway.serve), the sum over the running ones
IN_FLIGHT = Gauge(
    "xrayfm_gateway_requests_in_flight", "HTTP requests being handled", multiprocess_mode="livesum"
)
REJECTED = Counter("xrayfm_gateway_rejected_uploads_total", "Uploads refused at the gateway", ["reason"])
UPLOAD_BYTES = Histogram(
    "xrayfm_gateway_upload_bytes", "Size of accepted uploads", buckets=(1e4, 1e5, 1e6, 4e6, 1.6e7, 6.4e7)
)
QUEUE_ERRORS = Counter(
    "xrayfm_gateway_queue_errors_total", "Redis/queue failures seen by the gateway", ["kind"]
)
PREDICTIONS = Counter("xrayfm_gateway_predictions_total", "Answers by outcome", ["outcome"])
AUDIT_FAILURES = Counter(
    "xrayfm_gateway_audit_failures_total",
    "Audit records that could not be written (admin: the action was refused, or done with its requested line only)",
    ["kind"],
)

# -- the domain gate and drift, per model version ----------------------------------------------------------
OUT_OF_DOMAIN = Counter(
    "xrayfm_domain_out_of_domain_total",
    "Images judged outside the served version's domain, by reason and what was done (refused, flagged)",
    ["model", "version", "reason", "action"],
)
JUDGED = Counter("xrayfm_domain_judged_total", "Images the domain gate judged", ["model", "version"])
PROBABILITY = Histogram(
    "xrayfm_answer_probability",
    "Probability of the first label in answered images, per version",
    ["model", "version"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
)
DOMAIN_SCORE = Histogram(
    "xrayfm_domain_score_ratio",
    "Domain gate score over its threshold (above 1: out of domain), per version",
    ["model", "version"],
    buckets=(0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2, 4, 8),
)
# max: with several gateway processes, the worst window among them
DRIFT = Gauge(
    "xrayfm_drift_psi",
    "Population Stability Index of the last XRAYFM_DRIFT_WINDOW values against the version's reference "
    "(held-out in-domain images when its gate was fitted); > 0.25: a real shift",
    ["model", "version", "quantity"],
    multiprocess_mode="max",
)


class DriftWatch:
    """Rolling PSI per (model, version, quantity) against the reference in the version's gate file."""

    def __init__(self) -> None:
        self.store: Path | None = None
        self.window = 500
        self._windows: dict[tuple[str, str, str], Any] = {}
        self._references: dict[tuple[str, str], dict[str, Any] | None] = {}

    def configure(self, store: Path, window: int) -> None:
        self.store, self.window = Path(store), int(window)
        self._windows.clear()
        self._references.clear()

    def _reference(self, name: str, version: str) -> dict[str, Any] | None:
        key = (name, version)
        if key not in self._references:  # read once per version (a small JSON file)
            from xrayfm.domain.gate import GATE_JSON
            from xrayfm.utils import read_json
            from xrayfm_stack.store import version_dir

            try:
                info = read_json(version_dir(self.store, name, version) / GATE_JSON, {}) if self.store else {}
                self._references[key] = info.get("reference") or None
            except (XrayfmError, OSError, ValueError) as exc:
                log.warning("drift: no reference for %s/%s: %s", name, version, exc)
                self._references[key] = None
        return self._references[key]

    def observe(self, name: str, version: str, quantity: str, value: float) -> None:
        from xrayfm.domain.drift import RollingDrift

        reference = (self._reference(name, version) or {}).get(quantity)
        if reference is None:
            return
        key = (name, version, quantity)
        if key not in self._windows:
            self._windows[key] = RollingDrift(reference, self.window)
        value_psi = self._windows[key].add(value)
        if value_psi is not None:
            DRIFT.labels(name, version, quantity).set(value_psi)


DRIFT_WATCH = DriftWatch()


def observe_domain(model: Any, domain: Any, probability: float | None, refused: bool = False) -> None:
    """Count one judged image (``ModelInfo``, ``DomainInfo``): its reasons when out of domain, its score
    and probability in the histograms and the drift windows. Nothing when the gate did not run."""
    if model is None or domain is None:
        return
    name, version = model.name, model.version
    JUDGED.labels(name, version).inc()
    for reason in domain.reasons:
        OUT_OF_DOMAIN.labels(name, version, reason.code, "refused" if refused else "flagged").inc()
    if domain.score is not None and domain.threshold:
        ratio = domain.score / domain.threshold
        DOMAIN_SCORE.labels(name, version).observe(ratio)
        DRIFT_WATCH.observe(name, version, "score_ratio", ratio)
    if probability is not None:
        PROBABILITY.labels(name, version).observe(probability)
        DRIFT_WATCH.observe(name, version, "probability", probability)


def gateway_exposition() -> bytes:
    """The gateway's own series in Prometheus' text format: this process's, or, when several gateway
    processes share the port (``PROMETHEUS_MULTIPROC_DIR`` set by :mod:`xrayfm_gateway.serve`), all of
    theirs added up, whichever process answers the scrape."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def process_stopped() -> None:
    """Drop this process's live gauges from the shared folder (several processes only), so that a stopped
    process's requests in flight stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


class MetricsMiddleware:
    """Count and time every HTTP request by its route template (never by raw path: ids stay out)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUESTS.labels(route, scope["method"], str(status["code"])).inc()
            LATENCY.labels(route).observe(time.perf_counter() - start)


# -- training jobs and the served model, computed at scrape time ------------------------------------------
# Custom collectors (not module-level Gauges): the series come from Redis and the model store at each
# scrape, so jobs that left the records or stopped running vanish instead of keeping stale values.
SCRAPE_TIMEOUT_S = 2.0  # /metrics leaves the training series out rather than wait longer on Redis
JOBS_WITH_SERIES = 50  # the newest jobs that get per-job series (progress, last metrics): bounded cardinality


@dataclass
class TrainingSnapshot:
    """What one scrape read: job states (all jobs), the newest jobs' records, the store's served model."""

    states: dict[str, int] | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    serving: dict[str, str] | None = None


def read_jobs(records: Any, limit: int = JOBS_WITH_SERIES) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Count every job by state (one pipelined read) and return the newest `limit` jobs' records
    (``xrayfm_stack.jobs.JobRecords``; blocking: call it from a thread)."""
    ids = [i.decode() for i in records.redis.zrevrange(records.index_key, 0, -1)]
    pipe = records.redis.pipeline()
    for rank, job_id in enumerate(ids):  # older jobs: their status only (the counts)
        fields = ["status", "kind", "name", "progress", "result", "attempts"] if rank < limit else ["status"]
        pipe.hmget(records.key(job_id), fields)
    counts = dict.fromkeys(JOB_STATES, 0)
    jobs = []
    for rank, (job_id, raw) in enumerate(zip(ids, pipe.execute() if ids else [], strict=True)):
        if raw[0] is None:  # the index names a job whose record expired or was deleted
            continue
        status = json.loads(raw[0])
        counts[status] = counts.get(status, 0) + 1
        if rank < limit:
            kind, name, progress, result, attempts = (
                json.loads(v) if v is not None else None for v in raw[1:]
            )
            jobs.append({"job_id": job_id, "status": status, "kind": kind, "name": name,
                         "progress": progress or {}, "result": result or {}, "attempts": attempts or 0})  # fmt: skip
    return counts, jobs


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def training_families(snap: TrainingSnapshot, per_job: bool = True) -> list[Metric]:
    """The Prometheus series of a snapshot: jobs by state, running jobs' progress and attempts, the last
    validation metrics of the newest jobs (`per_job`: their labels name jobs), and the store's served model
    (an info metric)."""
    families: list[Metric] = []
    if snap.states is not None:
        by_state = GaugeMetricFamily("xrayfm_training_jobs", "Training jobs by state", labels=["state"])
        for state, count in sorted(snap.states.items()):
            by_state.add_metric([state], count)
        progress = GaugeMetricFamily(
            "xrayfm_training_job_progress",
            "Fraction of its steps a running training job has done",
            labels=["job_id", "kind", "name"],
        )
        last = GaugeMetricFamily(
            "xrayfm_training_job_last_metric",
            "The last validation metrics a training job reported",
            labels=["job_id", "kind", "name", "metric"],
        )
        attempts = GaugeMetricFamily(
            "xrayfm_training_job_attempts",
            "Times an active training job was started (more than 1: its worker stopped or died under it)",
            labels=["job_id", "kind", "name"],
        )
        for job in snap.jobs:
            ids = [job["job_id"], str(job["kind"]), str(job["name"])]
            if job["status"] in ("queued", "running", "cancelling") and job.get("attempts"):
                attempts.add_metric(ids, float(job["attempts"]))
            p = job["progress"]
            step, total = _number(p.get("step")), _number(p.get("total_steps"))
            if job["status"] in ("running", "cancelling") and step is not None and total:
                progress.add_metric(ids, min(step / total, 1.0))
            metrics = p.get("metrics") or job["result"].get("metrics") or {}
            for metric, value in sorted(metrics.items() if isinstance(metrics, dict) else []):
                if (number := _number(value)) is not None:
                    last.add_metric([*ids, str(metric)], number)
        families += [by_state, progress, last, attempts] if per_job else [by_state]
    if snap.serving is not None:
        info = InfoMetricFamily("xrayfm_served_model", "The model version the store serves (serving.json)")
        info.add_metric([], {"name": snap.serving["name"], "version": snap.serving["version"]})
        families.append(info)
    return families


class _Families:
    """A one-scrape 'registry' for ``generate_latest``: it only needs ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def read_snapshot(records: Any, store: Path) -> TrainingSnapshot:
    """Read the jobs and the served model (blocking); each part is left out when its source fails."""
    snap = TrainingSnapshot()
    try:
        snap.states, snap.jobs = read_jobs(records)
    except (RedisError, OSError, ValueError) as exc:
        log.warning("metrics: training jobs left out: %s", exc)
        QUEUE_ERRORS.labels("metrics").inc()
    try:
        snap.serving = serving(store)
    except (XrayfmError, OSError, KeyError, TypeError) as exc:
        log.warning("metrics: served model left out: %s", exc)
    return snap


async def training_exposition(
    records: Any, store: Path, timeout_s: float = SCRAPE_TIMEOUT_S, per_job: bool = True
) -> bytes:
    """The training series in Prometheus' text format (the per-job ones only with `per_job`), read in a
    thread (never on the event loop); empty when the reads take longer than `timeout_s` (the thread is
    abandoned, not waited for)."""
    try:
        with anyio.fail_after(timeout_s):
            snap = await anyio.to_thread.run_sync(read_snapshot, records, store, abandon_on_cancel=True)
    except TimeoutError:
        log.warning("metrics: training series left out: reads took over %.1f s", timeout_s)
        QUEUE_ERRORS.labels("metrics").inc()
        return b""
    return generate_latest(_Families(training_families(snap, per_job)))


def feedback_families(agreement: dict[tuple[str, str], dict[str, Any]]) -> list[Metric]:
    """Staff feedback per model version: verdict counts and the agreement rate."""
    verdicts = GaugeMetricFamily(
        "xrayfm_feedback_verdicts",
        "Staff verdicts on answers, per model version",
        labels=["model", "version", "verdict"],
    )
    rate = GaugeMetricFamily(
        "xrayfm_feedback_agreement",
        "Share of staff verdicts that agree with the answer",
        labels=["model", "version"],
    )
    for (name, version), row in sorted(agreement.items()):
        for verdict in ("agree", "disagree"):
            verdicts.add_metric([name, version, verdict], row[verdict])
        rate.add_metric([name, version], row["agreement"])
    return [verdicts, rate]


async def feedback_exposition(folder: Path, timeout_s: float = SCRAPE_TIMEOUT_S) -> bytes:
    """The feedback series, read from the feedback folder in a thread (left out when it takes too long)."""
    from xrayfm.feedback import agreement, load_records

    try:
        with anyio.fail_after(timeout_s):
            records = await anyio.to_thread.run_sync(load_records, folder, abandon_on_cancel=True)
    except TimeoutError:
        log.warning("metrics: feedback series left out: reads took over %.1f s", timeout_s)
        return b""
    return generate_latest(_Families(feedback_families(agreement(records))))
