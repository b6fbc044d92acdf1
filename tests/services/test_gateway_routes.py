"""Every gateway route and status code, in process: FastAPI's TestClient with the queues replaced by fakes
(``app.dependency_overrides``), so no Redis and no worker is needed. The real-process tests
(test_gateway.py, test_training.py, ...) check the same routes against a running stack."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.services.gateway_fakes import MODEL, READY_WORKER, FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import decode_map, phantom, png_bytes
from xrayfm_gateway.queue import JobState, QueueUnavailable
from xrayfm_stack import store as model_store
from xrayfm_stack.protocol import (
    PROTOCOL_VERSION,
    ModelMap,
    RejectionReason,
    WorkerAnswer,
    WorkerRejection,
)


@pytest.fixture()
def fakes() -> tuple[FakeQueue, FakeTraining]:
    return FakeQueue(), FakeTraining()


def _client(fakes: tuple[FakeQueue, FakeTraining], **settings: Any) -> TestClient:
    return gateway_client(*fakes, **settings)


@pytest.fixture()
def http(fakes, tmp_path: Path):
    open_admin = {"insecure_no_auth": True, "data_dirs": (Path("/x"), tmp_path / "data")}
    with _client(fakes, model_store=tmp_path / "store", **open_admin) as client:
        yield client


def _png(height: int = 96, width: int = 80) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("x.png", png_bytes(phantom(height, width)), "image/png")}


def _error(resp, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and body["detail"], body
    return body


# -- health, readiness, metrics, OpenAPI -----------------------------------------------------------------
def test_health_and_ready(http, fakes):
    queue, training = fakes
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert (
        ready.status_code == 200
        and ready.json()["ready"]
        and ready.json()["detail"] == "1 worker(s) answering"
    )
    queue.workers_list = [{**READY_WORKER, "ready": False, "loading": True}]
    body = http.get("/ready")
    assert body.status_code == 503 and "loading the model" in body.json()["detail"]
    training.bootstrap = "bootstrapping: training the demo model on SYNTHETIC data: queued"
    assert http.get("/ready").json()["detail"] == training.bootstrap  # the first start says why
    queue.workers_list = []
    training.bootstrap = None
    assert http.get("/ready").json()["detail"] == "no inference worker is running"
    queue.down = True
    down = http.get("/ready")
    assert down.status_code == 503 and down.json()["broker"] == "unreachable"


def test_workers_of_another_protocol_version_get_no_work_and_ready_says_why(http, fakes):
    """Every worker takes messages from the one queue: while one of another protocol version is live, the
    gateway sends nothing (it would misread the requests) and /ready names the versions."""
    queue, _ = fakes
    queue.workers_list = [
        {**READY_WORKER, "protocol": PROTOCOL_VERSION - 1},
        {**READY_WORKER, "hostname": "w2", "protocol": PROTOCOL_VERSION - 1},
    ]
    body = http.get("/ready")
    assert body.status_code == 503 and not body.json()["ready"]
    assert body.json()["detail"] == (
        f"2 workers speak protocol {PROTOCOL_VERSION - 1}, this gateway speaks {PROTOCOL_VERSION}: "
        "stop or upgrade them (they share the queue)"
    )
    assert _error(http.post("/predict", files=_png()), 503, "not_ready") and not queue.jobs
    unversioned = {key: value for key, value in READY_WORKER.items() if key != "protocol"}
    # one of ours beside it: still no work, as the other takes messages from the same queue
    queue.workers_list = [READY_WORKER, {**unversioned, "hostname": "w3"}]
    detail = http.get("/ready").json()["detail"]
    assert detail.startswith("1 worker speaks no protocol version (an earlier release), this gateway speaks")
    assert _error(http.post("/predict", files=_png()), 503, "not_ready") and not queue.jobs
    queue.workers_list = [READY_WORKER]
    assert http.get("/ready").status_code == 200 and http.post("/predict", files=_png()).status_code == 200


def test_metrics_without_redis_still_answer(http):
    resp = http.get("/metrics")
    assert resp.status_code == 200 and "xrayfm_gateway_requests_total" in resp.text
    assert "xrayfm_training_jobs" not in resp.text  # left out (Redis down), not failed


def test_openapi_is_generated_from_the_typed_models(http):
    schema = http.get("/openapi.json").json()
    names = set(schema["components"]["schemas"])
    assert {"Prediction", "ModelInfo", "Timings", "ImageInfo", "JobRecord", "JobSpec", "ModelList"} <= names
    predict = schema["paths"]["/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Prediction"
    )
    assert {"401", "413", "415", "422", "503", "504"} <= set(predict["responses"])
    body = schema["paths"]["/training/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"kind", "name", "config"}


# -- predictions -----------------------------------------------------------------------------------------
def test_predict_answers_the_typed_prediction(http, fakes):
    queue, _ = fakes
    resp = http.post("/predict", files=_png(600, 300), params={"method": "gradcam"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["prediction"] == "Abnormal" and body["probability"] == 0.75 and body["attention_map"]
    assert body["image"] == {"format": "PNG", "width": 300, "height": 600}
    assert body["explain_method"] == "gradcam" and body["model"]["name"] == "m"
    assert {"decode_ms", "total_ms", "inference_ms", "queue_wait_ms"} <= set(body["timings"])
    assert None not in body["timings"].values()
    (request, _record), *_ = queue.jobs.values()
    assert (request.height, request.width) == (512, 256)  # sent at the transport size, aspect kept
    no_map = http.post("/predict", files=_png(), params={"explain": "false"}).json()
    assert no_map["attention_map"] is None


def test_images_go_raw_to_the_inputs_key_beside_the_message(http, fakes):
    """Each request carries its size and options; its raw pixels go to the job's inputs key (a study's in
    order)."""
    queue, _ = fakes
    body = http.post("/predict", files=_png(600, 300)).json()
    (request, _record) = queue.jobs[body["job_id"]]
    [raw] = queue.inputs[body["job_id"]]
    assert len(raw) == request.height * request.width and body["attention_map"]
    assert "pixels" not in request.model_dump()
    study = http.post(
        "/predict/study", files=[("files", _png(64, 32)["file"]), ("files", _png(32, 64)["file"])]
    )
    assert study.status_code == 200, study.text
    sent, _ = queue.jobs[study.json()["job_id"]]
    assert [len(raw) for raw in queue.inputs[study.json()["job_id"]]] == [r.height * r.width for r in sent]


def test_gateway_draws_the_workers_model_map(http, fakes):
    queue, _ = fakes
    body = http.post("/predict", files=_png(600, 300)).json()
    heat = decode_map(body["attention_map"])
    assert heat.shape == (256, 128) and heat.dtype == np.uint8  # the image's aspect, 256 px at most
    assert heat[:, :40].min() > 200 and heat[:, 90:].max() < 55  # the fake's map: hot on the left
    assert body["timings"]["render_ms"] > 0 and "model_map" not in body
    study = http.post("/predict/study", files=[("files", _png(600, 300)["file"])] * 2).json()
    assert all(decode_map(a["attention_map"]).shape == (256, 128) for a in study["images"])
    assert all("model_map" not in a and a["timings"]["render_ms"] > 0 for a in study["images"])


def test_gateway_keeps_blas_to_one_thread(fakes):
    """Drawing heatmaps uses small matrix products; OpenBLAS's extra threads would spin on the cores after
    each one, burning far more CPU than the products themselves, so the gateway caps BLAS at one thread."""
    from threadpoolctl import threadpool_info, threadpool_limits

    before = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)
    try:
        _client(fakes)
        after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert after and set(after) == {1}
    finally:
        threadpool_limits(limits=before, user_api="blas")  # the rest of the session keeps its setting


@pytest.mark.parametrize(
    "bad",
    [
        {"data": "not base64!"},
        {"data": base64.b64encode(b"\0" * 12).decode()},  # 3 floats for a 4 x 4 map
        {"data": base64.b64encode(np.full(16, np.nan, "<f4").tobytes()).decode()},
        {"data": base64.b64encode(np.full(16, 2.0, "<f4").tobytes()).decode()},
        {"mode": "zoom"},
    ],
)
def test_unusable_model_map_is_a_clear_500_and_the_gateway_keeps_serving(http, fakes, bad):
    queue, _ = fakes
    good = ModelMap.from_array(np.zeros((4, 4), np.float32), 64, "pad", (96, 80))
    broken = WorkerAnswer(prediction="Normal", probability=0.1, probabilities={"Abnormal": 0.1},
                          model_map=good.model_copy(update=bad), explain_method="rollout", model=MODEL)  # fmt: skip
    queue.next_state = JobState("done", result=broken)
    body = _error(http.post("/predict", files=_png()), 500, "inference_failed")
    assert "model map" in body["detail"] and "nan" not in body["detail"].lower()
    job_id = http.post("/jobs", files=_png()).json()["job_id"]
    assert http.get(f"/jobs/{job_id}").json()["status"] == "failed"  # polled: failed, with the reason
    queue.next_state = None
    assert http.post("/predict", files=_png()).status_code == 200


@pytest.mark.parametrize(
    ("files", "content", "headers", "status", "code"),
    [
        ({"file": ("x.png", b"", "image/png")}, None, None, 400, "empty_file"),
        (
            {"file": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")},
            None,
            None,
            400,
            "corrupt_image",
        ),
        ({"file": ("x.txt", b"hello, not an image", "text/plain")}, None, None, 415, "unsupported_type"),
        ({"other": ("x.png", b"abc", "image/png")}, None, None, 422, "missing_file"),
        ([("file", ("a.png", b"abc", "image/png"))] * 2, None, None, 422, "several_files"),
        (
            None,
            b"--xx\r\nno headers",
            {"Content-Type": "multipart/form-data; boundary=xx"},
            400,
            "bad_multipart",
        ),
        (None, b"raw bytes", {"Content-Type": "application/octet-stream"}, 415, "not_multipart"),
    ],
)
def test_predict_refuses_bad_uploads(http, files, content, headers, status, code):
    _error(http.post("/predict", files=files, content=content, headers=headers), status, code)


def test_predict_limits(fakes, tmp_path):
    with _client(fakes, max_upload_bytes=1000, model_store=tmp_path) as http:
        _error(http.post("/predict", files=_png(200, 200)), 413, "file_too_large")
    with _client(fakes, max_pixels=100, model_store=tmp_path) as http:
        _error(http.post("/predict", files=_png(20, 20)), 422, "image_too_large")
    with _client(fakes, model_store=tmp_path) as http:
        assert http.post("/predict", files=_png(), params={"method": "lime"}).status_code == 422


def test_predict_needs_the_api_key_when_auth_is_on(fakes, tmp_path):
    with _client(fakes, api_keys=frozenset({"k1"}), model_store=tmp_path) as http:
        _error(http.post("/predict", files=_png()), 401, "unauthorized")
        _error(http.post("/predict", files=_png(), headers={"X-API-Key": "k2"}), 401, "unauthorized")
        assert http.post("/predict", files=_png(), headers={"X-API-Key": "k1"}).status_code == 200


def test_predict_when_the_stack_cannot_answer(http, fakes):
    queue, _ = fakes
    queue.workers_list = []
    resp = http.post("/predict", files=_png())
    assert _error(resp, 503, "not_ready") and resp.headers["Retry-After"] == "5"
    _error(http.post("/predict", files={"file": ("x.png", b"", "image/png")}), 400, "empty_file")  # 4xx first
    queue.workers_list = [READY_WORKER]
    queue.next_state = JobState("queued")
    _error(http.post("/predict", files=_png()), 504, "timeout")
    queue.next_state = JobState("failed", "InferenceTimeout: did not finish", error_type="InferenceTimeout")
    _error(http.post("/predict", files=_png()), 504, "timeout")
    queue.next_state = JobState("failed", error="JobLost: image not in Redis", error_type="JobLost")
    resp = http.post("/predict", files=_png())
    assert _error(resp, 503, "queue_unavailable") and resp.headers["Retry-After"] == "5"
    queue.next_state = JobState("failed", error="RuntimeError: boom", error_type="RuntimeError")
    _error(http.post("/predict", files=_png()), 500, "inference_failed")
    queue.next_state = JobState(
        "done", result=WorkerRejection(error=RejectionReason(message="rollout needs a ViT"))
    )
    assert "rollout needs a ViT" in _error(http.post("/predict", files=_png()), 422, "bad_request")["detail"]
    queue.next_state = None

    async def refuse(*_args, **_kwargs):
        raise QueueUnavailable("cannot queue the request: connection refused")

    queue.submit = refuse
    _error(http.post("/predict", files=_png()), 503, "queue_unavailable")


def test_async_jobs(http, fakes):
    queue, _ = fakes
    submitted = http.post("/jobs", files=_png())
    assert submitted.status_code == 202
    job_id = submitted.json()["job_id"]
    assert submitted.headers["Location"] == f"/jobs/{job_id}" == submitted.json()["status_url"]
    done = http.get(f"/jobs/{job_id}").json()
    assert done["status"] == "done" and done["result"]["job_id"] == job_id
    queue.next_state = JobState("running")
    assert http.get(f"/jobs/{job_id}").json() == {"job_id": job_id, "status": "running", "result": None,
                                                   "error": None, "domain": None}  # fmt: skip
    queue.next_state = JobState("failed", error="RuntimeError: boom")
    failed = http.get(f"/jobs/{job_id}").json()
    assert failed["status"] == "failed" and "boom" in failed["error"]
    _error(http.get("/jobs/not-a-uuid"), 404, "unknown_job")
    _error(http.get(f"/jobs/{uuid.uuid4()}"), 404, "unknown_job")
    queue.down = True
    _error(http.get(f"/jobs/{job_id}"), 503, "queue_unavailable")


# -- training jobs ---------------------------------------------------------------------------------------
SPEC = {"kind": "pretrain", "name": "fm", "config": {"kind": "chexpert", "root": "/x"}}


def test_training_jobs_lifecycle(http, fakes):
    _, training = fakes
    resp = http.post("/training/jobs", json=SPEC)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    stored = training.jobs[job_id]["spec"]
    assert stored["config"]["epochs"] == 10  # normalised: every field of PretrainConfig
    jobs = http.get("/training/jobs").json()["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id] and jobs[0]["spec"] is None
    one = http.get(f"/training/jobs/{job_id}").json()
    assert one["status"] == "queued" and one["spec"]["kind"] == "pretrain"
    assert http.get(f"/training/jobs/{job_id}/log", params={"tail": 5}).json()["lines"] == ["queued"]
    assert http.post(f"/training/jobs/{job_id}/cancel").json() == {"job_id": job_id, "status": "cancelled"}
    _error(http.post(f"/training/jobs/{job_id}/cancel"), 409, "job_finished")
    for path in ("", "/log"):
        _error(http.get(f"/training/jobs/{uuid.uuid4()}{path}"), 404, "unknown_job")
        _error(http.get(f"/training/jobs/nope{path}"), 404, "unknown_job")
    _error(http.post(f"/training/jobs/{uuid.uuid4()}/cancel"), 404, "unknown_job")
    assert http.get(f"/training/jobs/{job_id}/log", params={"tail": 0}).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        json.dumps([]).encode(),
        json.dumps({"kind": "finetune", "config": {}}).encode(),
        json.dumps({**SPEC, "config": {**SPEC["config"], "out": "/etc"}}).encode(),
        json.dumps(
            {"kind": "adapt", "config": {"kind": "mura", "root": "/x", "foundation": "store:nope/1"}}
        ).encode(),
    ],
)
def test_training_job_specs_are_checked(http, fakes, body):
    _error(
        http.post("/training/jobs", content=body, headers={"Content-Type": "application/json"}),
        422,
        "invalid_spec",
    )
    assert not fakes[1].jobs


def test_training_routes_without_redis(http, fakes):
    fakes[1].down = True
    _error(http.post("/training/jobs", json=SPEC), 503, "queue_unavailable")
    _error(http.get("/training/jobs"), 503, "queue_unavailable")
    _error(http.get(f"/training/jobs/{uuid.uuid4()}"), 503, "queue_unavailable")


ADMIN_ROUTES = (("GET", "/training/jobs"), ("POST", "/training/jobs"), ("GET", "/models"),
                ("DELETE", f"/training/jobs/{uuid.UUID(int=0)}"),
                ("POST", "/models/rollback"), ("POST", "/models/m/1/promote"),
                ("PUT", "/models/m/1/operating-point"), ("DELETE", "/models/m/1/operating-point"))  # fmt: skip


def test_admin_routes_are_closed_by_default(fakes, tmp_path):
    with _client(fakes, model_store=tmp_path) as http:
        for method, path in ADMIN_ROUTES:
            body = _error(http.request(method, path, json=SPEC), 403, "admin_closed")
            assert "XRAYFM_ADMIN_KEYS" in body["detail"], body
        assert http.post("/predict", files=_png()).status_code == 200  # predictions stay open (keys optional)
    with _client(fakes, model_store=tmp_path, insecure_no_auth=True, admin_keys=frozenset({"a"})) as http:
        _error(http.get("/models"), 401, "unauthorized")  # a configured key is always required


def test_keys_are_compared_in_constant_time():
    """Every key goes through secrets.compare_digest, with no early exit."""
    import inspect

    from xrayfm_gateway.deps import key_matches

    source = inspect.getsource(key_matches)
    assert "compare_digest" in source and "for key in keys" in source and "any(" in source
    assert key_matches("b", frozenset({"a", "b"})) and not key_matches("c", frozenset({"a", "b"}))
    assert not key_matches(None, frozenset({"a"})) and not key_matches("", frozenset())


def test_admin_routes_need_an_admin_key(fakes, tmp_path):
    with _client(fakes, api_keys=frozenset({"p"}), admin_keys=frozenset({"a"}), model_store=tmp_path) as http:
        for method, path in ADMIN_ROUTES:
            _error(http.request(method, path), 401, "unauthorized")
            _error(http.request(method, path, headers={"X-API-Key": "p"}), 401, "unauthorized")
        assert http.get("/models", headers={"X-API-Key": "a"}).status_code == 200


# -- models ----------------------------------------------------------------------------------------------
def test_models_list_promote_rollback(http, tmp_path):
    from tests.helpers import make_tiny_checkpoint

    store = tmp_path / "store"
    assert http.get("/models").json() == {"serving": None, "models": []}
    _error(http.post("/models/rollback"), 409, "nothing_to_roll_back")
    source = make_tiny_checkpoint(tmp_path / "ckpt", ["Abnormal"], size=32)
    for _ in range(2):
        model_store.add_version(store, "m", source, {"job_id": str(uuid.uuid4())})
    assert http.post("/models/m/1/promote").json() == {"serving": {"name": "m", "version": "1"}}
    assert http.post("/models/m/2/promote").json() == {"serving": {"name": "m", "version": "2"}}
    listed = http.get("/models").json()
    assert listed["serving"] == {"name": "m", "version": "2"} and [
        m["version"] for m in listed["models"]
    ] == ["1", "2"]
    assert [m["serving"] for m in listed["models"]] == [False, True]
    assert http.post("/models/rollback").json() == {"serving": {"name": "m", "version": "1"}}
    _error(http.post("/models/m/9/promote"), 404, "unknown_model")
    _error(http.post("/models/m/..bad/promote"), 422, "invalid_name")
    (store / "serving.json").write_text("{broken")
    body = _error(http.get("/models"), 500, "store_unreadable")
    assert "{broken" not in body["detail"]  # names the file and the fault, never its contents


# -- job specs are confined to the data folders ----------------------------------------------------------
def test_specs_outside_the_data_folders_are_refused_at_submission(fakes, tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "ok").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.csv").write_text("path,Label\nSECRET-LINE-42,1\n")
    (data / "escape").symlink_to(outside)  # a symlink out of the data folder
    bad_roots = ["/proc/self/environ", "/etc/passwd", f"{data}/../outside", "../../etc", str(data / "escape"),
                 str(data / "escape" / "secret.csv"), str(outside)]  # fmt: skip
    secrets = [Path("/etc/passwd").read_text().splitlines()[0], "SECRET-LINE-42"]
    with _client(fakes, model_store=tmp_path / "store", insecure_no_auth=True, data_dirs=(data,)) as http:
        for root in bad_roots:
            for kind, config in (
                ("pretrain", {"kind": "csv", "root": root}),
                ("pretrain", {"kind": "chexpert", "root": str(data / "ok"), "cache": root}),
                ("adapt", {"kind": "mura", "root": str(data / "ok"), "foundation": root}),
                ("evaluate", {"model": root, "kind": "mura", "root": str(data / "ok")}),
                ("pretrain", {"kind": "chexpert", "root": str(data / "ok"), "pretrained": root}),
            ):
                resp = http.post("/training/jobs", json={"kind": kind, "config": config})
                body = _error(resp, 422, "invalid_spec")
                assert str(data) in body["detail"], body  # names the allowed folders
                assert not any(secret in resp.text for secret in secrets)
        timm_file = {
            "kind": "chexpert",
            "root": str(data / "ok"),
            "model_kwargs": {"checkpoint_path": "/etc/x"},
        }
        _error(
            http.post("/training/jobs", json={"kind": "pretrain", "config": timm_file}), 422, "invalid_spec"
        )
        ok = {"kind": "pretrain", "config": {"kind": "chexpert", "root": str(data / "ok" / ".." / "ok")}}
        assert http.post("/training/jobs", json=ok).status_code == 202
        adapt = {
            "kind": "mura",
            "root": str(data / "ok"),
            "foundation": str(data / "ok"),
            "model": "vit_small",
        }
        resp = http.post("/training/jobs", json={"kind": "adapt", "config": adapt})
        assert resp.status_code == 202, resp.text  # `model` names a timm model there, not a file
        shipped = {**adapt, "foundation": "xrayfm/no-such-model"}
        body = _error(
            http.post("/training/jobs", json={"kind": "adapt", "config": shipped}), 422, "invalid_spec"
        )
        assert "shipped model" in body["detail"]  # a package name is checked against what is shipped
    assert {j["spec"]["config"]["root"] for j in fakes[1].jobs.values()} == {str((data / "ok").resolve())}


def test_operating_point_set_from_a_threshold_or_an_evaluation_and_cleared(http, tmp_path):
    from tests.helpers import make_tiny_checkpoint

    store = tmp_path / "store"
    model_store.add_version(store, "m", make_tiny_checkpoint(tmp_path / "ckpt", ["Abnormal"], size=32), {})
    url = "/models/m/1/operating-point"
    answer = http.put(url, json={"threshold": 0.31, "source": "chosen by the radiology lead"})
    assert answer.status_code == 200, answer.text
    point = answer.json()["operating_point"]
    assert point["threshold"] == 0.31 and point["source"] == "chosen by the radiology lead"
    assert http.get("/models").json()["models"][0]["operating_point"]["threshold"] == 0.31

    # from a candidate point of an evaluate job of this version (what the training worker records)
    candidates = {"Abnormal": {"image": [{"rule": "youden", "threshold": 0.42, "sensitivity": 0.8, "specificity": 0.7}],
                               "study": [{"rule": "youden", "threshold": 0.47, "sensitivity": 0.85, "specificity": 0.75}]}}  # fmt: skip
    model_store.add_evaluation(
        store, "m", "1", "ev1", {"dataset": "mura", "split": "valid", "operating_points": candidates}
    )
    point = http.put(url, json={"job_id": "ev1", "rule": "youden"}).json()["operating_point"]
    assert (point["threshold"], point["level"], point["label"]) == (0.42, "image", "Abnormal")
    assert (
        point["source"] == "youden at image level on evaluation ev1 (mura valid)"
        and point["sensitivity"] == 0.8
    )
    assert (
        http.put(url, json={"job_id": "ev1", "level": "study"}).json()["operating_point"]["threshold"] == 0.47
    )

    _error(http.put(url, json={"job_id": "ev9"}), 422, "invalid_operating_point")
    body = _error(
        http.put(url, json={"job_id": "ev1", "rule": "sensitivity>=0.99"}), 422, "invalid_operating_point"
    )
    assert "Abnormal/image/youden" in body["detail"]  # says which candidates there are
    _error(http.put(url, json={"threshold": 0.3}), 422, "invalid_operating_point")  # no source
    assert http.put(url, json={"threshold": 1.3, "source": "x"}).status_code == 422
    assert http.put(url, json={"threshold": 0.3, "source": "x", "extra": 1}).status_code == 422
    _error(
        http.put("/models/m/7/operating-point", json={"threshold": 0.3, "source": "x"}), 404, "unknown_model"
    )
    _error(
        http.put("/models/m/..x/operating-point", json={"threshold": 0.3, "source": "x"}), 422, "invalid_name"
    )
    assert (
        http.get("/models").json()["models"][0]["operating_point"]["threshold"] == 0.47
    )  # refusals changed nothing

    assert http.delete(url).json() == {"name": "m", "version": "1", "operating_point": None}
    assert http.get("/models").json()["models"][0]["operating_point"] is None


# -- studies ---------------------------------------------------------------------------------------------
def _study(*sizes: tuple[int, int]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{k}.png", png_bytes(phantom(h, w)), "image/png")) for k, (h, w) in enumerate(sizes)]


def test_study_answers_each_image_in_order_and_the_mean(http, fakes):
    answer = http.post(
        "/predict/study", files=_study((96, 80), (64, 120), (100, 100)), params={"explain": "false"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [i["width"] for i in body["image_info"]] == [80, 120, 100]  # the order sent
    assert [a["worker"] for a in body["images"]] == ["fake (80x96)", "fake (120x64)", "fake (100x100)"]
    assert body["probability"] == pytest.approx((0.2 + 0.5 + 0.8) / 3) and body["prediction"] == "Abnormal"
    assert all(a["attention_map"] is None for a in body["images"]) and body["timings"]["total_ms"] > 0
    request, record = next(iter(fakes[0].jobs.values()))
    assert isinstance(request, list) and len(request) == 3 and "images" in record
    # polling the job answers the same study
    polled = http.get(f"/jobs/{body['job_id']}").json()
    assert polled["status"] == "done" and polled["result"]["image_info"] == body["image_info"]


def test_study_refusals_name_the_file_by_position_and_keep_limits(fakes, tmp_path):
    with _client(fakes, max_study_images=3, max_upload_bytes=50_000, model_store=tmp_path) as http:
        files = _study((64, 64), (64, 64))
        files.insert(1, ("files", ("broken.png", b"\x89PNG\r\n\x1a\n-not-really", "image/png")))
        body = _error(http.post("/predict/study", files=files), 400, "corrupt_image")
        assert body["detail"].startswith("file 2 of 3: ") and "broken" not in body["detail"]
        assert not fakes[0].jobs  # nothing queued when one file is bad
        body = _error(http.post("/predict/study", files=_study(*[(32, 32)] * 4)), 422, "several_files")
        assert "at most 3 files" in body["detail"]
        _error(http.post("/predict/study", files=_png()), 422, "missing_file")  # 'file', not 'files'
        _error(http.post("/predict", files=_study((32, 32))), 422, "missing_file")
        big = [("files", ("a.png", b"\x89PNG" + b"\0" * 60_000, "image/png"))]
        _error(http.post("/predict/study", files=big), 413, "file_too_large")
        fakes[0].workers_list = []
        _error(http.post("/predict/study", files=_study((64, 64))), 503, "not_ready")


# -- feedback --------------------------------------------------------------------------------------------
def test_feedback_is_stored_without_images_by_default(fakes, tmp_path):
    folder = tmp_path / "feedback"
    with _client(fakes, feedback_dir=folder, model_store=tmp_path / "store", api_keys=frozenset({"staff-key"}),
                 insecure_no_auth=True) as http:  # fmt: skip
        key = {"X-API-Key": "staff-key"}
        job = http.post("/predict", files=_png(), headers=key).json()["job_id"]
        answer = http.post("/feedback", json={"job_id": job, "verdict": "disagree", "label": "Normal",
                                              "comment": "lateral view"}, headers=key)  # fmt: skip
        assert answer.status_code == 201, answer.text
        body = answer.json()
        assert (body["prediction"], body["label"], body["image"]) == ("Abnormal", "Normal", None)
        [record] = [json.loads(p.read_text()) for p in (folder / "records").glob("*.json")]
        assert record["key_id"] == hashlib.sha256(b"staff-key").hexdigest()[:12]  # who, never the key
        assert "staff-key" not in json.dumps(record) and not (folder / "images").exists()
        assert not fakes[0].kept  # nothing kept at /predict either
        for bad in ({"job_id": job, "verdict": "disagree"}, {"job_id": job, "verdict": "disagree", "label": "Elbow"},
                    {"job_id": job, "verdict": "agree", "label": "Normal"}):  # fmt: skip
            _error(http.post("/feedback", json=bad, headers=key), 422, "invalid_feedback")
        _error(
            http.post("/feedback", json={"job_id": "nope", "verdict": "agree"}, headers=key),
            404,
            "unknown_job",
        )
        assert http.post("/feedback", json={"job_id": job, "verdict": "agree"}).status_code == 401
        models_listed = http.get("/metrics").text
        assert 'xrayfm_feedback_agreement{model="m",version="1"} 0.0' in models_listed


def test_feedback_export_becomes_a_training_set_that_adapt_reads(fakes, tmp_path, tiny_model):
    """Opted in: each answer's image is kept with its feedback; the export is a label CSV; a LoRA run on it
    publishes a version that /models lists with the agreement rate, and it can be promoted."""
    from xrayfm.data.cache import prepare_cache
    from xrayfm.data.folder import CsvDataset
    from xrayfm.train import AdaptConfig, adapt

    folder, store = tmp_path / "feedback", tmp_path / "store"
    model_store.add_version(store, "m", tiny_model, {})
    with _client(
        fakes, feedback_dir=folder, feedback_keep_images=True, model_store=store, insecure_no_auth=True
    ) as http:
        labels = []
        for k in range(16):
            job = http.post(
                "/predict", files={"file": ("x.png", png_bytes(phantom(64, 64, seed=k)), "image/png")}
            ).json()
            label = "Abnormal" if k % 2 else "Normal"
            verdict = (
                {"verdict": "agree"} if label == "Abnormal" else {"verdict": "disagree", "label": "Normal"}
            )
            saved = http.post("/feedback", json={"job_id": job["job_id"], **verdict}).json()
            assert saved["image"] == f"images/{saved['id']}.png"
            labels.append(int(label == "Abnormal"))
        export = http.get("/feedback/export", params={"model": "m"})
        assert export.status_code == 200, export.text
        assert export.headers["x-xrayfm-rows"] == "16" and export.headers["x-xrayfm-without-image"] == "0"
        rows = list(csv.DictReader(io.StringIO(export.text)))
        assert sorted(int(r["Abnormal"]) for r in rows) == sorted(labels) and list(rows[0]) == [
            "path",
            "Abnormal",
        ]
        _error(http.get("/feedback/export", params={"model": "other"}), 404, "no_feedback")

        csv_path = folder / "export.csv"
        cache = prepare_cache(CsvDataset(csv_path), tmp_path / "cache", size=64, progress=False)
        assert cache["usable"] == 16  # every kept image decodes
        run = tmp_path / "run"
        summary = adapt(AdaptConfig(out=str(run), cache=str(tmp_path / "cache"), foundation=str(tiny_model),
                                    method="lora", max_steps=2, batch_size=8, val_fraction=0.25, n_bootstrap=10,
                                    progress_bar=False, tensorboard=False))  # fmt: skip
        assert summary["status"] == "completed"
        version = model_store.add_version(store, "m-feedback-lora", run / "best", {"job_id": "feedback-loop"})
        assert http.post(f"/models/m-feedback-lora/{version}/promote").status_code == 200
        listed = {m["name"]: m for m in http.get("/models").json()["models"]}
        assert listed["m"]["feedback"] == {"agree": 8, "disagree": 8, "agreement": 0.5}
        assert listed["m-feedback-lora"]["serving"] and listed["m-feedback-lora"]["feedback"] is None
