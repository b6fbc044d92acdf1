"""The training worker through the gateway: real Redis, a real Celery training worker, real uvicorn.

Tiny jobs: 32 px synthetic phantoms, a 2-block ViT with 8 px patches, one epoch."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import starts_processes
from tests.services.svc_helpers import require_redis_server
from xrayfm.errors import XrayfmError
from xrayfm_local import launcher as stack_lib
from xrayfm_stack import store as model_store

REPO = Path(__file__).resolve().parents[2]

SIZE = 32
TINY = {"model": "vit_tiny_patch16_224", "size": SIZE,
        "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}}  # fmt: skip
QUIET = {"progress_bar": False, "tensorboard": False, "log_every": 1, "device": "cpu", "batch_size": 8}
CHEST_LABELS = ["Cardiomegaly", "Lung Opacity", "Pleural Effusion"]


# -- the model store, in process -------------------------------------------------------------------------
def _fake_checkpoint(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format": "xrayfm.checkpoint", "tag": tag}))
    return folder


def test_store_versions_promote_rollback(tmp_path: Path) -> None:
    store = tmp_path / "store"
    v1 = model_store.add_version(store, "m", _fake_checkpoint(tmp_path / "a", "a"), {"job_id": "j1"})
    v2 = model_store.add_version(store, "m", _fake_checkpoint(tmp_path / "b", "b"), {"job_id": "j2"})
    assert (v1, v2) == ("1", "2")
    assert json.loads((store / "models/m/2/meta.json").read_text())["tag"] == "b"
    with pytest.raises(XrayfmError, match="nothing to roll back"):
        model_store.rollback(store)
    model_store.promote(store, "m", "1")
    model_store.promote(store, "m", "2")
    rows = model_store.list_versions(store)
    assert [(r["version"], r["serving"], r["job_id"]) for r in rows] == [
        ("1", False, "j1"),
        ("2", True, "j2"),
    ]
    assert model_store.rollback(store) == {"name": "m", "version": "1"}
    assert model_store.serving(store) == {"name": "m", "version": "1"}
    with pytest.raises(XrayfmError, match="nothing to roll back"):
        model_store.rollback(store)
    with pytest.raises(XrayfmError, match="not in the store"):
        model_store.promote(store, "m", "9")


def test_spec_validation() -> None:
    from xrayfm_stack.spec import validate_spec

    good = validate_spec({"kind": "pretrain", "name": "fm", "config": {"kind": "chexpert", "root": "/x"}})
    assert good["config"]["root"] == "/x" and good["config"]["epochs"] == 10
    bad = [
        [],
        {"kind": "finetune", "config": {}},
        {"kind": "pretrain", "config": {"kind": "chexpert", "root": "/x", "epochs": 0}},
        {"kind": "pretrain", "config": {"kind": "chexpert", "root": "/x", "no_such_field": 1}},
        {"kind": "pretrain", "config": {"kind": "chexpert", "root": "/x", "out": "/etc"}},
        {"kind": "pretrain", "name": "../escape", "config": {"kind": "chexpert", "root": "/x"}},
        {"kind": "adapt", "config": {"kind": "mura", "root": "/x"}},  # no foundation
    ]
    for spec in bad:
        with pytest.raises(XrayfmError):
            validate_spec(spec)


def test_admin_key_is_not_the_prediction_key(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from xrayfm_gateway.app import create_app
    from xrayfm_stack.settings import GatewaySettings

    settings = GatewaySettings(api_keys=frozenset({"predict-key"}), admin_keys=frozenset({"admin-key"}),
                               model_store=tmp_path)  # fmt: skip
    with TestClient(create_app(settings)) as http:
        assert http.get("/models").status_code == 401
        assert http.get("/models", headers={"X-API-Key": "predict-key"}).status_code == 401
        answer = http.get("/models", headers={"X-API-Key": "admin-key"})
        assert answer.status_code == 200 and answer.json() == {"serving": None, "models": []}


# -- through the stack -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
@starts_processes
def training_stack(tmp_path_factory: pytest.TempPathFactory):
    """Private Redis + one training worker + the gateway; yields (client, store, data roots, stack)."""
    require_redis_server()
    from xrayfm.data.synth import synth_bone, synth_chest

    home = tmp_path_factory.mktemp("training-stack")
    chest, bone = home / "CheXpert-synth", home / "MURA-synth"
    synth_chest(chest, n=48, seed=1, size=SIZE, progress=False)
    synth_bone(bone, n=40, seed=2, size=SIZE, progress=False)
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    tag = uuid.uuid4().hex[:8]
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"xrayfm-test-{tag}",
        "XRAYFM_TRAINING_QUEUE": f"xrayfm-training-test-{tag}",
        "XRAYFM_MODEL_STORE": str(home / "store"),
        "XRAYFM_TRAINING_RUNS": str(home / "runs"),
        "XRAYFM_TRAINING_LOCK_TTL": "3",
        "XRAYFM_BOOTSTRAP": "off",  # the first-start flow has its own test
        "XRAYFM_TORCH_THREADS": "1",
        "XRAYFM_INSECURE_NO_AUTH": "1",
        "XRAYFM_DATA_DIRS": str(home),
    }
    launcher = stack_lib.Stack(home, env=env)
    try:
        launcher.start_redis(redis_port)
        launcher.start_training_worker()
        launcher.start_gateway(gateway_port)
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=30) as http:
            yield http, home / "store", {"chest": chest, "bone": bone}, launcher
    finally:
        launcher.stop_all()


def _logs(launcher) -> str:
    return "\n".join(p.log_tail(60) for p in launcher.procs)


def _wait(http: httpx.Client, job_id: str, until, timeout: float = 240.0, launcher=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/training/jobs/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stuck: {job}\n{_logs(launcher) if launcher else ''}")
        time.sleep(0.2)


def _pretrain_spec(root: Path, **config) -> dict:
    return {"kind": "pretrain", "name": "chest-fm", "config": {
        "kind": "chexpert", "root": str(root), "labels": CHEST_LABELS, "epochs": 1, "val_fraction": 0.25,
        **TINY, **QUIET, **config}}  # fmt: skip


def test_pretrain_then_lora_then_promote(training_stack) -> None:
    http, store, roots, launcher = training_stack
    answer = http.post("/training/jobs", json=_pretrain_spec(roots["chest"]))
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert answer.headers["Location"] == f"/training/jobs/{job_id}"
    assert job_id in [j["job_id"] for j in http.get("/training/jobs").json()["jobs"]]

    job = _wait(http, job_id, lambda j: j["status"] in ("done", "failed"), launcher=launcher)
    assert job["status"] == "done", job
    progress = job["progress"]
    assert progress["step"] == progress["total_steps"] >= 1 and progress["epoch"] == 0
    assert job["model"] == {"name": "chest-fm", "version": "1"}
    assert (store / "models/chest-fm/1/model.safetensors").is_file()

    # LoRA on the stored foundation: the adapter is stored alone and points at the store's foundation
    spec = {"kind": "adapt", "name": "bone-lora", "config": {
        "kind": "mura", "root": str(roots["bone"]), "foundation": "store:chest-fm/1", "method": "lora",
        "epochs": 1, "n_bootstrap": 10, **QUIET}}  # fmt: skip
    adapt_id = http.post("/training/jobs", json=spec).json()["job_id"]
    adapted = _wait(http, adapt_id, lambda j: j["status"] in ("done", "failed"), launcher=launcher)
    assert adapted["status"] == "done", adapted
    models = http.get("/models").json()
    rows = {(m["name"], m["version"]): m for m in models["models"]}
    lora = rows[("bone-lora", "1")]
    assert lora["format"] == "xrayfm.adapted" and lora["job_id"] == adapt_id
    assert lora["lineage"]["foundation"]["name"] == "chest-fm"
    assert lora["lineage"]["foundation"]["version"] == "1"
    assert not (store / "models/bone-lora/1/model.safetensors").exists()  # the adapter alone, not a copy
    meta = json.loads((store / "models/bone-lora/1/meta.json").read_text())
    assert meta["foundation"]["path"] == "../../chest-fm/1"  # relative: the store can move
    assert (store / "models/bone-lora/1" / meta["foundation"]["path"]).resolve() == (
        store / "models/chest-fm/1"
    ).resolve()
    assert rows[("chest-fm", "1")]["metrics"] is not None and rows[("chest-fm", "1")]["synthetic"]

    from xrayfm.models.checkpoint import load_any

    load_any(store / "models/bone-lora/1")  # loadable from the store: foundation found and verified
    moved = store.parent / "moved-store"
    shutil.copytree(store / "models", moved / "models")
    load_any(moved / "models/bone-lora/1")  # and from a copy of the store elsewhere

    # an evaluate job on the synthetic bone phantoms: recorded with the version, flagged synthetic
    evaluation = {"kind": "evaluate", "config": {"model": "store:bone-lora/1", "kind": "mura",
                  "root": str(roots["bone"]), "split": "valid", "n_bootstrap": 10, "progress_bar": False}}  # fmt: skip
    ev_id = http.post("/training/jobs", json=evaluation).json()["job_id"]
    ev = _wait(http, ev_id, lambda j: j["status"] in ("done", "failed"), launcher=launcher)
    assert ev["status"] == "done" and ev["name"] == "bone-lora", ev
    recorded = {(m["name"], m["version"]): m for m in http.get("/models").json()["models"]}
    [entry] = recorded[("bone-lora", "1")]["evaluations"]
    assert entry["job_id"] == ev_id and entry["synthetic"] is True and entry["value"] == ev["result"]["value"]

    assert http.post("/models/chest-fm/1/promote").json() == {"serving": {"name": "chest-fm", "version": "1"}}
    assert http.post("/models/bone-lora/1/promote").status_code == 200
    assert http.get("/models").json()["serving"] == {"name": "bone-lora", "version": "1"}
    assert http.post("/models/rollback").json()["serving"] == {"name": "chest-fm", "version": "1"}
    assert http.post("/models/nope/3/promote").status_code == 404
    assert entry["operating_points"]["Abnormal"]["image"][0]["rule"] == "youden"  # candidates to choose from

    # a small hyper-parameter search through the queue: its best trial is published with the study's lineage
    search = {"kind": "tune", "name": "bone-tuned", "config": {
        "kind": "mura", "root": str(roots["bone"]), "foundation": "store:chest-fm/1", "method": "lora",
        "trials": 3, "epochs": 1, "val_fraction": 0.25, "n_bootstrap": 10,
        "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "lora_rank": [4, 8]}, **QUIET}}  # fmt: skip
    answer = http.post("/training/jobs", json=search)
    assert answer.status_code == 202, answer.text
    tuned = _wait(http, answer.json()["job_id"], lambda j: j["status"] in ("done", "failed"), 600, launcher)
    assert tuned["status"] == "done" and tuned["model"] == {"name": "bone-tuned", "version": "1"}, tuned
    row = {(m["name"], m["version"]): m for m in http.get("/models").json()["models"]}[("bone-tuned", "1")]
    lineage = row["lineage"]
    assert lineage["tune"]["job_id"] == tuned["job_id"] and lineage["tune"]["trial"] in (0, 1, 2)
    assert set(lineage["tune"]["params"]) >= {"lr", "lora_rank"}
    assert lineage["foundation"]["name"] == "chest-fm" and row["format"] == "xrayfm.adapted"
    assert http.post("/models/bone-tuned/1/promote").status_code == 200


def test_malformed_spec_is_422_and_not_queued(training_stack) -> None:
    http, _, roots, _ = training_stack
    before = len(http.get("/training/jobs").json()["jobs"])
    for body in (b"not json", json.dumps({"kind": "pretrain", "config": {"epochs": 3}}).encode(),
                 json.dumps(_pretrain_spec(roots["chest"], lr=-1)).encode()):  # fmt: skip
        answer = http.post("/training/jobs", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == "invalid_spec" and answer.json()["detail"]
    assert len(http.get("/training/jobs").json()["jobs"]) == before
    assert http.post("/training/jobs", json={"kind": "adapt", "config": {
        "kind": "mura", "root": "/x", "foundation": "store:absent/1"}}).status_code == 422  # fmt: skip


def test_missing_dataset_fails_with_reason(training_stack) -> None:
    http, store, _, launcher = training_stack
    missing = store.parent / "no-such-dataset"
    job_id = http.post("/training/jobs", json=_pretrain_spec(missing)).json()["job_id"]
    job = _wait(http, job_id, lambda j: j["status"] in ("done", "failed"), launcher=launcher)
    assert job["status"] == "failed"
    assert "no-such-dataset" in job["error"]


def test_cancel_running_job(training_stack) -> None:
    http, store, roots, launcher = training_stack
    versions = len(http.get("/models").json()["models"])
    job_id = http.post("/training/jobs", json=_pretrain_spec(roots["chest"], epochs=500)).json()["job_id"]
    _wait(http, job_id, lambda j: (j.get("progress") or {}).get("step", 0) >= 1, launcher=launcher)
    answer = http.post(f"/training/jobs/{job_id}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] in ("cancelling", "cancelled")
    job = _wait(http, job_id, lambda j: j["status"] in ("cancelled", "done", "failed"), 60, launcher)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    assert len(http.get("/models").json()["models"]) == versions  # nothing published
    assert http.post(f"/training/jobs/{job_id}/cancel").status_code == 409
    assert http.get(f"/training/jobs/{uuid.uuid4()}").status_code == 404
