"""One error shape: every gateway error answers ``{"error": code, "detail": message}`` (the Open Inference
Protocol routes their own ``{"error": ...}``), each exception type rendered by one handler registered in
``create_app``: a request that fails validation, and a lost Redis whichever router met it."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput

from tests.services.gateway_fakes import FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import phantom, png_bytes
from xrayfm_gateway.queue import QueueUnavailable

PNG = png_bytes(phantom(96, 80))


class SubmitFails(FakeQueue):
    """Workers answer their heartbeats, but Redis goes away as a request is queued."""

    async def submit(self, *args, **kwargs) -> str:
        raise QueueUnavailable("cannot queue the request: connection reset")


class Training(FakeTraining):
    """The fake training queue, with the PACS router's list of studies (empty)."""

    async def studies(self, prefix: str, limit: int) -> list:
        self._check()
        return []


def _shape(response, status: int, code: str) -> dict:
    """The body of an error answer: exactly ``error`` and ``detail``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"], body
    return body


@pytest.fixture()
def fakes() -> tuple[FakeQueue, FakeTraining]:
    return FakeQueue(), Training()


@pytest.fixture()
def http(fakes, tmp_path: Path):
    with gateway_client(*fakes, model_store=tmp_path / "store", insecure_no_auth=True) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "where"),
    [
        ("post", "/predict?method=lime", "query.method"),
        ("post", "/predict/study?explain=maybe", "query.explain"),
        ("get", f"/training/jobs/{uuid.uuid4()}/log?tail=0", "query.tail"),
        ("get", "/studies?limit=0", "query.limit"),
    ],
)
def test_a_request_failing_validation_is_422_in_the_one_shape(http, method, path, where):
    upload = {"file": ("x.png", PNG, "image/png")}
    response = http.post(path, files=upload) if method == "post" else http.get(path)
    body = _shape(response, 422, "bad_request")
    assert body["detail"].startswith(where), body  # where and why, never the input


def test_a_lost_redis_is_503_in_the_one_shape_from_every_router(http, fakes):
    queue, training = fakes
    job = http.post("/jobs", files={"file": ("x.png", PNG, "image/png")}).json()["job_id"]
    queue.down = training.down = True
    answers = {
        "jobs": http.get(f"/jobs/{job}"),
        "feedback": http.post("/feedback", json={"job_id": job, "verdict": "agree"}),
        "training": http.get("/training/jobs"),
        "training log": http.get(f"/training/jobs/{uuid.uuid4()}/log"),
        "studies": http.get("/studies"),
    }
    for router, response in answers.items():
        body = _shape(response, 503, "queue_unavailable")
        assert "Redis unreachable" in body["detail"], (router, body)
        assert response.headers["Retry-After"] == "5", router  # every 503 of a lost Redis says when to retry


def test_redis_lost_while_queueing_is_503_in_each_protocols_shape(tmp_path):
    with gateway_client(SubmitFails(), FakeTraining(), model_store=tmp_path / "store") as http:
        body = _shape(
            http.post("/predict", files={"file": ("x.png", PNG, "image/png")}), 503, "queue_unavailable"
        )
        assert "cannot queue the request" in body["detail"]
        tensor = InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([PNG], dtype=np.object_), binary_data=True)
        request, json_size = InferenceServerClient.generate_request_body([tensor])
        v2 = http.post(
            "/v2/models/m/infer", content=request, headers={"Inference-Header-Content-Length": str(json_size)}
        )
    assert v2.status_code == 503 and v2.headers["Retry-After"] == "5", v2.text
    assert list(v2.json()) == ["error"] and v2.json()["error"].startswith("queue_unavailable: cannot queue")
