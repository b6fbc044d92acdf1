"""Hostile input answers a clear 4xx, never a 500: a DICOM frame larger than its header (422), corrupt
JPEGs (400), a multipart boundary over 256 characters or none closing the body, a NUL byte or deep nesting
in a job spec, a non-finite operating point; job specs with NaN, infinite or absurd numbers, or a hub model name; a body over ``XRAYFM_MAX_JSON_KB``; `make up` keeps an
explicit ``XRAYFM_INSECURE_NO_AUTH=0``; with keys configured, ``/ready`` and ``/metrics`` show no worker
or job details to a request without one; a finished job's record can be deleted, a running one's not.
In process (the real app, fake queues) and once against a real uvicorn gateway, whose log must hold no
traceback afterwards."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openjpeg.utils import encode_array
from pydicom.uid import JPEG2000Lossless

from tests.hostile_files import cut_with_eoi, dicom, j2k_with_siz_size, scan_zeroed, with_sof_size
from tests.services.gateway_fakes import MODEL, READY_WORKER, FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import jpeg_bytes, phantom
from xrayfm_gateway.queue import TrainingQueue
from xrayfm_local import launcher as stack_lib
from xrayfm_stack.settings import GatewaySettings, TrainingSettings
from xrayfm_stack.spec import MAX_DEPTH, check_plain
from xrayfm_stack.store import version_dir

API_KEY, ADMIN_KEY = "hostile-api-key-4f1c9a", "hostile-admin-key-b73e02"
DEEP = 10_000


@dataclass
class Case:
    """One hostile request and the answer it must get."""

    id: str
    method: str
    path: str
    status: int
    error: str
    send: dict[str, Any] = field(default_factory=dict)  # httpx / TestClient keyword arguments
    says: str = ""  # a part of the detail


def _truncated() -> dict[str, Any]:
    """A valid upload whose body stops before its closing boundary (a client cut off mid-upload)."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    body = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + png + b"\r\n"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=zz"}}


def _multipart(boundary: str) -> dict[str, Any]:
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\nnot an image\r\n--{boundary}--\r\n"
    )
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def _json_text(text: str) -> dict[str, Any]:
    return {"content": text, "headers": {"content-type": "application/json"}}


def _spec_with(value: str) -> dict[str, Any]:
    """A pretrain spec, sent as raw JSON text, whose config holds `value` (JSON text) in `model_kwargs`."""
    config = '{"kind": "mura", "root": "/x", "model_kwargs": {"a": ' + value + "}}"
    return _json_text('{"kind": "pretrain", "config": ' + config + "}")


def _config_with(members: str) -> dict[str, Any]:
    """A pretrain spec, sent as raw JSON text, whose config adds `members` (JSON text) to a valid one."""
    return _json_text('{"kind": "pretrain", "config": {"kind": "mura", "root": "/x", ' + members + "}}")


def _point(threshold: str, extra: str = "") -> dict[str, Any]:
    """An operating point sent as raw JSON text (NaN and Infinity are what Python's json reads)."""
    return _json_text('{"threshold": ' + threshold + ', "source": "x"' + extra + "}")


NUL_ROOT = {
    "json": {"kind": "evaluate", "config": {"model": "store:m/1", "kind": "mura", "root": "/x/a\x00b"}}
}
NUL_KEY = {
    "json": {"kind": "pretrain", "config": {"kind": "mura", "root": "/x", "model_kwargs": {"a\x00": 1}}}
}
DEEP_OBJECT = _json_text('{"kind": "pretrain", "config": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}")
POINT = "/models/m/1/operating-point"
SPECS = "/training/jobs"
FLOATS = ("lr", "weight_decay", "grad_clip", "drop_path_rate", "focal_gamma", "val_fraction")
ABSURD = (("epochs", 10**9, 1, 10_000), ("batch_size", 10**9, 1, 65_536), ("size", 10**6, 16, 4096),
          ("num_workers", 10_000, 0, 256))  # fmt: skip
HUB_MODELS = ("hf-hub:attacker/evil-model", "hf_hub:attacker/evil-model", "timm/vit_base_patch16_224")


def _refused(case_id: str, members: str, says: str) -> Case:
    """A pretrain spec whose config adds `members` to a valid one: 422 naming the setting (`says`)."""
    return Case(case_id, "POST", SPECS, 422, "invalid_spec", _config_with(members), says)


def _upload(name: str, data: bytes) -> dict[str, Any]:
    return {"files": {"file": (name, data)}}


JPEG = jpeg_bytes(phantom(256, 256))
FRAME_BOMB = dicom(j2k_with_siz_size(encode_array(phantom(64, 64)), 15000, 15000), JPEG2000Lossless, 64, 64)

CASES = [
    # uploads: a 1 KB DICOM whose 64 x 64 header holds a 15000 x 15000 frame, corrupt JPEGs
    Case(
        "frame-bomb", "POST", "/predict", 422, "image_too_large", _upload("x.dcm", FRAME_BOMB), "15000x15000"
    ),
    Case("jpeg-scan-zeroed", "POST", "/predict", 400, "corrupt_image", _upload("x.jpg", scan_zeroed(JPEG))),
    Case(
        "jpeg-sof-2000",
        "POST",
        "/predict",
        400,
        "corrupt_image",
        _upload("x.jpg", with_sof_size(JPEG, 2000, 2000)),
    ),
    Case(
        "jpeg-sof-7000",
        "POST",
        "/predict",
        400,
        "corrupt_image",
        _upload("x.jpg", with_sof_size(JPEG, 7000, 7000)),
    ),
    Case("jpeg-cut-eoi", "POST", "/predict", 400, "corrupt_image", _upload("x.jpg", cut_with_eoi(JPEG))),
    Case("boundary-300", "POST", "/predict", 400, "bad_multipart", _multipart("b" * 300), "256"),
    Case("boundary-study", "POST", "/predict/study", 400, "bad_multipart", _multipart("b" * 1000)),
    Case("no-closing-boundary", "POST", "/predict", 400, "bad_multipart", _truncated(), "closing boundary"),
    Case("nul-root", "POST", SPECS, 422, "invalid_spec", NUL_ROOT, "config.root"),
    Case("nul-key", "POST", SPECS, 422, "invalid_spec", NUL_KEY, "NUL"),
    Case("nested-10000", "POST", SPECS, 422, "invalid_spec", _spec_with("[" * DEEP + "]" * DEEP), "nested"),
    Case("nested-900", "POST", SPECS, 422, "invalid_spec", _spec_with("[" * 900 + "]" * 900), "deeper than"),
    Case("nested-object", "POST", SPECS, 422, "invalid_spec", DEEP_OBJECT, "nested"),
    Case("threshold-nan", "PUT", POINT, 422, "bad_request", _point("NaN"), "threshold"),
    Case("threshold-inf", "PUT", POINT, 422, "bad_request", _point("Infinity"), "threshold"),
    Case("threshold-minus-inf", "PUT", POINT, 422, "bad_request", _point("-Infinity"), "threshold"),
    Case("extra-nan", "PUT", POINT, 422, "bad_request", _point("0.5", ', "extra": NaN'), "extra"),
    Case(
        "extra-deep", "PUT", POINT, 422, "bad_request", _point("0.5", ', "extra": ' + "[" * 500 + "]" * 500)
    ),
    Case("point-nested-10000", "PUT", POINT, 400, "bad_request", _json_text("[" * DEEP + "]" * DEEP)),
    # job specs: only finite numbers in their ranges, timm architecture names, bodies of at most 256 KiB
    *(_refused(f"{n}-{v}", f'"{n}": {v}', f"{n}=") for n in FLOATS for v in ("NaN", "Infinity", "-Infinity")),
    *(
        _refused(f"{n}-{v}", f'"{n}": {v}', f"{n}={v} (must lie in [{low}, {high}])")
        for n, v, low, high in ABSURD
    ),
    *(_refused(f"model-{m}", f'"model": "{m}"', f"model '{m}'") for m in HUB_MODELS),
    _refused("pretrained-timm", '"pretrained": "timm"', "Hugging Face hub"),
    Case("nan-in-kwargs", "POST", SPECS, 422, "invalid_spec", _spec_with("[1, NaN]"), "model_kwargs"),
    Case(
        "spec-10mb", "POST", SPECS, 413, "body_too_large", _config_with(f'"policy": "{"a" * 10**7}"'), "KiB"
    ),
    Case(
        "multipart-spec", "POST", SPECS, 413, "body_too_large", {**_multipart("b"), "content": "x" * 300_000}
    ),
    Case("point-1mb", "PUT", POINT, 413, "body_too_large", _point("0.5", f', "extra": "{"a" * 2**20}"')),
]


def check_answer(case: Case, status: int, text: str) -> None:
    """The expected status, and a JSON error body with the expected code and a readable detail."""
    assert status == case.status, (case.id, text[:300])
    body = json.loads(text)
    assert set(body) >= {"error", "detail"} and body["error"] == case.error, (case.id, body)
    assert isinstance(body["detail"], str) and 0 < len(body["detail"]) < 2000, (case.id, body)
    assert case.says in body["detail"], (case.id, body)
    assert "NaN" not in body["detail"] and "Infinity" not in body["detail"]  # no echo of the input


# -- in process --------------------------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """A model store holding the version m/1 (an empty folder is enough for the operating-point route)."""
    version_dir(tmp_path / "store", "m", "1").mkdir(parents=True)
    return tmp_path / "store"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_a_clear_4xx(case: Case, store: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # TestClient re-raises any exception the app does not handle: a 500 would fail here too
    with gateway_client(FakeQueue(), FakeTraining(), insecure_no_auth=True, model_store=store) as http:
        answer = http.request(case.method, case.path, **case.send)
    check_answer(case, answer.status_code, answer.text)
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_nesting_up_to_the_limit_is_accepted(store: Path) -> None:
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    check_plain(nested(MAX_DEPTH))
    with pytest.raises(Exception, match=f"deeper than {MAX_DEPTH}"):
        check_plain(nested(MAX_DEPTH + 1))
    spec = {"kind": "pretrain", "config": {"kind": "mura", "root": "/x", "model_kwargs": {"a": [[1]]}}}
    with gateway_client(FakeQueue(), FakeTraining(), insecure_no_auth=True, data_dirs=(Path("/x"),)) as http:
        assert http.post("/training/jobs", json=spec).status_code == 202


def test_a_valid_operating_point_still_saves(store: Path) -> None:
    with gateway_client(FakeQueue(), FakeTraining(), insecure_no_auth=True, model_store=store) as http:
        answer = http.put(POINT, json={"threshold": 0.3, "source": "site study"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["operating_point"]["threshold"] == 0.3


# -- job specs accept only sane values; bodies are bounded; finished jobs can be deleted -------------
def test_specs_at_the_limits_are_accepted() -> None:
    """The largest values of each range, and a tagged timm name, still queue (the 422s above are the limits)."""
    config = {"kind": "mura", "root": "/x", "epochs": 10_000, "batch_size": 65_536, "size": 4096,
              "num_workers": 256, "lr": 10, "weight_decay": 0.0, "grad_clip": 0, "drop_path_rate": 0.99,
              "focal_gamma": 10, "val_fraction": 0.0, "model": "vit_base_patch16_224.augreg_in21k"}  # fmt: skip
    with gateway_client(FakeQueue(), FakeTraining(), insecure_no_auth=True, data_dirs=(Path("/x"),)) as http:
        answer = http.post(SPECS, json={"kind": "pretrain", "config": config})
    assert answer.status_code == 202, answer.text


def test_a_chunked_body_is_counted() -> None:
    """A body without Content-Length is refused once what arrived passes the limit; one within it is read."""

    def chunks(total: int):
        for _ in range(total // 65_536):
            yield b" " * 65_536
        yield b"[]"

    headers = {"content-type": "application/json"}
    with gateway_client(
        FakeQueue(), FakeTraining(), insecure_no_auth=True, max_json_bytes=128 * 1024
    ) as http:
        big = http.post(SPECS, content=chunks(4 * 2**20), headers=headers)
        small = http.post(SPECS, content=chunks(65_536), headers=headers)
    assert big.status_code == 413 and big.json()["error"] == "body_too_large", big.text
    assert "128 KiB" in big.json()["detail"]
    assert small.status_code == 422 and "a job spec is a JSON object" in small.json()["detail"], small.text


def test_max_json_kb_is_read_from_the_environment() -> None:
    assert GatewaySettings.from_env({}).max_json_bytes == 256 * 1024
    assert GatewaySettings.from_env({"XRAYFM_MAX_JSON_KB": "64"}).max_json_bytes == 64 * 1024


def test_uploads_keep_their_own_limit() -> None:
    """A multipart upload over XRAYFM_MAX_JSON_KB reaches the upload code (here: not an image), unrefused."""
    body = b"\0" * (600 * 1024)
    with gateway_client(FakeQueue(), FakeTraining(), max_json_bytes=1024) as http:
        answer = http.post("/predict", files={"file": ("x.png", body, "image/png")})
    assert answer.status_code != 413 and answer.json()["error"] != "body_too_large", answer.text


@pytest.fixture()
def training(records) -> TrainingQueue:
    """The gateway's real training queue over the job records of the `records` fixture (Redis db 15)."""
    return TrainingQueue(TrainingSettings(redis_url="redis://127.0.0.1:6379/15", queue=records.queue))


def test_a_finished_job_is_deleted_with_its_log(records, training: TrainingQueue) -> None:
    job_id = records.create({"kind": "adapt", "name": "m", "config": {}})
    other = records.create({"kind": "adapt", "name": "kept", "config": {}})
    records.append_log(job_id, "attempt 1")
    with gateway_client(FakeQueue(), training, insecure_no_auth=True) as http:
        url = f"{SPECS}/{job_id}"
        queued = http.delete(url)
        assert queued.status_code == 409 and queued.json()["error"] == "job_not_finished", queued.text
        assert "cancel it first" in queued.json()["detail"]
        assert records.acquire(job_id, "worker-1", ttl_s=30)
        records.update(job_id, status="running")
        assert http.delete(url).status_code == 409
        records.update(job_id, status="done")  # its worker still holds the lock: it may write one more line
        finishing = http.delete(url)
        assert finishing.status_code == 409 and "still wrapping it up" in finishing.json()["detail"]
        records.release(job_id, "worker-1")
        records.request_cancel(job_id)  # a cancel flag too
        assert http.delete(url).status_code == 204
        for answer in (http.get(url), http.get(f"{url}/log"), http.delete(url)):
            assert answer.status_code == 404 and answer.json()["error"] == "unknown_job", answer.text
        assert [job["job_id"] for job in http.get(SPECS).json()["jobs"]] == [other]
        assert http.delete(f"{SPECS}/not-a-uuid").status_code == 404
    assert not list(records.redis.scan_iter(f"{records.queue}:tjob:{job_id}*"))  # record, log, cancel, lock
    assert records.redis.zscore(records.index_key, job_id) is None
    assert records.get(other) is not None


def test_deleting_a_job_needs_the_admin_key(records, training: TrainingQueue) -> None:
    job_id = records.create({"kind": "adapt", "name": "m", "config": {}})
    records.update(job_id, status="failed")
    with gateway_client(FakeQueue(), training, **KEYED) as http:
        for headers in ({}, {"X-API-Key": API_KEY}):  # no key, or a prediction key
            answer = http.delete(f"{SPECS}/{job_id}", headers=headers)
            assert answer.status_code == 401 and answer.json()["error"] == "unauthorized", answer.text
        assert records.get(job_id) is not None
        assert http.delete(f"{SPECS}/{job_id}", headers={"X-API-Key": ADMIN_KEY}).status_code == 204
    assert records.get(job_id) is None


# -- item 4: the launcher keeps an explicit XRAYFM_INSECURE_NO_AUTH=0 ------------------------------------------
@pytest.mark.parametrize(
    ("environ", "status"),
    [
        ({}, 200),  # local development: open by default
        ({"XRAYFM_INSECURE_NO_AUTH": "0"}, 403),
        ({"XRAYFM_INSECURE_NO_AUTH": "false"}, 403),
        ({"XRAYFM_INSECURE_NO_AUTH": "no"}, 403),
        ({"XRAYFM_INSECURE_NO_AUTH": "1"}, 200),
        ({"XRAYFM_ADMIN_KEYS": ADMIN_KEY}, 401),  # keyed: the key opens them, not the flag
    ],
)
def test_make_up_respects_an_explicit_insecure_no_auth(environ: dict[str, str], status: int) -> None:
    env = stack_lib.launch_env(environ)
    settings = GatewaySettings.from_env({**environ, **env})  # what the gateway that `make up` starts reads
    assert settings.insecure_no_auth is (status == 200)
    admin = {k: getattr(settings, k) for k in ("admin_keys", "insecure_no_auth")}
    with gateway_client(FakeQueue(), FakeTraining(), **admin) as http:
        answer = http.get("/training/jobs")
    assert answer.status_code == status, answer.text
    if status == 403:
        assert answer.json()["error"] == "admin_closed"


# -- item 7: /ready and /metrics without a key -----------------------------------------------------------------
WORKER = {**READY_WORKER, "hostname": "celery@radiology-host-7", "pid": 4242}
KEYED = {"api_keys": frozenset({API_KEY}), "admin_keys": frozenset({ADMIN_KEY})}


@pytest.mark.parametrize(
    ("settings", "headers", "shown"),
    [
        (KEYED, {}, False),
        (KEYED, {"X-API-Key": "wrong-key"}, False),
        (KEYED, {"X-API-Key": API_KEY}, True),
        (KEYED, {"Authorization": f"Bearer {ADMIN_KEY}"}, True),
        ({"admin_keys": frozenset({ADMIN_KEY})}, {}, False),  # an admin key alone is a key configured
        ({}, {}, True),  # no key configured (local development): as before
    ],
)
def test_ready_shows_workers_only_with_a_key(settings: dict, headers: dict, shown: bool) -> None:
    with gateway_client(FakeQueue([WORKER]), FakeTraining(), **settings) as http:
        answer = http.get("/ready", headers=headers)
    assert answer.status_code == 200 and answer.json()["ready"] is True, answer.text
    assert {"ready", "broker", "detail"} <= set(answer.json())
    for secret in ("radiology-host-7", "4242", MODEL.sha256):
        assert (secret in answer.text) is shown, secret


def test_metrics_leave_job_series_out_without_a_key(records) -> None:
    job_id = records.create({"kind": "adapt", "name": "secret-study-model", "config": {}})
    records.update(job_id, status="running", attempts=2,
                   progress={"step": 4, "total_steps": 16, "metrics": {"val_loss": 0.9}})  # fmt: skip
    training = FakeTraining()
    training.records = records  # real job records (Redis db 15)
    with gateway_client(FakeQueue(), training, **KEYED) as http:
        anonymous = http.get("/metrics").text
        keyed = http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for series in ("progress", "last_metric", "attempts"):
        series = f"xrayfm_training_job_{series}"
        assert f"{series}{{" in keyed and series not in anonymous, series
    assert job_id in keyed and "secret-study-model" in keyed
    assert job_id not in anonymous and "secret-study-model" not in anonymous
    assert 'xrayfm_training_jobs{state="running"}' in anonymous  # the counts by state stay
    assert "xrayfm_gateway_requests_total" in anonymous


# -- a real gateway: the same requests, then its log ------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_gateway(live_stack, tmp_path_factory: pytest.TempPathFactory):
    """A second real gateway on the shared stack, with keys and a store holding m/1."""
    store = tmp_path_factory.mktemp("hostile-store")
    version_dir(store, "m", "1").mkdir(parents=True)
    port = stack_lib.free_port()
    proc = live_stack.stack.start_gateway(port, name="gateway-hostile", extra_env={
        "XRAYFM_API_KEYS": API_KEY, "XRAYFM_ADMIN_KEYS": ADMIN_KEY, "XRAYFM_MODEL_STORE": str(store)})  # fmt: skip
    yield f"http://127.0.0.1:{port}", proc
    live_stack.stack.stop(proc)


def test_real_gateway_answers_4xx_and_logs_no_traceback(live_stack, keyed_gateway) -> None:
    url, proc = keyed_gateway
    with httpx.Client(base_url=url, timeout=60) as http:
        for case in CASES:
            key = API_KEY if case.path.startswith("/predict") else ADMIN_KEY
            send = {**case.send, "headers": {**case.send.get("headers", {}), "X-API-Key": key}}
            answer = http.request(case.method, case.path, **send)
            check_answer(case, answer.status_code, answer.text)
        stack_lib.wait_until(lambda: http.get("/ready").status_code == 200, 60, "/ready", proc)
        ready = http.get("/ready")
        assert set(ready.json()) == {"ready", "broker", "detail"}, ready.text
        assert http.get("/ready", headers={"X-API-Key": API_KEY}).json()["workers"]
        metrics = http.get("/metrics", headers={"X-API-Key": API_KEY})
        assert metrics.status_code == 200 and 'status="4' in metrics.text
        assert 'status="500"' not in metrics.text  # every request is counted by status (MetricsMiddleware)
    log = proc.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
