"""The UI's client of the gateway (httpx): readiness, predictions, the PACS router's studies, training jobs
and the model store, each answer parsed into its protocol model; errors as readable messages."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from xrayfm_stack.protocol import (
    CancelAnswer,
    FeedbackAnswer,
    JobList,
    JobLogTail,
    JobRecord,
    JobSubmitted,
    ModelList,
    OperatingPointAnswer,
    Prediction,
    Readiness,
    ServingAnswer,
    StudyList,
    StudyPrediction,
    StudyRecord,
)
from xrayfm_stack.settings import FrontendSettings

T = TypeVar("T", bound=BaseModel)

READY_TIMEOUT_S = 5.0  # the sidebar's readiness probe
ADMIN_TIMEOUT_S = 30.0  # the training, model and studies calls


class GatewayError(Exception):
    """The gateway refused or failed a request, or could not be reached; the message is for people.
    ``code`` is the gateway's error code (``out_of_domain``: the model cannot judge the image)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class GatewayClient:
    """Calls the gateway's /ready and /predict, and (with the admin key) its training and model endpoints."""

    def __init__(self, settings: FrontendSettings, transport: httpx.BaseTransport | None = None) -> None:
        """`transport`: httpx's (None: the network; tests pass an ``httpx.MockTransport``)."""
        self.settings = settings
        headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        self._client = httpx.Client(
            base_url=settings.gateway_url, headers=headers, timeout=settings.timeout_s, transport=transport
        )

    def ready(self) -> tuple[bool, str]:
        """(ready?, explanation)."""
        try:
            resp = self._client.get("/ready", timeout=READY_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return False, f"the gateway at {self.settings.gateway_url} does not answer ({type(exc).__name__})"
        try:
            readiness = Readiness.model_validate(resp.json())
        except (ValueError, ValidationError):  # not JSON, or a refusal ({"error", "detail"})
            return False, str(_json(resp).get("detail", resp.text[:200]))
        return resp.status_code == 200 and readiness.ready, readiness.detail

    def predict(
        self, data: bytes, filename: str, explain: bool = True, method: str | None = None
    ) -> Prediction:
        """POST the file to /predict; returns the answer or raises GatewayError with the gateway's message."""
        return self._post_upload("/predict", explain, method, {"file": (filename, data)}, Prediction)

    def predict_study(
        self, images: list[tuple[str, bytes]], explain: bool = True, method: str | None = None
    ) -> StudyPrediction:
        """POST the images of one study (name, bytes) to /predict/study; the answer or a GatewayError."""
        files = [("files", (name, data)) for name, data in images]
        return self._post_upload("/predict/study", explain, method, files, StudyPrediction)

    def feedback(self, job_id: str, verdict: str, label: str | None, comment: str | None) -> FeedbackAnswer:
        """POST /feedback (with the prediction key); the stored record or a GatewayError."""
        body = {"job_id": job_id, "verdict": verdict, "label": label, "comment": comment or None}
        payload = {k: v for k, v in body.items() if v is not None}
        return self._call("POST", "/feedback", FeedbackAnswer, json=payload)

    def studies(self, limit: int = 50) -> list[StudyRecord]:
        """GET /studies (with the prediction key): the latest studies the PACS router handled, newest first."""
        answer = self._call("GET", "/studies", StudyList, timeout=ADMIN_TIMEOUT_S, params={"limit": limit})
        return answer.studies

    def _post_upload(self, path: str, explain: bool, method: str | None, files: Any, answer: type[T]) -> T:
        params: dict[str, Any] = {"explain": str(explain).lower()}
        if method:
            params["method"] = method
        return self._call("POST", path, answer, params=params, files=files)

    def _call(
        self,
        method: str,
        path: str,
        answer: type[T],
        *,
        admin: bool = False,
        timeout: float | None = None,
        body: bytes | None = None,
        **kwargs: Any,
    ) -> T:
        """One request; its answer as `answer`, or a GatewayError with the gateway's message. `admin` sends
        the admin key (when set); `body` is sent as JSON exactly as given (the gateway judges it)."""
        headers = {"X-API-Key": self.settings.admin_key} if admin and self.settings.admin_key else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
            kwargs["content"] = body
        limit = self.settings.timeout_s if timeout is None else timeout
        try:
            resp = self._client.request(method, path, headers=headers, timeout=limit, **kwargs)
        except httpx.TimeoutException:
            raise GatewayError(f"the gateway did not answer within {limit:g} s; try again later") from None
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.settings.gateway_url}: {exc}") from None
        return _parsed(resp, answer)

    # -- training jobs and models (admin key) ---------------------------------------------------------
    def _admin(self, method: str, path: str, answer: type[T], **kwargs: Any) -> T:
        """One admin call (the admin key, 30 s); its answer as `answer`, or a GatewayError."""
        return self._call(method, path, answer, admin=True, timeout=ADMIN_TIMEOUT_S, **kwargs)

    def submit_job(self, spec_text: str) -> JobSubmitted:
        """POST the JSON spec as typed (the gateway checks it: a bad one answers 422 with the reason)."""
        return self._admin("POST", "/training/jobs", JobSubmitted, body=spec_text.encode())

    def list_jobs(self) -> list[JobRecord]:
        """The latest training jobs, newest first."""
        return self._admin("GET", "/training/jobs", JobList).jobs

    def get_job(self, job_id: str) -> JobRecord:
        """One job's full record: status, spec, progress, result, model, error, attempts..."""
        return self._admin("GET", f"/training/jobs/{job_id}", JobRecord)

    def job_log(self, job_id: str, tail: int = 200) -> list[str]:
        """The last `tail` lines of a job's log, oldest first."""
        return self._admin("GET", f"/training/jobs/{job_id}/log", JobLogTail, params={"tail": tail}).lines

    def cancel_job(self, job_id: str) -> str:
        """Ask a job to stop; returns its new status."""
        return self._admin("POST", f"/training/jobs/{job_id}/cancel", CancelAnswer).status

    def list_models(self) -> ModelList:
        """The served version (None: nothing promoted) and every version in the model store."""
        return self._admin("GET", "/models", ModelList)

    def promote(self, name: str, version: str) -> ServingAnswer:
        """Serve this version; returns the new serving reference."""
        return self._admin("POST", f"/models/{name}/{version}/promote", ServingAnswer)

    def set_operating_point(
        self, name: str, version: str, point: dict[str, Any] | None
    ) -> OperatingPointAnswer:
        """Set the version's decision threshold (a threshold + source, or an evaluate job's candidate); None
        clears it. Returns the point now recorded."""
        path = f"/models/{name}/{version}/operating-point"
        if point is None:
            return self._admin("DELETE", path, OperatingPointAnswer)
        return self._admin("PUT", path, OperatingPointAnswer, body=json.dumps(point).encode())

    def rollback(self) -> ServingAnswer:
        """Serve the previously promoted version again; returns the serving reference."""
        return self._admin("POST", "/models/rollback", ServingAnswer)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _parsed(resp: httpx.Response, answer: type[T]) -> T:
    """A success (2xx) as its protocol model; a GatewayError saying why otherwise (the gateway's
    ``{"error", "detail"}``: its detail and HTTP status in the message, its error code as ``code``)."""
    body = _json(resp)
    if not resp.is_success:
        detail = body.get("detail") or resp.text[:300]
        raise GatewayError(f"{detail} (HTTP {resp.status_code})", resp.status_code, body.get("error"))
    try:
        return answer.model_validate(body)
    except ValidationError as exc:
        raise GatewayError(f"the gateway's answer does not follow the protocol: {exc}") from None
