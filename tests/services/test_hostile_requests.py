"""Hostile input answers a clear 4xx, never a 500: a multipart boundary over
256 characters, a NUL byte or deep nesting in a job spec, a non-finite operating point; `make up` keeps an
explicit ``XRAYFM_INSECURE_NO_AUTH=0``; with keys configured, ``/ready`` and ``/metrics`` show no worker
or job details to a request without one. In process (the real app, fake queues) and once against a real
uvicorn gateway, whose log must hold no traceback afterwards."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_fakes import MODEL, FakeQueue, FakeTraining, gateway_client
from xrayfm_stack import local as stack_lib
from xrayfm_stack.settings import GatewaySettings
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
CASES = [
    Case("boundary-300", "POST", "/predict", 400, "bad_multipart", _multipart("b" * 300), "256"),
    Case("boundary-study", "POST", "/predict/study", 400, "bad_multipart", _multipart("b" * 1000)),
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
WORKER = {"hostname": "celery@radiology-host-7", "pid": 4242, "ready": True, "model": MODEL.model_dump()}
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
