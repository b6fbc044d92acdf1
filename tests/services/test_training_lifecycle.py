"""Long jobs that survive failure, evaluate jobs, and a LoRA job on the real MURA subset through the stack.

Real Redis, real Celery workers (training and inference), real uvicorn. Jobs are tiny (32 px, a 2-block
ViT with 8 px patches) so that a run takes seconds; what is checked is the lifecycle, not the accuracy.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import shared_data_dir, starts_processes
from tests.services.svc_helpers import require_redis_server, stack_env
from tests.services.test_training import QUIET, _pretrain_spec, _wait
from xrayfm_local import launcher as stack_lib
from xrayfm_stack import store as model_store

pytestmark = pytest.mark.slow

LOCK_TTL = 2.0
DONE = ("done", "failed", "cancelled")


# -- orphan recovery, on the machine's Redis ----------------------------------------------------------------
def _job(records, status: str, attempts: int = 1) -> str:
    job_id = records.create({"kind": "pretrain", "name": "m", "config": {}})
    records.update(job_id, status=status, attempts=attempts)
    return job_id


def test_orphans_are_requeued_failed_or_cancelled_and_live_jobs_left_alone(records) -> None:
    from xrayfm_training.recovery import recover_orphans

    orphan, held, finished = _job(records, "running"), _job(records, "running"), _job(records, "done")
    cancelling, exhausted = _job(records, "cancelling"), _job(records, "running", attempts=3)
    queued = _job(records, "queued")
    assert records.acquire(held, "a-live-worker", 30)
    sent: list[tuple[str, int]] = []
    recovered = recover_orphans(records, 3, lambda job_id, n: sent.append((job_id, n)))

    assert sorted(recovered) == sorted([orphan, cancelling, exhausted])
    assert sent == [(orphan, 1)]
    assert records.get(orphan)["status"] == "queued" and records.get(orphan)["requeued"] == 1
    assert "queued again" in records.log_tail(orphan)[-1]
    assert 0 < records.redis.ttl(records.log_key(orphan)) <= 30 * 24 * 3600  # Redis keeps logs a while
    assert records.get(cancelling)["status"] == "cancelled"
    failed = records.get(exhausted)
    assert failed["status"] == "failed" and "lost 3 times" in failed["error"]
    assert [records.get(j)["status"] for j in (held, finished, queued)] == ["running", "done", "queued"]
    assert recover_orphans(records, 3, lambda *a: sent.append(a)) == []  # nothing left to recover
    assert len(sent) == 1


def test_a_requeue_that_cannot_be_sent_is_tried_again(records) -> None:
    from xrayfm_training.recovery import recover_orphans

    orphan = _job(records, "running")

    def broker_down(job_id: str, n: int) -> None:
        raise ConnectionError("broker down")

    assert recover_orphans(records, 3, broker_down) == [orphan]
    assert records.get(orphan)["status"] == "running"  # still an orphan: the next check retries
    sent = []
    recover_orphans(records, 3, lambda job_id, n: sent.append(job_id))
    assert sent == [orphan]


def test_store_publishes_one_version_per_job(tmp_path: Path) -> None:
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "meta.json").write_text("{}")
    store = tmp_path / "store"
    assert model_store.add_version(store, "m", source, {"job_id": "j1"}) == "1"
    assert model_store.add_version(store, "m", source, {"job_id": "j1"}) == "1"  # the job ran again
    assert model_store.add_version(store, "m", source, {"job_id": "j2"}) == "2"
    assert model_store.add_version(store, "m", source) == "3"


# -- through the stack --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
@starts_processes
def lifecycle_stack(tmp_path_factory: pytest.TempPathFactory):
    """Redis, a training worker, an inference worker serving from the store, the gateway."""
    require_redis_server()
    from xrayfm.data.synth import synth_chest

    home = tmp_path_factory.mktemp("lifecycle")
    chest = home / "CheXpert-synth"
    synth_chest(chest, n=48, seed=1, size=32, progress=False)
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    env = stack_env(
        redis_port,
        Path(""),
        XRAYFM_MODEL_PATH="",
        XRAYFM_MODEL_STORE=str(home / "store"),
        XRAYFM_MODEL_POLL_S="0.3",
        XRAYFM_TRAINING_QUEUE=f"xrayfm-training-test-{uuid.uuid4().hex[:8]}",
        XRAYFM_TRAINING_RUNS=str(home / "runs"),
        XRAYFM_TRAINING_LOCK_TTL=str(LOCK_TTL),
        XRAYFM_BOOTSTRAP="off",
        XRAYFM_TASK_TIME_LIMIT="30",
        XRAYFM_VISIBILITY_TIMEOUT="60",
        XRAYFM_DATA_DIRS=os.pathsep.join([str(home), str(shared_data_dir())]),
    )
    launcher = stack_lib.Stack(home, env=env)
    try:
        launcher.start_redis(redis_port)
        launcher.start_training_worker()
        launcher.start_worker(concurrency=2)
        launcher.start_gateway(gateway_port)
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=60) as http:
            yield http, home, chest, launcher
    finally:
        launcher.stop_all()


def _trainer(launcher) -> stack_lib.Proc:
    return [p for p in launcher.procs if p.name.startswith("trainer") and p.alive()][-1]


def _versions_of(store: Path, job_id: str) -> list[dict]:
    return [row for row in model_store.list_versions(store) if row["job_id"] == job_id]


def test_killed_worker_job_resumes_from_its_checkpoint_and_completes_once(lifecycle_stack) -> None:
    http, home, chest, launcher = lifecycle_stack
    spec = _pretrain_spec(chest, epochs=8)
    spec["name"] = "resumed-fm"
    job_id = http.post("/training/jobs", json=spec).json()["job_id"]

    def in_second_epoch(job: dict) -> bool:  # the end of an epoch saves last/
        p = job.get("progress") or {}
        return bool(p.get("total_steps")) and p["step"] > p["total_steps"] // 8

    _wait(http, job_id, in_second_epoch, launcher=launcher)
    assert (home / "runs" / job_id / "last").is_dir()
    trainer = _trainer(launcher)
    launcher.stop(trainer, signal.SIGKILL)  # no goodbye: the job stays "running", its lock lapses
    killed_at = http.get(f"/training/jobs/{job_id}").json()
    assert killed_at["status"] == "running", killed_at

    launcher.start_training_worker(name=f"trainer-{uuid.uuid4().hex[:6]}")
    job = _wait(http, job_id, lambda j: j["status"] in DONE, timeout=300, launcher=launcher)
    assert job["status"] == "done", job
    assert job["attempts"] == 2 and job["requeued"] == 1 and job["resumed"] is True
    per_epoch = job["progress"]["total_steps"] // 8
    assert job["result"]["resumed_from_step"] >= per_epoch  # from the checkpoint, not from zero
    assert job["result"]["resumed_from_step"] <= killed_at["progress"]["step"]
    assert job["progress"]["step"] == job["progress"]["total_steps"]
    assert [row["version"] for row in _versions_of(home / "store", job_id)] == ["1"]  # published once
    lines = http.get(f"/training/jobs/{job_id}/log", params={"tail": 500}).json()["lines"]
    text = "\n".join(lines)
    assert "queued again" in text and "resuming from its last checkpoint" in text and "stored as" in text
    assert (home / "runs" / job_id / "job.log").read_text().count("attempt ") >= 2


def test_stopped_worker_hands_its_job_back_and_it_resumes_where_it_stopped(lifecycle_stack) -> None:
    """SIGTERM (docker compose stop / restart): the job saves its state at the next step and is resumed
    from exactly there by the next worker, without counting as a lost attempt."""
    http, home, chest, launcher = lifecycle_stack
    spec = _pretrain_spec(chest, epochs=8)
    spec["name"] = "handed-back-fm"
    job_id = http.post("/training/jobs", json=spec).json()["job_id"]
    _wait(http, job_id, lambda j: (j.get("progress") or {}).get("step", 0) >= 2, launcher=launcher)
    trainer = _trainer(launcher)
    launcher.stop(trainer, signal.SIGTERM, timeout=60)  # Celery's warm shutdown
    stopped = http.get(f"/training/jobs/{job_id}").json()
    assert stopped["handed_back"] == 1 and stopped["status"] in ("running", "queued"), stopped
    assert stopped["progress"]["step"] < stopped["progress"]["total_steps"]

    launcher.start_training_worker(name=f"trainer-{uuid.uuid4().hex[:6]}")
    job = _wait(http, job_id, lambda j: j["status"] in DONE, timeout=300, launcher=launcher)
    assert job["status"] == "done", job
    assert job["attempts"] == 2 and job["handed_back"] == 1
    assert job["result"]["resumed_from_step"] == stopped["progress"]["step"]  # nothing lost, nothing redone
    assert [row["version"] for row in _versions_of(home / "store", job_id)] == ["1"]
    text = "\n".join(http.get(f"/training/jobs/{job_id}/log", params={"tail": 500}).json()["lines"])
    assert "the worker is shutting down" in text and "queued again" in text


def test_redelivered_message_of_a_finished_job_is_dropped(lifecycle_stack) -> None:
    """Celery's late redelivery (visibility timeout) of a job that already finished runs nothing."""
    http, home, chest, launcher = lifecycle_stack
    spec = _pretrain_spec(chest, epochs=1)
    spec["name"] = "redelivered-fm"
    job_id = http.post("/training/jobs", json=spec).json()["job_id"]
    job = _wait(http, job_id, lambda j: j["status"] in DONE, launcher=launcher)
    assert job["status"] == "done", job

    from xrayfm_stack.celery import send_training_job, training_celery
    from xrayfm_stack.settings import TrainingSettings

    settings = TrainingSettings.from_env(launcher.env)
    send_training_job(training_celery(settings), settings, job_id)  # the same message again
    marker = f"job {job_id}: already done; redelivered message dropped"
    stack_lib.wait_until(
        lambda: marker in _trainer(launcher).log.read_text(), 60, "the drop", _trainer(launcher)
    )
    assert http.get(f"/training/jobs/{job_id}").json()["attempts"] == 1
    assert len(_versions_of(home / "store", job_id)) == 1


def test_lora_on_real_mura_is_evaluated_promoted_served_and_shown(
    lifecycle_stack, shared_data: Path, monkeypatch
) -> None:
    """The issue's "done when": a LoRA job on the real MURA subset, submitted through the gateway,
    finishes, is promoted and serves; its metrics are visible through the API and the UI."""
    http, home, chest, launcher = lifecycle_stack
    mura = shared_data / "mura-humerus-64" / "MURA-v1.1"
    if not mura.is_dir():
        pytest.skip(f"no MURA subset at {mura}")
    spec = _pretrain_spec(chest, epochs=1)
    spec["name"] = "mura-test-fm"
    fm = _wait(http, http.post("/training/jobs", json=spec).json()["job_id"], lambda j: j["status"] in DONE,
               launcher=launcher)  # fmt: skip
    assert fm["status"] == "done", fm
    foundation = f"store:{fm['model']['name']}/{fm['model']['version']}"

    lora_spec = {"kind": "adapt", "name": "mura-lora", "config": {
        "kind": "mura", "root": str(mura), "foundation": foundation, "method": "lora", "epochs": 1,
        "report_on": "last", "n_bootstrap": 20, **QUIET, "batch_size": 32}}  # fmt: skip
    answer = http.post("/training/jobs", json=lora_spec)
    assert answer.status_code == 202, answer.text
    lora = _wait(http, answer.json()["job_id"], lambda j: j["status"] in DONE, timeout=300, launcher=launcher)
    assert lora["status"] == "done", lora
    name, version = lora["model"]["name"], lora["model"]["version"]
    lora_auroc = lora["result"]["best_metric"]
    assert 0.0 <= lora_auroc <= 1.0

    # evaluate the stored adapter on MURA's official valid split; the result lands with the version
    evaluation = {"kind": "evaluate", "config": {"model": f"store:{name}/{version}", "kind": "mura",
                  "root": str(mura), "split": "valid", "n_bootstrap": 20, "device": "cpu",
                  "progress_bar": False}}  # fmt: skip
    ev = _wait(http, http.post("/training/jobs", json=evaluation).json()["job_id"],
               lambda j: j["status"] in DONE, timeout=300, launcher=launcher)  # fmt: skip
    assert ev["status"] == "done", ev
    assert ev["name"] == name and ev["model"] == {"name": name, "version": version}
    assert 0.0 <= ev["result"]["value"] <= 1.0 and ev["result"]["metric"]

    rows = {(m["name"], m["version"]): m for m in http.get("/models").json()["models"]}
    row = rows[(name, version)]
    assert row["format"] == "xrayfm.adapted" and not row["synthetic"]  # real MURA pixels
    assert row["lineage"]["foundation"]["name"] == "mura-test-fm"
    assert row["metrics"] and row["evaluations"][-1]["value"] == ev["result"]["value"]
    assert row["evaluations"][-1]["split"] == "valid" and row["evaluations"][-1]["synthetic"] is False

    assert http.post(f"/models/{name}/{version}/promote").status_code == 200
    image = sorted(mura.glob("valid/XR_HUMERUS/*/*/image1.jpg"))[0]

    def served() -> bool:
        answer = http.post(
            "/predict", params={"explain": "false"}, files={"file": (image.name, image.read_bytes())}
        )
        return answer.status_code == 200 and answer.json()["model"]["name"] == name

    stack_lib.wait_until(served, 120, f"/predict served by {name}/{version}")
    body = http.post("/predict", files={"file": (image.name, image.read_bytes())}).json()
    assert body["model"]["version"] == version and 0.0 <= body["probability"] <= 1.0
    assert body["attention_map"]

    # the UI's training page shows the job's headline metric and the version's evaluation
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[2] / "services/frontend/xrayfm_frontend/app.py"
    monkeypatch.setenv("XRAYFM_GATEWAY_URL", str(http.base_url).rstrip("/"))
    monkeypatch.delenv("XRAYFM_FRONTEND_ADMIN_KEY", raising=False)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # AppTest replaces it
    at = AppTest.from_file(str(app), default_timeout=60).run()
    at.sidebar.radio[0].set_value("Training & models").run()
    assert not at.error, [e.value for e in at.error]
    shown = "\n".join(frame.value.to_csv() for frame in at.dataframe)
    assert f"{name}/{version}" in shown
    assert f"{ev['result']['metric']}={ev['result']['value']:.4f}" in shown, shown  # the evaluation
    assert f"{lora['result']['metric']}={lora_auroc:.4f}" in shown, shown  # the LoRA job's headline
