"""The UI's "Training & models" page with Streamlit's AppTest against a real gateway and a real Redis (no
training worker: submitted jobs stay queued; the tests play the worker by writing the jobs' records, logs
and the store's evaluations)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.helpers import starts_processes
from tests.services.svc_helpers import require_redis_server
from xrayfm_local import launcher as stack_lib

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[2] / "services/frontend/xrayfm_frontend/app.py"
ADMIN_KEY = "admin-key-for-the-ui"


@pytest.fixture(scope="module")
@starts_processes
def admin_stack(tmp_path_factory: pytest.TempPathFactory):
    """Redis + the gateway (admin auth on) over a model store holding two versions; yields (url, store, env)."""
    require_redis_server()
    from xrayfm_stack import store as model_store

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
        "XRAYFM_DATA_DIRS": str(home),
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
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # see test_frontend.py
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

    from xrayfm_stack import store as model_store

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
    from xrayfm_stack.jobs import JobRecords

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


def _records(env: dict[str, str]):
    from xrayfm_stack.jobs import JobRecords

    return JobRecords(env["XRAYFM_REDIS_URL"], env["XRAYFM_TRAINING_QUEUE"])


def _show_job(at: AppTest, job_id: str) -> AppTest:
    [s for s in at.selectbox if s.label == "Job details"][0].set_value(job_id).run()
    assert not at.exception, at.exception
    return at


def test_refresh_interval_follows_the_jobs_and_the_setting(monkeypatch):
    from xrayfm_frontend.training_page import refresh_every
    from xrayfm_stack.protocol import JobRecord
    from xrayfm_stack.settings import FrontendSettings

    def job(status: str) -> JobRecord:
        return JobRecord(job_id=f"job-{status}", status=status)

    finished = [job("done"), job("failed"), job("cancelled")]
    assert refresh_every(finished, 3.0) is None and refresh_every([], 3.0) is None
    for status in ("queued", "running", "cancelling"):
        assert refresh_every([*finished, job(status)], 3.0) == 3.0
        assert refresh_every([job(status)], 0.0) is None
    monkeypatch.delenv("XRAYFM_FRONTEND_REFRESH_S", raising=False)
    assert FrontendSettings.from_env().refresh_s == 3.0
    monkeypatch.setenv("XRAYFM_FRONTEND_REFRESH_S", "0")
    assert FrontendSettings.from_env().refresh_s == 0.0


def test_example_specs_are_valid_and_fill_the_spec_box(monkeypatch, admin_stack):
    from xrayfm_frontend.training_page import EXAMPLES
    from xrayfm_stack.spec import validate_spec

    assert {spec["kind"] for spec in EXAMPLES.values()} == {"pretrain", "adapt", "evaluate", "calibrate"}
    for spec in EXAMPLES.values():
        validate_spec(spec)  # raises on a bad example (no store given: store: references are not looked up)
        roots = [spec["config"]["root"]] if "root" in spec["config"] else spec["config"]["data"]
        assert all(str(r).split(":", 1)[-1].startswith("/data/") for r in roots)
    at = training_page(monkeypatch, admin_stack[0])
    assert json.loads(at.text_area[0].value) == next(iter(EXAMPLES.values()))
    for title, spec in EXAMPLES.items():
        [s for s in at.selectbox if s.label == "Start from an example"][0].set_value(title).run()
        assert json.loads(at.text_area[0].value) == spec


def test_job_details_show_metrics_log_and_error(monkeypatch, admin_stack):
    url, _, env = admin_stack
    records = _records(env)
    done = records.create({"kind": "pretrain", "name": "ui-done", "config": {}})
    metrics = {"mean_auroc": 0.8123, "val_loss": 0.41, "auroc/Cardiomegaly": 0.85, "auroc/Edema": None}
    records.update(done, status="done", attempts=2, resumed=True, requeued=1, model={"name": "m", "version": "2"},
                   result={"status": "done", "best_metric": 0.8123, "metric": "mean_auroc", "metrics": metrics})  # fmt: skip
    for i in range(250):
        records.append_log(done, f"line {i}")
    failed = records.create({"kind": "adapt", "name": "ui-failed", "config": {}})
    records.update(failed, status="failed", attempts=1, error="RuntimeError: CUDA out of memory")
    running = records.create({"kind": "pretrain", "name": "ui-running", "config": {}})
    records.update(
        running, status="running", progress={"step": 1, "total_steps": 4, "metrics": {"mean_auroc": 0.61}}
    )

    at = training_page(monkeypatch, url)
    jobs = {r["job"]: r for r in at.dataframe[0].value.to_dict("records")}
    assert jobs[done]["metric"] == "mean_auroc=0.8123" and jobs[done]["attempts"] == 2
    assert jobs[failed]["metric"] == "" and jobs[failed]["attempts"] == 1

    _show_job(at, done)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Best mean_auroc"] == "0.8123" and shown["Attempts"] == "2"
    assert shown["Resumed from a checkpoint"] == "yes" and shown["Re-queued (worker lost)"] == "1"
    table = [
        d.value.to_dict("records")
        for d in at.dataframe
        if "metric" in d.value.columns and "value" in d.value.columns
    ]
    assert len(table) == 1
    values = {r["metric"]: r["value"] for r in table[0]}
    assert values["auroc/Cardiomegaly"] == 0.85 and values["val_loss"] == 0.41 and "auroc/Edema" in values
    assert at.code[0].value.splitlines() == [f"line {i}" for i in range(50, 250)]  # the last 200 of 250
    assert any("Published model: m/2" in c for c in _texts(at.caption))
    assert not at.error, _texts(at.error)

    _show_job(at, failed)
    assert any("Job failed: RuntimeError: CUDA out of memory" in e for e in _texts(at.error)), _texts(
        at.error
    )
    assert "Best mean_auroc" not in {m.label for m in at.metric} and not at.code

    _show_job(at, running)
    table = [d.value.to_dict("records") for d in at.dataframe if "value" in d.value.columns]
    assert table == [[{"metric": "mean_auroc", "value": 0.61}]]
    assert any("Last validation metrics" in c for c in _texts(at.caption))
    records.update(running, status="cancelled")


def test_evaluation_shows_in_the_models_table_and_the_job(monkeypatch, admin_stack):
    import httpx

    from xrayfm_stack import store as model_store

    url, store, env = admin_stack
    rows = httpx.get(f"{url}/models", headers={"X-API-Key": ADMIN_KEY}).json()["models"]
    if not hasattr(model_store, "add_evaluation") or "evaluations" not in rows[0]:
        pytest.skip("the model store does not record evaluations yet")
    records = _records(env)
    job = records.create({"kind": "evaluate", "name": "m", "config": {}})
    records.update(job, status="done", attempts=1, model={"name": "m", "version": "2"},
                   result={"metric": "study_auroc", "value": 0.8123, "report": {"mean_auroc": 0.8123}})  # fmt: skip
    older = {"dataset": "mura", "split": "train", "metric": "study_auroc", "value": 0.5, "synthetic": False}
    model_store.add_evaluation(store, "m", "2", "job-older-eval", {**older, "created": 1.0})
    model_store.add_evaluation(store, "m", "2", job, {**older, "split": "valid", "value": 0.8123,
                                                      "synthetic": True, "created": 2.0})  # fmt: skip

    at = training_page(monkeypatch, url)
    models = {r["model"]: r for r in at.dataframe[-1].value.to_dict("records")}
    assert models["m/2"]["evaluation"] == "study_auroc=0.8123 on mura/valid (SYNTHETIC)"
    assert models["m/1"]["evaluation"] == ""
    jobs = {r["job"]: r for r in at.dataframe[0].value.to_dict("records")}
    assert jobs[job]["metric"] == "study_auroc=0.8123" and jobs[job]["synthetic"] == "SYNTHETIC"
    _show_job(at, job)
    assert {m.label: m.value for m in at.metric}["study_auroc"] == "0.8123"
    assert any("SYNTHETIC" in w for w in _texts(at.warning)), _texts(at.warning)
    assert any("Evaluated model: m/2" in c for c in _texts(at.caption))


def test_auto_refresh_only_while_a_job_is_active(monkeypatch, admin_stack):
    """AppTest runs no timers: the test records the run_every the jobs fragment is registered with."""
    import streamlit

    url, _, env = admin_stack
    records = _records(env)
    for job in records.list():  # the other tests' jobs: none active
        if job["status"] in ("queued", "running", "cancelling"):
            records.update(job["job_id"], status="cancelled")
    timers: list[float | None] = []
    real = streamlit.fragment

    def spy(func=None, *, run_every=None):
        timers.append(run_every)
        return real(func, run_every=run_every)

    monkeypatch.setattr(streamlit, "fragment", spy)
    monkeypatch.setenv("XRAYFM_FRONTEND_REFRESH_S", "7")
    at = training_page(monkeypatch, url)
    assert timers and set(timers) == {None}

    job = records.create({"kind": "pretrain", "name": "ui-timer", "config": {}})
    timers.clear()
    at.run()
    assert timers[-1] == 7.0, timers
    assert any("Refreshing every 7 s" in c for c in _texts(at.caption))

    records.update(job, status="done")  # nothing active: the timer goes
    timers.clear()
    at.run()
    assert timers[-1] is None, timers
    assert not any("Refreshing every" in c for c in _texts(at.caption))

    monkeypatch.setenv("XRAYFM_FRONTEND_REFRESH_S", "0")  # 0: never, even with a job running
    records.update(job, status="running")
    timers.clear()
    at.run()
    assert timers and set(timers) == {None}, timers
    records.update(job, status="cancelled")


def test_operating_point_from_an_evaluation_or_typed_then_cleared(monkeypatch, admin_stack):
    from xrayfm_stack import store as model_store

    url, store, _ = admin_stack
    candidates = {
        "Abnormal": {"image": [{"rule": "youden", "threshold": 0.42, "sensitivity": 0.8, "specificity": 0.7}]}
    }
    model_store.add_evaluation(store, "m", "1", "job-eval-op", {"dataset": "mura", "split": "valid",
                                                               "operating_points": candidates, "created": 3.0})  # fmt: skip
    at = training_page(monkeypatch, url)
    at.selectbox(key="op_version").set_value("m/1").run()
    [option] = at.selectbox(key="op_candidate").options
    assert option.startswith("youden (image, Abnormal): threshold 0.420, sensitivity 0.8")
    next(b for b in at.button if b.label == "Use this point").click().run()
    assert not at.error, _texts(at.error)
    point = json.loads((store / "models/m/1/operating_point.json").read_text())
    assert point["threshold"] == 0.42 and point["source"].startswith(
        "youden at image level on evaluation job-eval-op"
    )
    models = {r["model"]: r for r in at.dataframe[-1].value.to_dict("records")}
    assert models["m/1"]["threshold"].startswith("0.420 (youden")

    at.number_input(key="op_threshold").set_value(0.3).run()
    at.text_input(key="op_source").set_value("agreed with the clinic").run()
    next(b for b in at.button if b.label == "Set this threshold").click().run()
    assert (
        json.loads((store / "models/m/1/operating_point.json").read_text())["source"]
        == "agreed with the clinic"
    )
    at.text_input(key="op_source").set_value("").run()
    next(b for b in at.button if b.label == "Set this threshold").click().run()  # no source: refused, shown
    assert any("Cannot set the operating point" in e for e in _texts(at.error)), _texts(at.error)
    next(b for b in at.button if b.label == "Back to 0.5 (not calibrated)").click().run()
    assert not (store / "models/m/1/operating_point.json").exists()
