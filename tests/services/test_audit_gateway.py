"""The gateway's audit trail, in process: the real app with its training queue on the machine's Redis
(db 15, a fresh key prefix) and a fake inference queue. Admin actions leave a ``requested`` line and their
outcome under the key's hash (never the key), refusals too; predictions leave one line without patient
data; `xrayfm audit verify` passes on the log and fails once a line is edited; when the log cannot be
written, admin actions are refused and predictions go on."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.services.gateway_fakes import MODEL, FakeQueue
from tests.services.svc_helpers import dicom_bytes, phantom, png_bytes
from xrayfm import audit
from xrayfm.cli import main
from xrayfm.utils import sha256_folder
from xrayfm_gateway.app import create_app
from xrayfm_gateway.deps import get_queue
from xrayfm_gateway.metrics import AUDIT_FAILURES
from xrayfm_gateway.queue import JobState
from xrayfm_stack import store as model_store
from xrayfm_stack.protocol import DomainInfo, DomainReason, RejectionReason, WorkerRejection
from xrayfm_stack.settings import GatewaySettings, QueueSettings, TrainingSettings

ADMIN, STAFF = "admin-key-0123456789abcdef", "staff-key-fedcba9876543210"
REDIS = "redis://127.0.0.1:6379/15"
PATIENT = ("DOE^JANE", "PID-7788-AUDIT", "jane-doe-chest.dcm")  # name, id, file name: none may reach the log


def _who(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _version(store: Path, name: str) -> str:
    """A stand-in checkpoint (meta.json + weights bytes) published as the next version of `name`."""
    source = store.parent / f"ckpt-{uuid.uuid4().hex[:6]}"
    source.mkdir(parents=True)
    (source / "meta.json").write_text(json.dumps({"labels": ["Abnormal"], "format": "xrayfm"}))
    (source / "model.safetensors").write_bytes(uuid.uuid4().bytes * 64)
    return model_store.add_version(store, name, source, {"job_id": str(uuid.uuid4())})


@pytest.fixture()
def gateway(tmp_path: Path):
    """(client, settings, fake inference queue); admin key ADMIN, prediction key STAFF."""
    import redis

    queue = f"xrayfm-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    (tmp_path / "data").mkdir()
    settings = GatewaySettings(
        queue=QueueSettings(redis_url=REDIS, queue=f"{queue}-inference"),
        training=TrainingSettings(redis_url=REDIS, queue=queue),
        api_keys=frozenset({STAFF}), admin_keys=frozenset({ADMIN}), model_store=tmp_path / "store",
        data_dirs=(Path("/x"), tmp_path / "data"), audit_log=tmp_path / "audit" / "audit.jsonl",
    )  # fmt: skip
    app = create_app(settings)
    fake = FakeQueue()
    app.dependency_overrides[get_queue] = lambda: fake
    try:
        with TestClient(app) as http:
            yield http, settings, fake
    finally:
        for key in [*client.scan_iter(f"{queue}*"), *client.scan_iter(f"_kombu.binding.{queue}*")]:
            client.delete(key)


def _records(settings: GatewaySettings) -> list[dict[str, Any]]:
    return [json.loads(line) for line in settings.audit_log.read_text().splitlines()]


def _pairs(records: list[dict[str, Any]]) -> list[tuple[str, str, int | None, str | None]]:
    return [(r["action"], r["outcome"], r["status"], r["reason"]) for r in records]


def test_admin_actions_leave_requested_and_outcome_under_the_key_hash(gateway):
    http, settings, _ = gateway
    admin = {"X-API-Key": ADMIN}
    store = settings.model_store
    for _ in range(2):
        _version(store, "m")
    assert http.post("/models/m/1/promote", headers=admin).status_code == 200
    digest = sha256_folder(model_store.version_dir(store, "m", "1"))  # what the workers serving it report
    assert http.post("/models/m/2/promote", headers=admin).status_code == 200
    assert http.post("/models/rollback", headers=admin).json()["serving"] == {"name": "m", "version": "1"}
    point = {"threshold": 0.3, "source": "site study"}
    assert http.put("/models/m/1/operating-point", json=point, headers=admin).status_code == 200
    assert http.delete("/models/m/1/operating-point", headers=admin).status_code == 200
    spec = {"kind": "pretrain", "name": "fm", "config": {"kind": "chexpert", "root": "/x"}}
    job_id = http.post("/training/jobs", json=spec, headers=admin).json()["job_id"]
    assert http.post(f"/training/jobs/{job_id}/cancel", headers=admin).status_code == 200
    assert http.delete(f"/training/jobs/{job_id}", headers=admin).status_code == 204

    records = _records(settings)
    assert _pairs(records) == [
        (action, outcome, status if outcome == "ok" else None, None)
        for action, status in [("promote", 200), ("promote", 200), ("rollback", 200), ("operating_point_set", 200),
                               ("operating_point_clear", 200), ("train_submit", 202), ("train_cancel", 200),
                               ("train_delete", 204)]
        for outcome in ("requested", "ok")
    ]  # fmt: skip
    assert {r["who"] for r in records} == {_who(ADMIN)}
    for requested, done in zip(records[::2], records[1::2], strict=True):
        assert requested["request_id"] == done["request_id"]  # one request: its two lines
    assert len({r["request_id"] for r in records}) == 8
    assert records[1]["target"] == "model:m/1"
    assert records[1]["model"] == {"name": "m", "version": "1", "sha256": digest}
    assert records[5]["target"] == "model:m/1" and records[5]["model"]["version"] == "1"  # rolled back to
    assert records[7]["detail"] == {"threshold": 0.3, "rule": None}
    assert records[10]["detail"] == {"kind": "pretrain", "name": "fm"}
    assert records[11]["target"] == f"job:{job_id}"
    assert records[13]["detail"] == {"kind": "pretrain", "status": "cancelled"}
    assert records[15]["target"] == f"job:{job_id}"
    text = settings.audit_log.read_text()
    assert ADMIN not in text and STAFF not in text
    assert audit.verify(settings.audit_log).intact


def test_refused_admin_requests_are_recorded_with_their_reason(gateway):
    http, settings, _ = gateway
    _version(settings.model_store, "m")
    assert http.post("/models/m/1/promote", headers={"X-API-Key": "a-wrong-key"}).status_code == 401
    assert http.post("/models/m/1/promote", headers={"X-API-Key": STAFF}).status_code == 401  # not admin
    assert http.post("/models/m/..bad/promote", headers={"X-API-Key": ADMIN}).status_code == 422
    assert http.post("/models/m/9/promote", headers={"X-API-Key": ADMIN}).status_code == 404
    bad = {"threshold": "high"}
    assert http.put("/models/m/1/operating-point", json=bad, headers={"X-API-Key": ADMIN}).status_code == 422
    assert http.post("/training/jobs", content=b"{", headers={"X-API-Key": ADMIN}).status_code == 422
    assert http.get("/models", headers={"X-API-Key": ADMIN}).status_code == 200  # a read: not recorded

    records = _records(settings)
    assert [(r["who"], *pair) for r, pair in zip(records, _pairs(records), strict=True)] == [
        ("unknown-key", "promote", "refused", 401, "unauthorized"),  # a wrong key's hash is not kept
        (_who(STAFF), "promote", "refused", 401, "unauthorized"),
        (_who(ADMIN), "promote", "refused", 422, "invalid_name"),
        (_who(ADMIN), "promote", "requested", None, None),  # it got as far as acting: the store said no
        (_who(ADMIN), "promote", "refused", 404, "unknown_model"),
        (_who(ADMIN), "operating_point_set", "refused", 422, "bad_request"),
        (_who(ADMIN), "train_submit", "refused", 422, "invalid_spec"),
    ]
    assert records[2]["target"] == "model:m/(invalid)"  # a malformed name is not copied into the log
    assert records[3]["request_id"] == records[4]["request_id"]
    assert "a-wrong-key" not in settings.audit_log.read_text()


def test_a_calibrate_job_is_recorded_as_calibrate(gateway):
    http, settings, _ = gateway
    _version(settings.model_store, "m")
    site = settings.data_dirs[1] / "site"
    site.mkdir()
    for k in range(4):
        (site / f"{k}.png").write_bytes(png_bytes(phantom(64, 64, seed=k)))
    spec = {"kind": "calibrate", "config": {"model": "store:m/1", "data": [f"folder:{site}"]}}
    resp = http.post("/training/jobs", json=spec, headers={"X-API-Key": ADMIN})
    assert resp.status_code == 202, resp.text
    records = _records(settings)
    assert _pairs(records) == [("calibrate", "requested", None, None), ("calibrate", "ok", 202, None)]
    assert records[1]["detail"] == {"kind": "calibrate", "name": "m"}


def test_predictions_leave_one_record_without_patient_data(gateway):
    http, settings, fake = gateway
    name, patient_id, file_name = PATIENT
    upload = dicom_bytes(phantom(96, 80), patient_name=name, patient_id=patient_id)
    files = {"file": (file_name, upload, "application/dicom")}
    staff = {"X-API-Key": STAFF}
    answer = http.post("/predict", files=files, headers=staff)
    assert answer.status_code == 200, answer.text
    assert http.post("/predict", files={"file": (file_name, b"not an image", "image/png")}, headers=staff).status_code in (400, 415)  # fmt: skip
    domain = DomainInfo(in_domain=False, reasons=[DomainReason(code="colour", message="a colour image")])
    fake.next_state = JobState("done", result=WorkerRejection(
        error=RejectionReason(type="out_of_domain", message="outside", domain=domain, model=MODEL)))  # fmt: skip
    assert http.post("/predict", files=files, headers=staff).status_code == 422
    study = [("files", (f"{k}-{file_name}", upload, "application/dicom")) for k in range(2)]
    fake.next_state = None
    assert http.post("/predict/study", files=study, headers=staff).status_code == 200
    queued = http.post("/jobs", files=files, headers=staff).json()["job_id"]  # the asynchronous form

    records = _records(settings)
    assert [(r["action"], r["outcome"], r["status"]) for r in records] == [
        ("predict", "ok", 200), ("predict", "refused", records[1]["status"]), ("predict", "refused", 422),
        ("predict_study", "ok", 200), ("predict_job", "ok", 202),
    ]  # fmt: skip
    first = records[0]
    assert first["who"] == _who(STAFF) and first["target"] == f"job:{answer.json()['job_id']}"
    assert first["model"] == {"name": MODEL.name, "version": MODEL.version, "sha256": MODEL.sha256}
    assert records[1]["model"] is None and records[1]["target"] is None  # refused before it was queued
    assert records[2]["reason"] == "out_of_domain"
    assert records[2]["detail"] == {"domain": [{"in_domain": False, "reasons": ["colour"]}]}
    assert records[3]["detail"] == {"domain": [None, None]}  # the fake worker runs no gate
    assert records[4]["target"] == f"job:{queued}" and records[4]["model"] is None  # not answered yet
    text = settings.audit_log.read_text()
    for secret in (*PATIENT, "DOE", "JANE", "7788", STAFF, "jane-doe"):
        assert secret not in text, secret
    assert "probability" not in text and "Abnormal" not in text  # nor the answer itself


def test_cli_verifies_the_gateways_log_and_finds_an_edited_line(gateway, capsys):
    http, settings, _ = gateway
    _version(settings.model_store, "m")
    http.post("/models/m/1/promote", headers={"X-API-Key": ADMIN})
    http.post("/predict", files={"file": ("x.png", png_bytes(phantom(96, 80)), "image/png")},
              headers={"X-API-Key": STAFF})  # fmt: skip
    log = str(settings.audit_log)
    assert main(["audit", "verify", log]) == 0
    assert "intact, 3 records" in capsys.readouterr().out
    lines = settings.audit_log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(_who(ADMIN), _who("someone-else"))  # who promoted, rewritten
    settings.audit_log.write_text("".join(lines))
    assert main(["audit", "verify", log]) == 1
    assert "line 2: the line was edited" in capsys.readouterr().err


def test_without_a_writable_audit_log_admin_actions_are_refused_and_predictions_go_on(gateway, tmp_path):
    http, settings, _ = gateway
    _version(settings.model_store, "m")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    http.app.state.audit.path = blocker / "audit.jsonl"  # its folder cannot be made: every write fails
    before = {kind: AUDIT_FAILURES.labels(kind)._value.get() for kind in ("admin", "prediction")}
    resp = http.post("/models/m/1/promote", headers={"X-API-Key": ADMIN})
    assert resp.status_code == 503 and resp.json()["error"] == "audit_unavailable"
    assert model_store.serving(settings.model_store) is None  # not promoted without its record
    image = {"file": ("x.png", png_bytes(np.full((96, 80), 128, np.uint8)), "image/png")}
    assert http.post("/predict", files=image, headers={"X-API-Key": STAFF}).status_code == 200
    assert AUDIT_FAILURES.labels("admin")._value.get() == before["admin"] + 1
    assert AUDIT_FAILURES.labels("prediction")._value.get() == before["prediction"] + 1
    http.app.state.audit.path = settings.audit_log  # writable again: admin actions work again
    assert http.post("/models/m/1/promote", headers={"X-API-Key": ADMIN}).status_code == 200
    assert _pairs(_records(settings)) == [("promote", "requested", None, None), ("promote", "ok", 200, None)]


def test_the_audit_log_is_a_setting_and_compose_keeps_it_on_a_volume_of_its_writers_own():
    """The gateway writes the log; the PACS router (profile pacs) appends its study_result lines to the
    same file; no other service mounts it."""
    import yaml

    from tests.helpers import REPO

    assert GatewaySettings.from_env({}).audit_log == Path("runs/audit/audit.jsonl")
    assert GatewaySettings.from_env({"XRAYFM_AUDIT_LOG": "/audit/a.jsonl"}).audit_log == Path(
        "/audit/a.jsonl"
    )
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    folder = str(Path(services["gateway"]["environment"]["XRAYFM_AUDIT_LOG"]).parent)
    owners = [
        name
        for name, svc in services.items()
        if any(v.endswith(f":{folder}") for v in svc.get("volumes", []))
    ]
    assert owners == ["gateway", "router"] and "audit:/audit" in services["gateway"]["volumes"]
    router = services["router"]["environment"]["XRAYFM_AUDIT_LOG"]
    assert router == services["gateway"]["environment"]["XRAYFM_AUDIT_LOG"]
