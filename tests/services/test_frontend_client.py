"""The UI's client of the gateway (xrayfm_frontend.client) against a fake gateway (httpx.MockTransport): each
answer comes back as its protocol model, the gateway's ``{"error", "detail"}`` refusals as GatewayErrors
with its message, status and code, and an answer off the protocol as a GatewayError, not a crash."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from xrayfm_frontend.client import GatewayClient, GatewayError
from xrayfm_frontend.training_page import _model_rows
from xrayfm_stack.protocol import FeedbackAnswer, JobRecord, ModelList, ModelVersion, OperatingPointAnswer
from xrayfm_stack.settings import FrontendSettings

ADMIN_KEY, API_KEY = "admin-key", "staff-key"
Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, admin_key: str | None = ADMIN_KEY) -> GatewayClient:
    env = {"XRAYFM_GATEWAY_URL": "http://gateway.test", "XRAYFM_FRONTEND_API_KEY": API_KEY}
    if admin_key:
        env["XRAYFM_FRONTEND_ADMIN_KEY"] = admin_key
    return GatewayClient(FrontendSettings.from_env(env), transport=httpx.MockTransport(handler))


def test_admin_answers_are_typed_and_sent_with_the_admin_key() -> None:
    seen: list[httpx.Request] = []
    version = {"name": "m", "version": "2", "synthetic": True, "job_id": "job-2",
               "evaluations": [{"job_id": "job-e", "metric": "auroc", "value": 0.8}]}  # fmt: skip
    answers = {
        ("GET", "/models"): {"serving": {"name": "m", "version": "1"}, "models": [version]},
        ("GET", "/training/jobs"): {
            "jobs": [
                {"job_id": "j1", "status": "running", "attempts": 2, "model": {"name": "m", "version": "2"}}
            ]
        },  # fmt: skip
        ("GET", "/training/jobs/j1/log"): {"job_id": "j1", "lines": ["a", "b"]},
        ("POST", "/training/jobs/j1/cancel"): {"job_id": "j1", "status": "cancelling"},
        ("POST", "/training/jobs"): {"job_id": "j2", "status": "queued", "status_url": "/training/jobs/j2"},
        ("POST", "/models/rollback"): {"serving": {"name": "m", "version": "1"}},
        ("PUT", "/models/m/2/operating-point"): {
            "name": "m",
            "version": "2",
            "operating_point": {"threshold": 0.3, "source": "clinic"},
        },  # fmt: skip
    }

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=answers[request.method, request.url.path])

    client = client_for(gateway)
    models = client.list_models()
    assert isinstance(models, ModelList) and models.serving is not None and models.serving.version == "1"
    assert models.models[0].synthetic and models.models[0].evaluations[0]["value"] == 0.8
    [job] = client.list_jobs()
    assert isinstance(job, JobRecord) and job.attempts == 2 and job.model and job.model.version == "2"
    assert client.job_log("j1") == ["a", "b"] and client.cancel_job("j1") == "cancelling"
    assert client.submit_job('{"kind": "pretrain"}').job_id == "j2"
    assert client.rollback().serving.version == "1"
    point = client.set_operating_point("m", "2", {"threshold": 0.3, "source": "clinic"})
    assert isinstance(point, OperatingPointAnswer) and point.operating_point == {
        "threshold": 0.3,
        "source": "clinic",
    }
    assert {r.headers["X-API-Key"] for r in seen} == {ADMIN_KEY}
    submitted = next(r for r in seen if r.url.path == "/training/jobs" and r.method == "POST")
    assert submitted.content == b'{"kind": "pretrain"}'  # the spec as typed: the gateway judges it
    assert submitted.headers["Content-Type"] == "application/json"


def test_feedback_is_typed_and_sent_with_the_prediction_key() -> None:
    seen: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        return httpx.Response(201, json={"id": "f1", "model": {"name": "m", "version": "1"},
                                         "prediction": "Normal", "label": body.get("label", "Normal"), **body})  # fmt: skip

    saved = client_for(gateway).feedback("job-1", "disagree", "Pneumonia", "")
    assert isinstance(saved, FeedbackAnswer) and (saved.verdict, saved.label) == ("disagree", "Pneumonia")
    assert seen[0].headers["X-API-Key"] == API_KEY
    assert json.loads(seen[0].content) == {"job_id": "job-1", "verdict": "disagree", "label": "Pneumonia"}


@pytest.mark.parametrize(
    ("status", "body", "message", "code"),
    [
        (409, {"error": "nothing_to_roll_back", "detail": "no earlier promoted version"},
         "no earlier promoted version (HTTP 409)", "nothing_to_roll_back"),
        (502, "Bad Gateway from the proxy", "Bad Gateway from the proxy (HTTP 502)", None),
    ],
)  # fmt: skip
def test_refusals_keep_the_gateways_message_status_and_code(status, body, message, code) -> None:
    def gateway(request: httpx.Request) -> httpx.Response:
        if isinstance(body, dict):
            return httpx.Response(status, json=body)
        return httpx.Response(status, text=body)

    client = client_for(gateway)
    for call in (client.rollback, client.list_models, lambda: client.feedback("j", "agree", None, None)):
        with pytest.raises(GatewayError) as caught:
            call()
        assert str(caught.value) == message and caught.value.status == status and caught.value.code == code


def test_an_answer_off_the_protocol_is_an_error_not_a_crash() -> None:
    client = client_for(lambda request: httpx.Response(200, json={"jobs": [{"status": "done"}]}))  # no job_id
    with pytest.raises(GatewayError, match="does not follow the protocol"):
        client.list_jobs()


def test_a_timeout_and_an_unreachable_gateway_are_readable() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(GatewayError, match="did not answer within 30 s"):
        client_for(slow).list_models()

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(GatewayError, match="cannot reach the gateway at http://gateway.test"):
        client_for(down).studies()
    assert client_for(down).ready() == (
        False,
        "the gateway at http://gateway.test does not answer (ConnectError)",
    )


def test_readiness_from_the_answer_or_the_refusal() -> None:
    answers = {
        200: {"ready": True, "broker": "ok", "detail": "1 worker"},
        503: {"ready": False, "broker": "ok", "detail": "no worker with a loaded model"},
        401: {"error": "unauthorized", "detail": "missing API key"},
    }
    for status, body in answers.items():
        client = client_for(lambda request, status=status, body=body: httpx.Response(status, json=body))
        assert client.ready() == (status == 200, body["detail"])


@pytest.mark.parametrize(
    "lineage, cell",
    [
        ({"foundation": {"form": "version", "name": "fm", "version": "3"}}, "fm/3"),
        (
            {"foundation": {"form": "blob", "folder_sha256": "ab" * 32, "name": "xrayfm/cxr-vit-tiny-mae"}},
            f"xrayfm/cxr-vit-tiny-mae (sha256 {'ab' * 6})",
        ),
        (
            {"foundation": {"form": "blob", "folder_sha256": "cd" * 32, "name": None}},
            f"foundation (sha256 {'cd' * 6})",
        ),
        ({}, ""),
    ],
    ids=["store-version", "stored-by-content", "stored-without-a-name", "none"],
)
def test_the_models_table_names_each_form_of_foundation(lineage: dict, cell: str) -> None:
    (row,) = _model_rows([ModelVersion(name="m", version="1", lineage=lineage)])
    assert row["foundation"] == cell
