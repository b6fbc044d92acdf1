"""First start from an empty model store. By default (XRAYFM_BOOTSTRAP=shipped) the training worker installs
the shipped real-data model (LoRA on the MAE foundation) and /predict answers with it, not synthetic; with
`demo`/`quick` it trains, publishes and promotes the demo model on synthetic phantoms, /ready says what is
happening meanwhile, then /predict answers with it (synthetic).

Real Redis, a real Celery training worker, a real inference worker, real uvicorn; tiny sizes for the demo
(XRAYFM_BOOTSTRAP=quick: 32 px, 40 images, one epoch)."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from tests.services.svc_helpers import free_port, phantom, png_bytes, require_redis_server, stack_env
from xrayfm.errors import XrayfmError
from xrayfm_local import launcher as stack_lib
from xrayfm_stack import store as model_store
from xrayfm_stack.jobs import BootstrapState, JobRecords, describe_bootstrap
from xrayfm_stack.settings import TrainingSettings
from xrayfm_training.bootstrap import install_shipped, store_is_empty

SHIPPED = TrainingSettings().bootstrap_model


def test_shipped_is_the_default_and_names_a_shipped_adapter() -> None:
    from xrayfm.registry import list_pretrained, pretrained_dir

    settings = TrainingSettings.from_env({})
    assert settings.bootstrap == "shipped" and settings.bootstrap_model == SHIPPED
    assert SHIPPED in list_pretrained()
    meta = json.loads((pretrained_dir(SHIPPED) / "meta.json").read_text())
    assert meta["format"] == "xrayfm.adapted" and meta["foundation"]["path"] == "../cxr-vit-tiny-mae"
    assert not (meta.get("data") or {}).get("synthetic") and "Research use only" in meta["intended_use"]
    other = TrainingSettings.from_env({"XRAYFM_BOOTSTRAP": "demo", "XRAYFM_BOOTSTRAP_MODEL": "xrayfm/x"})
    assert (other.bootstrap, other.bootstrap_model) == ("demo", "xrayfm/x")
    with pytest.raises(XrayfmError, match="choose one of"):
        TrainingSettings.from_env({"XRAYFM_BOOTSTRAP": "train-it"})


def test_install_shipped_stores_the_adapter_with_its_foundation(tmp_path: Path) -> None:
    """The stored version loads from the store alone (its foundation stored once, by content, under
    foundations/) and predicts exactly what the shipped model predicts."""
    import torch

    from xrayfm.models.checkpoint import load_any

    store = tmp_path / "store"
    ref = install_shipped(store, SHIPPED)
    assert ref == {"name": SHIPPED.removeprefix("xrayfm/"), "version": "1"}
    names = sorted(v["name"] for v in model_store.list_versions(store))
    assert names == [ref["name"]]  # the foundation is a blob, not a version of its own
    folder = model_store.version_dir(store, ref["name"], ref["version"])
    assert json.loads((folder / "meta.json").read_text())["foundation"]["path"].startswith("../../")
    assert not list(store.glob(".publish-*"))  # staged in the store, then gone
    stored, meta = load_any(folder)
    shipped, _ = load_any(SHIPPED)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(stored(x), shipped(x))
    assert meta["labels"] == ["Pneumonia"]
    graphs = model_store.graphs_record(folder)  # exported on install; no data folder: int8 not measured
    assert (folder / "model.onnx").is_file() and (folder / "model.int8.onnx").is_file()
    assert graphs["int8"]["serve_int8"] is False and "not measured" in graphs["int8"]["reason"]


@pytest.mark.slow
def test_install_shipped_judges_int8_on_its_validation_images(tmp_path: Path, shared_data: Path) -> None:
    """With the Kermany train images in a data folder, the shipped model's own validation split (501
    images) is drawn again and int8 is judged on it: fp32 gives the AUROC its run recorded."""
    store = tmp_path / "store"
    ref = install_shipped(store, SHIPPED, (tmp_path / "elsewhere", shared_data))
    verdict = model_store.graphs_record(model_store.version_dir(store, ref["name"], ref["version"]))["int8"]
    from xrayfm.registry import pretrained_dir

    shipped_meta = json.loads((pretrained_dir(SHIPPED) / "meta.json").read_text())
    assert verdict["images"] == shipped_meta["data"]["val"]["images"] == 501
    assert verdict["fp32_auroc"] == pytest.approx(shipped_meta["metrics"]["mean_auroc"], abs=1e-6)
    assert verdict["serve_int8"] is (verdict["delta"] >= -0.005)


def test_describe_says_what_installing_the_shipped_model_does() -> None:
    text = describe_bootstrap({"mode": "shipped", "stage": "installing", "model": SHIPPED})
    assert text == f"bootstrapping: installing the shipped model {SHIPPED}"
    assert "SYNTHETIC" not in text


def test_describe_says_what_the_bootstrap_does() -> None:
    assert describe_bootstrap(None) is None and describe_bootstrap({"stage": "done"}) is None
    assert describe_bootstrap({"stage": "pretraining"}).startswith("bootstrapping: training the demo model")
    assert "SYNTHETIC" in describe_bootstrap({"stage": "adapting"})
    assert describe_bootstrap({"stage": "failed", "error": "DataError: boom"}).startswith(
        "bootstrap failed: DataError"
    )


def test_bootstrap_claimed_once_and_again_after_it_finished() -> None:
    import redis

    state = BootstrapState("redis://127.0.0.1:6379/15", f"xrayfm-test-{uuid.uuid4().hex[:8]}")
    try:
        state.redis.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    try:
        assert state.claim("quick") and not state.claim("quick")  # the first worker wins
        state.set(stage="pretraining")
        assert not state.claim("quick")  # under way
        for finished in ("done", "failed"):  # emptied store, or a failed one: a restart tries again
            state.set(stage=finished, error="x")
            assert state.claim("quick")
            assert state.get()["stage"] == "queued" and "error" not in state.get()
    finally:
        state.redis.delete(state.key)


@pytest.mark.slow
def test_first_start_serves_the_shipped_real_data_model(tmp_path: Path) -> None:
    """The default first start: no training job, the shipped adapter promoted within seconds, answers
    marked not synthetic with the research-use notice."""
    require_redis_server()
    store = tmp_path / "store"
    redis_port, gateway_port = free_port(), free_port()
    env = stack_env(redis_port, tmp_path / "unused", XRAYFM_MODEL_STORE=str(store),
                    XRAYFM_TRAINING_RUNS=str(tmp_path / "runs"),
                    XRAYFM_TRAINING_QUEUE=f"xrayfm-training-test-{uuid.uuid4().hex[:8]}")  # fmt: skip
    del env["XRAYFM_MODEL_PATH"]  # serve from the (empty) store
    launcher = stack_lib.Stack(tmp_path, env=env)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        launcher.start_redis(redis_port)
        launcher.start_training_worker()
        worker = launcher.start_worker()
        launcher.start_gateway(gateway_port)
        stack_lib.await_first_model(
            launcher, url, store, worker, timeout=180, say=lambda _l: None, restart_after=5
        )
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post("/predict", files={"file": ("x.png", png_bytes(phantom(80, 64)), "image/png")})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            model = body["model"]
            assert model["name"] == SHIPPED.removeprefix("xrayfm/") and model["synthetic"] is False, model
            assert "Research use only" in model["notice"] and model["labels"] == ["Pneumonia"]
            assert body["prediction"] in ("Pneumonia", "Normal") and body["attention_map"]
            assert http.get("/training/jobs").json()["jobs"] == []  # nothing was trained
            listed = {m["name"]: m for m in http.get("/models").json()["models"]}
            assert listed[model["name"]]["lineage"]["foundation"]["form"] == "blob"
        state = BootstrapState(env["XRAYFM_REDIS_URL"], env["XRAYFM_TRAINING_QUEUE"]).get()
        assert state["stage"] == "done" and state["mode"] == "shipped", state
    except BaseException:
        print("\n".join(f"--- {p.name}\n{p.log_tail(40)}" for p in launcher.procs))
        raise
    finally:
        launcher.stop_all()


@pytest.mark.slow
def test_first_start_trains_promotes_and_serves_the_demo_model(tmp_path: Path) -> None:
    require_redis_server()
    store = tmp_path / "store"
    assert store_is_empty(store)
    redis_port, gateway_port = free_port(), free_port()
    env = stack_env(redis_port, tmp_path / "unused", XRAYFM_MODEL_STORE=str(store),
                    XRAYFM_TRAINING_RUNS=str(tmp_path / "runs"), XRAYFM_BOOTSTRAP="quick",
                    XRAYFM_TRAINING_QUEUE=f"xrayfm-training-test-{uuid.uuid4().hex[:8]}",
                    XRAYFM_TRAINING_LOCK_TTL="5")  # fmt: skip
    del env["XRAYFM_MODEL_PATH"]  # serve from the (empty) store
    launcher = stack_lib.Stack(tmp_path, env=env)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        launcher.start_redis(redis_port)
        trainer = launcher.start_training_worker()
        worker = launcher.start_worker(concurrency=2)
        launcher.start_gateway(gateway_port)
        with httpx.Client(base_url=url, timeout=30) as http:
            # before the model exists: not ready, and the reason is the bootstrap
            stack_lib.wait_until(
                lambda: "bootstrapping" in stack_lib.http_json(f"{url}/ready")[1].get("detail", ""),
                60, "a bootstrapping /ready", trainer,
            )  # fmt: skip
            code, body = stack_lib.http_json(f"{url}/ready")
            assert code == 503 and body["ready"] is False, body
            image = png_bytes(phantom(40, 40))
            refused = http.post("/predict", files={"file": ("x.png", image, "image/png")})
            assert refused.status_code == 503, refused.text
            assert "bootstrapping" in refused.json()["detail"]

            worker = stack_lib.await_first_model(
                launcher, url, store, worker, timeout=300, say=lambda _line: None, restart_after=5
            )
            answer = http.post("/predict", files={"file": ("x.png", image, "image/png")})
            assert answer.status_code == 200, answer.text
            model = answer.json()["model"]
            assert model["name"] == "demo-bone-lora" and model["synthetic"] is True, model
            assert model.get("untrained") is not True

            jobs = http.get("/training/jobs").json()["jobs"]
            assert sorted((j["kind"], j["status"]) for j in jobs) == [("adapt", "done"), ("pretrain", "done")]
            state = BootstrapState(env["XRAYFM_REDIS_URL"], env["XRAYFM_TRAINING_QUEUE"]).get()
            assert state["stage"] == "done" and state["model"]["name"] == "demo-bone-lora"
            assert stack_lib.http_json(f"{url}/ready")[0] == 200

        # a second start of the training worker does not bootstrap again
        launcher.stop(trainer)
        launcher.start_training_worker(name="trainer2")
        stack_lib.wait_until(lambda: "ready" in (tmp_path / "logs/trainer2.log").read_text(), 60, "trainer2")
        with httpx.Client(base_url=url, timeout=30) as http:
            assert len(http.get("/training/jobs").json()["jobs"]) == 2
    except BaseException:
        print("\n".join(f"--- {p.name}\n{p.log_tail(40)}" for p in launcher.procs))
        raise
    finally:
        launcher.stop_all()


@pytest.mark.slow
def test_bootstrap_carries_on_after_its_worker_is_killed(tmp_path: Path) -> None:
    """The worker running the first-start bootstrap dies mid-job: the next training worker carries on with
    the same jobs (no duplicates) and the demo model is still promoted."""
    require_redis_server()
    store = tmp_path / "store"
    redis_port = free_port()
    env = stack_env(redis_port, tmp_path / "unused", XRAYFM_MODEL_STORE=str(store),
                    XRAYFM_TRAINING_RUNS=str(tmp_path / "runs"), XRAYFM_BOOTSTRAP="quick",
                    XRAYFM_TRAINING_QUEUE=f"xrayfm-training-test-{uuid.uuid4().hex[:8]}",
                    XRAYFM_TRAINING_LOCK_TTL="2")  # fmt: skip
    launcher = stack_lib.Stack(tmp_path, env=env)
    state = BootstrapState(env["XRAYFM_REDIS_URL"], env["XRAYFM_TRAINING_QUEUE"])
    try:
        launcher.start_redis(redis_port)
        records = JobRecords(env["XRAYFM_REDIS_URL"], env["XRAYFM_TRAINING_QUEUE"])
        trainer = launcher.start_training_worker()

        def training_in_progress() -> bool:
            current = state.get() or {}
            job = records.get(current.get("job_id") or "") if current.get("job_id") else None
            return current.get("stage") == "pretraining" and (job or {}).get("status") == "running"

        stack_lib.wait_until(training_in_progress, 120, "the bootstrap's pre-training job", trainer, 0.02)
        launcher.stop(trainer, signal.SIGKILL)
        interrupted = state.get()
        assert interrupted["stage"] == "pretraining", interrupted

        launcher.start_training_worker(name="trainer2")
        stack_lib.wait_until(lambda: (state.get() or {}).get("stage") in ("done", "failed"), 300, "the bootstrap",
                             launcher.procs[-1])  # fmt: skip
        final = state.get()
        assert final["stage"] == "done", final
        assert model_store.serving(store) == {"name": "demo-bone-lora", "version": "1"}
        jobs = records.list()
        assert sorted((j["kind"], j["status"]) for j in jobs) == [("adapt", "done"), ("pretrain", "done")]
        pretrain = next(j for j in jobs if j["kind"] == "pretrain")
        assert pretrain["job_id"] == interrupted["job_id"] and pretrain["attempts"] == 2
        assert [v["version"] for v in model_store.list_versions(store) if v["name"] == "demo-chest-fm"] == [
            "1"
        ]
    except BaseException:
        print("\n".join(f"--- {p.name}\n{p.log_tail(40)}" for p in launcher.procs))
        raise
    finally:
        launcher.stop_all()
