"""The UI's "Training & models" page with Streamlit's AppTest against a real gateway and a real Redis (no
training worker: submitted jobs stay queued; the test plays the worker by writing the job's progress)."""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import stack as stack_lib
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[2] / "services/frontend/xrayfm_frontend/app.py"
ADMIN_KEY = "admin-key-for-the-ui"


@pytest.fixture(scope="module")
def admin_stack(tmp_path_factory: pytest.TempPathFactory):
    """Redis + the gateway (admin auth on) over a model store holding two versions; yields (url, store, env)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    from xrayfm_inference import store as model_store

    home = tmp_path_factory.mktemp("ui-training")
    store = home / "store"
    for tag, meta in (("fm", {"synthetic": True, "metrics": {"auroc": 0.71}}),
                      ("lora", {"foundation": {"name": "m", "version": "1"}, "metrics": {"auroc": 0.83}})):  # fmt: skip
        src = home / tag
        src.mkdir()
        (src / "meta.json").write_text(json.dumps({"format": "xrayfm.checkpoint", **meta}))
        model_store.add_version(store, "m", src, {"job_id": f"job-{tag}"})
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"xrayfm-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_TRAINING_QUEUE": f"xrayfm-training-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_MODEL_STORE": str(store),
        "XRAYFM_ADMIN_KEYS": ADMIN_KEY,
    }
    launcher = stack_lib.Stack(home, env=env)
    try:
        launcher.start_redis(redis_port)
        launcher.start_gateway(gateway_port)
        yield f"http://127.0.0.1:{gateway_port}", store, env
    finally:
        launcher.stop_all()


def training_page(monkeypatch, url: str, admin_key: str | None = ADMIN_KEY) -> AppTest:
    monkeypatch.setenv("XRAYFM_GATEWAY_URL", url)
    if admin_key is None:
        monkeypatch.delenv("XRAYFM_FRONTEND_ADMIN_KEY", raising=False)
    else:
        monkeypatch.setenv("XRAYFM_FRONTEND_ADMIN_KEY", admin_key)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # see test_services_frontend.py
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.sidebar.radio[0].set_value("Training & models").run()
    return at


def _texts(elements) -> list[str]:
    return [e.value for e in elements]


def _progress_bars(at: AppTest) -> list:
    return [e for e in at.get("progress")]


def test_lists_models_with_lineage_and_promotes_then_rolls_back(monkeypatch, admin_stack):
    url, store, _ = admin_stack
    at = training_page(monkeypatch, url)
    assert not at.error, _texts(at.error)
    models = at.dataframe[-1].value
    rows = {r["model"]: r for r in models.to_dict("records")}
    assert set(rows) == {"m/1", "m/2"}
    assert rows["m/1"]["synthetic"] == "SYNTHETIC" and rows["m/2"]["synthetic"] == ""
    assert json.loads(rows["m/2"]["metrics"]) == {"auroc": 0.83}
    assert rows["m/2"]["foundation"] == "m/1"
    assert "nothing promoted" in " ".join(_texts(at.caption))

    from xrayfm_inference import store as model_store

    for version in ("1", "2"):
        select = [s for s in at.selectbox if s.label == "Version to promote"][0]
        select.set_value(f"m/{version}").run()
        [b for b in at.button if b.label == "Promote"][0].click().run()
        assert any(f"Now serving m/{version}" in s for s in _texts(at.success)), _texts(at.error)
        assert model_store.serving(store) == {"name": "m", "version": version}
    [b for b in at.button if b.label == "Roll back"][0].click().run()
    assert any("now serving m/1" in s for s in _texts(at.success)), _texts(at.error)
    assert model_store.serving(store) == {"name": "m", "version": "1"}
    [b for b in at.button if b.label == "Roll back"][0].click().run()  # nothing left: the gateway's 409
    assert any("HTTP 409" in e for e in _texts(at.error)), _texts(at.error)


def test_malformed_spec_shows_the_gateway_422(monkeypatch, admin_stack):
    at = training_page(monkeypatch, admin_stack[0])
    at.text_area[0].input('{"kind": "pretrain", "config": {"epochs": 3}}')
    at.button[0].click().run()  # the form's submit button
    errors = _texts(at.error)
    assert any("Job refused" in e and "HTTP 422" in e for e in errors), errors
    at.text_area[0].input("not json")
    at.button[0].click().run()
    assert any("not JSON" in e for e in _texts(at.error)), _texts(at.error)


def test_submitted_job_shows_progress_and_cancels(monkeypatch, admin_stack):
    from xrayfm_training.jobs import JobRecords

    url, store, env = admin_stack
    at = training_page(monkeypatch, url)
    spec = {"kind": "pretrain", "name": "ui-job", "config": {"kind": "chexpert", "root": str(store.parent)}}
    at.text_area[0].input(json.dumps(spec))
    at.button[0].click().run()
    queued = [s for s in _texts(at.success) if "queued" in s]
    assert queued, _texts(at.error)
    job_id = queued[0].split()[1]
    assert str(uuid.UUID(job_id)) == job_id

    records = JobRecords(env["XRAYFM_REDIS_URL"], env["XRAYFM_TRAINING_QUEUE"])  # play the worker
    records.update(job_id, status="running", progress={"epoch": 0, "step": 3, "total_steps": 12,
                                                       "loss": 0.5, "eta_s": 60.0})  # fmt: skip
    [b for b in at.button if b.label == "Refresh"][0].click().run()
    bars = [b for b in _progress_bars(at) if job_id[:8] in b.proto.text]
    assert len(bars) == 1 and bars[0].proto.value == 25 and "step 3/12" in bars[0].proto.text
    jobs = {r["job"]: r for r in at.dataframe[0].value.to_dict("records")}
    assert jobs[job_id]["status"] == "running" and jobs[job_id]["step"] == "3/12"

    [s for s in at.selectbox if s.label == "Job to cancel"][0].set_value(job_id).run()
    [b for b in at.button if b.label == "Cancel job"][0].click().run()
    assert any("cancelling" in s for s in _texts(at.success)), _texts(at.error)
    assert records.get(job_id)["status"] == "cancelling"


def test_without_the_admin_key_the_refusal_is_shown(monkeypatch, admin_stack):
    at = training_page(monkeypatch, admin_stack[0], admin_key=None)
    errors = " ".join(_texts(at.error))
    assert "Cannot list the jobs" in errors and "Cannot list the models" in errors and "HTTP 401" in errors
