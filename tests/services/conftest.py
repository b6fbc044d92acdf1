"""Fixtures of the inference-stack tests: a tiny served model and ONE real stack shared by the session
(a private redis-server on a free port, a Celery worker, a uvicorn gateway), all real processes."""

from __future__ import annotations

import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
for _path in (
    "tests/services",
    "scripts",
    "shared/src",
    "services/inference",
    "services/training",
    "services/gateway",
    "services/frontend",
):
    if str(REPO / _path) not in sys.path:
        sys.path.insert(0, str(REPO / _path))

import helpers  # noqa: E402  (tests/helpers.py)
import stack as stack_lib  # noqa: E402  (scripts/stack.py: the launcher `make up` uses too)
from svc_helpers import stack_env  # noqa: E402

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


@dataclass
class RunningStack:
    """A started stack: its launcher, URLs and settings."""

    stack: stack_lib.Stack
    redis_url: str
    queue: str
    gateway_url: str
    worker_metrics_url: str
    env: dict[str, str]
    worker: stack_lib.Proc
    gateway: stack_lib.Proc

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, timeout=60, **kwargs)

    def wait_ready(self, timeout: float = 90) -> None:
        stack_lib.wait_until(
            lambda: stack_lib.http_json(f"{self.gateway_url}/ready")[0] == 200, timeout, "/ready", self.worker
        )

    def restart_worker(self) -> stack_lib.Proc:
        """Start a fresh worker (after a test killed the previous one) and wait until it is ready."""
        self.worker = self.stack.start_worker(name=f"worker-{uuid.uuid4().hex[:6]}")
        self.wait_ready()
        return self.worker


def start_stack(home: Path, model: Path, **extra: str) -> RunningStack:
    """Private Redis + worker + gateway; the caller stops it with `.stack.stop_all()`."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    env = stack_env(redis_port, model, **extra)
    launcher = stack_lib.Stack(home, env=env)
    try:
        launcher.start_redis(redis_port)
        worker = launcher.start_worker()
        gateway = launcher.start_gateway(gateway_port)
        running = RunningStack(
            stack=launcher,
            redis_url=env["XRAYFM_REDIS_URL"],
            queue=env["XRAYFM_QUEUE"],
            gateway_url=f"http://127.0.0.1:{gateway_port}",
            worker_metrics_url=f"http://127.0.0.1:{env['XRAYFM_WORKER_METRICS_PORT']}/metrics",
            env=env,
            worker=worker,
            gateway=gateway,
        )
        running.wait_ready()
    except BaseException:
        launcher.stop_all()
        raise
    return running


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """The session's shared stack (real Redis, Celery worker, uvicorn gateway)."""
    running = start_stack(tmp_path_factory.mktemp("stack"), tiny_model)
    yield running
    running.stack.stop_all()


@pytest.fixture()
def client(live_stack: RunningStack):
    with live_stack.client() as http:
        yield http
