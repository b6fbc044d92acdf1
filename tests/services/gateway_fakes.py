"""In-memory stand-ins for the gateway's queues (``app.dependency_overrides``): the in-process route tests
and the upload fuzzer run the real gateway with no Redis and no worker."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from xrayfm.data.images import shape_within
from xrayfm_gateway.app import create_app
from xrayfm_gateway.deps import get_queue, get_training
from xrayfm_gateway.queue import JobState, QueueUnavailable
from xrayfm_stack.protocol import (
    PROTOCOL_VERSION,
    JobRecord,
    ModelInfo,
    ModelMap,
    PredictRequest,
    StudyAnswer,
    Timings,
    WorkerAnswer,
)
from xrayfm_stack.settings import GatewaySettings

MODEL = ModelInfo(name="m", version="1", sha256="0" * 64, labels=["Abnormal"], input_size=64, device="cpu")
READY_WORKER = {"hostname": "w1", "ready": True, "model": MODEL.model_dump(), "protocol": PROTOCOL_VERSION}


def _model_map(image_shape: tuple[int, int]) -> ModelMap:
    """As the worker sends it: a 4 x 4 map, hot on the left, to draw at most 256 px on the long side."""
    heat = np.zeros((4, 4), np.float32)
    heat[:, :2] = 1.0
    return ModelMap.from_array(heat, 64, "pad", shape_within(image_shape, 256))


class FakeQueue:
    """An in-memory inference queue: answers each request with `reply(request)` (or its state)."""

    def __init__(self, workers: list[dict] | None = None) -> None:
        self.workers_list = [READY_WORKER] if workers is None else workers
        self.jobs: dict[str, tuple[PredictRequest, dict[str, Any]]] = {}
        self.next_state: JobState | None = None  # what every job ends as (default: a real-looking answer)
        self.down = False  # Redis unreachable
        self.kept: dict[str, bytes] = {}  # images kept for feedback (XRAYFM_FEEDBACK_KEEP_IMAGES)
        self.inputs: dict[str, list[bytes]] = {}

    def _check(self) -> None:
        if self.down:
            raise QueueUnavailable("Redis unreachable: connection refused")

    async def workers(self, fresh: bool = False) -> list[dict[str, Any]]:
        self._check()
        return self.workers_list

    async def submit(
        self, request: PredictRequest | list[PredictRequest], record: dict[str, Any], inputs: list[bytes]
    ) -> str:
        self._check()
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = (request, record)
        self.inputs[job_id] = inputs  # the raw images, as the job's inputs key holds them
        return job_id

    async def keep_pixels(self, job_id: str, png: bytes) -> None:
        self._check()
        self.kept[job_id] = png

    async def pixels(self, job_id: str) -> bytes | None:
        self._check()
        return self.kept.get(job_id)

    async def record(self, job_id: str) -> dict[str, Any] | None:
        self._check()
        return self.jobs[job_id][1] if job_id in self.jobs else None

    async def state(self, job_id: str) -> JobState:
        self._check()
        if self.next_state is not None:
            return self.next_state
        if job_id not in self.jobs:
            return JobState("queued")  # as the result backend: no result key yet (or any more)
        request, _ = self.jobs[job_id]
        stored = self.inputs[job_id]
        if isinstance(request, list):  # a study: each image answered, the mean decides (as the worker does)
            images = [self._answer(r, 0.2 + 0.3 * k, stored[k]) for k, r in enumerate(request)]
            mean = sum(a.probability for a in images) / len(images)
            study = StudyAnswer(prediction="Abnormal" if mean >= 0.5 else "Normal", probability=mean,
                                probabilities={"Abnormal": mean}, aggregation="mean (fake)", model=MODEL, images=images)  # fmt: skip
            return JobState("done", result=study)
        return JobState("done", result=self._answer(request, 0.75, stored[0]))

    @staticmethod
    def _answer(request: PredictRequest, p: float, stored: bytes) -> WorkerAnswer:
        image = request.image(stored)  # the pixels the gateway sent decode exactly
        return WorkerAnswer(
            prediction="Abnormal" if p >= 0.5 else "Normal",
            probability=p,
            probabilities={"Abnormal": p},
            model_map=_model_map(image.shape) if request.explain else None,
            explain_method=request.method if request.explain else None,
            model=MODEL,
            timings=Timings(inference_ms=3.0, queue_wait_ms=1.0),
            worker=f"fake ({image.shape[1]}x{image.shape[0]})",
        )

    async def wait(self, job_id: str, timeout: float) -> JobState:
        return await self.state(job_id)

    async def close(self) -> None:
        pass


class FakeRecords:
    """What /metrics reads from the job records: here Redis is down, so the training series are left out."""

    class _Redis:
        def __getattr__(self, name: str) -> Any:
            def fail(*_args: Any, **_kwargs: Any) -> Any:
                raise RedisConnectionError("connection refused")

            return fail

    redis = _Redis()
    index_key = "q:tjobs"


class FakeTraining:
    """An in-memory training queue."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[str]] = {}
        self.records = FakeRecords()
        self.bootstrap: str | None = None
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise QueueUnavailable("Redis unreachable: connection refused")

    async def submit(self, spec: dict[str, Any]) -> str:
        self._check()
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = {"job_id": job_id, "status": "queued", "kind": spec["kind"], "name": spec["name"],
                             "spec": spec, "attempts": 0}  # fmt: skip
        self.logs[job_id] = ["queued"]
        return job_id

    async def list(self):
        self._check()
        return [
            JobRecord.model_validate({k: v for k, v in j.items() if k != "spec"}) for j in self.jobs.values()
        ]

    async def get(self, job_id: str):
        self._check()
        return JobRecord.model_validate(self.jobs[job_id]) if job_id in self.jobs else None

    async def log_tail(self, job_id: str, lines: int) -> list[str]:
        self._check()
        return self.logs[job_id][-lines:]

    async def cancel(self, job_id: str) -> str:
        self._check()
        self.jobs[job_id]["status"] = "cancelled"
        return "cancelled"

    async def bootstrap_detail(self) -> str | None:
        self._check()
        return self.bootstrap


def gateway_client(queue: FakeQueue, training: FakeTraining, **settings: Any) -> TestClient:
    """A TestClient of the real gateway app whose queues are `queue` and `training` (its audit log in a
    temporary folder unless `audit_log` is given)."""
    settings.setdefault("audit_log", Path(tempfile.mkdtemp(prefix="xrayfm-audit-")) / "audit.jsonl")
    app = create_app(GatewaySettings(**settings))
    app.dependency_overrides[get_queue] = lambda: queue
    app.dependency_overrides[get_training] = lambda: training
    return TestClient(app)
