"""Nothing lost when the training side's Redis restarts: its job records, log index and queue live in a
Redis that keeps an append-only file (the inference Redis keeps nothing). Real processes: two redis-servers,
a Celery training worker and the gateway."""

from __future__ import annotations

import signal
import uuid

import httpx
import pytest

from tests.helpers import starts_processes
from tests.services.svc_helpers import require_redis_server
from tests.services.test_training import _pretrain_spec, _wait
from xrayfm_local import launcher as stack_lib
from xrayfm_stack import store as model_store

pytestmark = pytest.mark.slow
DONE = ("done", "failed", "cancelled")


@pytest.fixture()
@starts_processes
def durable_stack(tmp_path):
    require_redis_server()
    from xrayfm.data.synth import synth_chest

    chest = tmp_path / "CheXpert-synth"
    synth_chest(chest, n=48, seed=1, size=32, progress=False)
    inference_port, training_port, gateway_port = (stack_lib.free_port() for _ in range(3))
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{inference_port}/0",
        "XRAYFM_TRAINING_REDIS_URL": f"redis://127.0.0.1:{training_port}/0",
        "XRAYFM_QUEUE": f"xrayfm-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_TRAINING_QUEUE": f"xrayfm-training-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_MODEL_STORE": str(tmp_path / "store"),
        "XRAYFM_TRAINING_RUNS": str(tmp_path / "runs"),
        "XRAYFM_TRAINING_LOCK_TTL": "10",
        "XRAYFM_BOOTSTRAP": "off",
        "XRAYFM_TORCH_THREADS": "1",
        "XRAYFM_INSECURE_NO_AUTH": "1",
        "XRAYFM_DATA_DIRS": str(tmp_path),
    }
    launcher = stack_lib.Stack(tmp_path / "stack", env=env)
    aof = tmp_path / "training-redis"
    try:
        launcher.start_redis(inference_port)
        redis_proc = launcher.start_redis(training_port, data_dir=aof)
        launcher.start_training_worker()
        launcher.start_gateway(gateway_port)
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=30) as http:
            yield http, chest, launcher, redis_proc, training_port, aof, tmp_path / "store"
    finally:
        launcher.stop_all()


def test_training_redis_restart_loses_no_job(durable_stack) -> None:
    http, chest, launcher, redis_proc, port, aof, store = durable_stack
    earlier = http.post("/training/jobs", json={**_pretrain_spec(chest), "name": "earlier"}).json()["job_id"]
    assert _wait(http, earlier, lambda j: j["status"] in DONE, launcher=launcher)["status"] == "done"
    spec = _pretrain_spec(chest, epochs=6, save_every=2)
    spec["name"] = "long"
    long_job = http.post("/training/jobs", json=spec).json()["job_id"]
    _wait(http, long_job, lambda j: (j.get("progress") or {}).get("step", 0) >= 3, launcher=launcher)

    launcher.stop(redis_proc, signal.SIGTERM)  # `docker restart redis-training`: stop, then start again
    launcher.procs.remove(redis_proc)
    launcher.start_redis(port, data_dir=aof)

    listed = [j["job_id"] for j in http.get("/training/jobs").json()["jobs"]]
    assert earlier in listed and long_job in listed  # the records came back from the append-only file
    job = _wait(http, long_job, lambda j: j["status"] in DONE, launcher=launcher)
    assert job["status"] == "done", job
    versions = [v for v in model_store.list_versions(store) if v["name"] == "long"]
    assert [v["job_id"] for v in versions] == [long_job]  # published exactly once
    assert {earlier, long_job} <= {j["job_id"] for j in http.get("/training/jobs").json()["jobs"]}
    assert http.get(f"/training/jobs/{earlier}").json()["status"] == "done"
