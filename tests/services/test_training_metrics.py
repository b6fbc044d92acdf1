"""Training series on the gateway's /metrics: jobs by state, running jobs' progress, last validation
metrics and the served model, read from real Redis job records and a real model store at scrape time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from xrayfm_gateway.metrics import (
    TrainingSnapshot,
    read_jobs,
    read_snapshot,
    training_exposition,
    training_families,
)
from xrayfm_local import launcher as stack_lib
from xrayfm_stack import store as model_store
from xrayfm_stack.jobs import JobRecords
from xrayfm_stack.settings import TrainingSettings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_state(values: dict) -> dict[str, float]:
    return {dict(k[1])["state"]: v for k, v in values.items() if k[0] == "xrayfm_training_jobs"}


# -- in process -------------------------------------------------------------------------------------------
def test_families_from_a_snapshot() -> None:
    snap = TrainingSnapshot(
        states={"running": 1, "done": 1},
        jobs=[
            {
                "job_id": "a",
                "status": "running",
                "kind": "adapt",
                "name": "m",
                "progress": {"step": 3, "total_steps": 12, "metrics": {"val_loss": 0.5, "auroc/x": None}},
                "result": {},
                "attempts": 2,
            },
            {
                "job_id": "b",
                "status": "done",
                "kind": "pretrain",
                "name": "f",
                "progress": {"step": 12, "total_steps": 12},
                "result": {"metrics": {"mean_auroc": 0.7}},
                "attempts": 1,
            },
        ],  # fmt: skip
        serving={"name": "m", "version": "2"},
    )
    registry = type("R", (), {"collect": lambda self: training_families(snap)})()
    from prometheus_client import generate_latest

    values = samples(generate_latest(registry).decode())
    progress = {dict(k[1])["job_id"]: v for k, v in values.items() if k[0] == "xrayfm_training_job_progress"}
    assert progress == {"a": 0.25}  # a finished job has no progress series
    attempts = {dict(k[1])["job_id"]: v for k, v in values.items() if k[0] == "xrayfm_training_job_attempts"}
    assert attempts == {"a": 2.0}  # active jobs only: a second attempt means its worker was lost
    last = {(dict(k[1])["job_id"], dict(k[1])["metric"]): v for k, v in values.items()
            if k[0] == "xrayfm_training_job_last_metric"}  # fmt: skip
    assert last == {("a", "val_loss"): 0.5, ("b", "mean_auroc"): 0.7}  # None (undefined AUROC) left out
    assert values[("xrayfm_served_model_info", (("name", "m"), ("version", "2")))] == 1


def test_unreachable_redis_and_store_leave_series_out(tmp_path: Path) -> None:
    dead = JobRecords(f"redis://127.0.0.1:{stack_lib.free_port()}/0", "q")
    snap = read_snapshot(dead, tmp_path / "no-store")
    assert snap.states is None and snap.jobs == [] and snap.serving is None
    assert training_families(snap) == []


def test_slow_reads_time_out_without_blocking(tmp_path: Path) -> None:
    class Slow:
        """Records whose Redis hangs (a blocked server): the scrape gives up after its timeout."""

        @property
        def redis(self):
            time.sleep(1.5)
            raise redis.exceptions.TimeoutError("hung")

    async def scrape() -> tuple[bytes, float]:
        started = time.perf_counter()
        body = await training_exposition(Slow(), tmp_path, timeout_s=0.2)
        return body, time.perf_counter() - started

    body, took = anyio.run(scrape)
    assert body == b"" and took < 1.0


# -- through a real gateway (the shared stack's Redis, a model store of its own) ---------------------------


@pytest.fixture(scope="module")
def metrics_gateway(live_stack, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("metrics-store")
    port = stack_lib.free_port()
    proc = live_stack.stack.start_gateway(
        port, name="gateway-metrics", extra_env={"XRAYFM_MODEL_STORE": str(store)}
    )
    yield f"http://127.0.0.1:{port}", store
    live_stack.stack.stop(proc)


def scrape(url: str) -> dict:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    return samples(response.text)


@pytest.mark.slow
def test_metrics_show_jobs_progress_and_served_version(live_stack, metrics_gateway, tmp_path: Path) -> None:
    url, store = metrics_gateway
    before = by_state(scrape(url))
    assert not any(k[0] == "xrayfm_served_model_info" for k in scrape(url))  # nothing promoted yet

    training = TrainingSettings.from_env(live_stack.env)  # the queue the gateway reads job records from
    records = JobRecords(training.redis_url, training.queue)
    spec = {"kind": "adapt", "name": "metrics-test", "config": {}}
    done, running, failed = (records.create(spec) for _ in range(3))
    records.update(done, status="done", result={"metrics": {"mean_auroc": 0.81, "val_loss": 0.4}},
                   progress={"step": 10, "total_steps": 10, "metrics": {"mean_auroc": 0.81, "val_loss": 0.4}})  # fmt: skip
    records.update(
        running, status="running", progress={"step": 4, "total_steps": 16, "metrics": {"val_loss": 0.9}}
    )
    records.update(failed, status="failed", error="boom")
    queued = records.create(spec)

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_text(json.dumps({"format": "xrayfm.checkpoint"}))
    version = model_store.add_version(store, "metrics-test", checkpoint, {"job_id": done})
    model_store.promote(store, "metrics-test", version)

    values = scrape(url)
    after = by_state(values)
    delta = {state: after.get(state, 0) - before.get(state, 0) for state in after}
    assert delta == {**dict.fromkeys(after, 0), "done": 1, "running": 1, "failed": 1, "queued": 1}
    progress = {dict(k[1])["job_id"]: v for k, v in values.items() if k[0] == "xrayfm_training_job_progress"}
    assert progress.get(running) == pytest.approx(0.25)
    assert done not in progress and queued not in progress
    labels = (("job_id", done), ("kind", "adapt"), ("metric", "mean_auroc"), ("name", "metrics-test"))
    assert values[("xrayfm_training_job_last_metric", labels)] == pytest.approx(0.81)
    served = [dict(k[1]) for k in values if k[0] == "xrayfm_served_model_info"]
    assert served == [{"name": "metrics-test", "version": version}]
    counts, newest = read_jobs(records, limit=1)  # older jobs count, only the newest gets per-job series
    assert [j["job_id"] for j in newest] == [queued] and sum(counts.values()) == sum(after.values())
    # the gateway's own HTTP series are still there
    assert any(k[0] == "xrayfm_gateway_requests_total" for k in values)

    records.update(running, status="done")  # finished: its progress series goes away at the next scrape
    progress = {dict(k[1])["job_id"] for k in scrape(url) if k[0] == "xrayfm_training_job_progress"}
    assert running not in progress


@pytest.mark.slow
def test_metrics_answer_without_redis(live_stack) -> None:
    """A gateway whose Redis is unreachable still answers /metrics, without the training series."""
    port = stack_lib.free_port()
    dead = f"redis://127.0.0.1:{stack_lib.free_port()}/0"
    proc = live_stack.stack.start_gateway(port, name="gateway-noredis", extra_env={"XRAYFM_REDIS_URL": dead})
    try:
        started = time.perf_counter()
        values = scrape(f"http://127.0.0.1:{port}")
        assert time.perf_counter() - started < 10
        assert not any(k[0].startswith("xrayfm_training_") for k in values)
    finally:
        live_stack.stack.stop(proc)
