"""Fixtures of the inference-stack tests: a tiny served model and ONE real stack shared by the session
(a private redis-server on a free port, a Celery worker, a uvicorn gateway), all real processes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import starts_processes
from tests.services.svc_helpers import RunningStack, start_stack

REPO = Path(__file__).resolve().parents[2]

MODEL_SIZE = 64
LABELS = ["Abnormal"]


def make_tiny_checkpoint(
    folder: Path, labels: list[str] = LABELS, size: int = MODEL_SIZE, **meta_extra
) -> Path:
    """The shared tiny checkpoint (tests/helpers.py) with this folder's default label and size."""
    return helpers.make_tiny_checkpoint(folder, labels, size, **meta_extra)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the served test model."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-vit")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Load a tiny checkpoint with the given labels (and metadata) as a ServedModel, in process."""
    from xrayfm.inference import load_served_model

    def make(labels: list[str], **meta):
        folder = make_tiny_checkpoint(tmp_path_factory.mktemp("served") / "m", labels=labels, **meta)
        return load_served_model(folder, device="cpu", name="m", version="1")

    return make


@pytest.fixture()
def records():
    """Training job records under a fresh key prefix in the machine's Redis (db 15); skipped without one."""
    import redis

    from xrayfm_stack.jobs import JobRecords

    jobs = JobRecords("redis://127.0.0.1:6379/15", f"xrayfm-test-{uuid.uuid4().hex[:8]}")
    try:
        jobs.redis.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield jobs
    for key in jobs.redis.scan_iter(f"{jobs.queue}*"):
        jobs.redis.delete(key)


@pytest.fixture(scope="session")
@starts_processes
def live_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """The session's shared stack (real Redis, Celery worker, uvicorn gateway)."""
    running = start_stack(tmp_path_factory.mktemp("stack"), tiny_model)
    yield running
    running.stack.stop_all()


@pytest.fixture()
def client(live_stack: RunningStack):
    with live_stack.client() as http:
        yield http
