"""The UI's client of the gateway (httpx): readiness, predictions, the PACS router's studies, training jobs
and the model store; errors as readable messages."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from xrayfm_stack.protocol import Prediction, StudyList, StudyPrediction, StudyRecord
from xrayfm_stack.settings import FrontendSettings

T = TypeVar("T", bound=BaseModel)


class GatewayError(Exception):
    """The gateway refused or failed a request, or could not be reached; the message is for people.
    ``code`` is the gateway's error code (``out_of_domain``: the model cannot judge the image)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class GatewayClient:
    """Calls the gateway's /ready and /predict, and (with the admin key) its training and model endpoints."""

    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        self._client = httpx.Client(
            base_url=settings.gateway_url, headers=headers, timeout=settings.timeout_s
        )

    def ready(self) -> tuple[bool, str]:
        """(ready?, explanation)."""
        try:
            resp = self._client.get("/ready", timeout=5.0)
        except httpx.HTTPError as exc:
            return False, f"the gateway at {self.settings.gateway_url} does not answer ({type(exc).__name__})"
        body = _json(resp)
        return resp.status_code == 200 and bool(body.get("ready")), str(body.get("detail", resp.text[:200]))

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

    def feedback(self, job_id: str, verdict: str, label: str | None, comment: str | None) -> dict[str, Any]:
        """POST /feedback (with the prediction key); the stored record or a GatewayError."""
        body = {"job_id": job_id, "verdict": verdict, "label": label, "comment": comment or None}
        try:
            resp = self._client.post("/feedback", json={k: v for k, v in body.items() if v is not None})
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.settings.gateway_url}: {exc}") from None
        answer = _json(resp)
        if resp.status_code != 201:
            raise GatewayError(
                f"{answer.get('detail') or resp.text[:300]} (HTTP {resp.status_code})", resp.status_code
            )
        return answer

    def studies(self, limit: int = 50) -> list[StudyRecord]:
        """GET /studies (with the prediction key): the latest studies the PACS router handled, newest first."""
        try:
            resp = self._client.get("/studies", params={"limit": limit}, timeout=30.0)
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.settings.gateway_url}: {exc}") from None
        return _parsed(resp, StudyList).studies

    def _post_upload(self, path: str, explain: bool, method: str | None, files: Any, answer: type[T]) -> T:
        params: dict[str, Any] = {"explain": str(explain).lower()}
        if method:
            params["method"] = method
        try:
            resp = self._client.post(path, params=params, files=files)
        except httpx.TimeoutException:
            raise GatewayError(f"no answer within {self.settings.timeout_s:g} s; try again later") from None
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.settings.gateway_url}: {exc}") from None
        return _parsed(resp, answer)

    # -- training jobs and models (admin key) ---------------------------------------------------------
    def _admin(self, method: str, path: str, json_body: bool = False, **kwargs: Any) -> dict[str, Any]:
        """One admin call; returns the JSON answer or raises GatewayError with the gateway's message."""
        headers = {"X-API-Key": self.settings.admin_key} if self.settings.admin_key else {}
        if json_body:
            headers["Content-Type"] = "application/json"
        try:
            resp = self._client.request(method, path, headers=headers, timeout=30.0, **kwargs)
        except httpx.TimeoutException:
            raise GatewayError("the gateway did not answer within 30 s; try again later") from None
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.settings.gateway_url}: {exc}") from None
        body = _json(resp)
        if resp.status_code >= 400:
            detail = body.get("detail") or resp.text[:300]
            raise GatewayError(f"{detail} (HTTP {resp.status_code})", resp.status_code, body.get("error"))
        return body

    def submit_job(self, spec_text: str) -> dict[str, Any]:
        """POST the JSON spec as typed (the gateway checks it: a bad one answers 422 with the reason)."""
        return self._admin("POST", "/training/jobs", content=spec_text.encode(), json_body=True)

    def list_jobs(self) -> list[dict[str, Any]]:
        """The latest training jobs, newest first."""
        return list(self._admin("GET", "/training/jobs").get("jobs", []))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """One job's full record: status, spec, progress, result, model, error, attempts..."""
        return self._admin("GET", f"/training/jobs/{job_id}")

    def job_log(self, job_id: str, tail: int = 200) -> list[str]:
        """The last `tail` lines of a job's log, oldest first."""
        answer = self._admin("GET", f"/training/jobs/{job_id}/log", params={"tail": tail})
        return [str(line) for line in answer.get("lines", [])]

    def cancel_job(self, job_id: str) -> str:
        """Ask a job to stop; returns its new status."""
        return str(self._admin("POST", f"/training/jobs/{job_id}/cancel").get("status"))

    def list_models(self) -> dict[str, Any]:
        """``{"serving": {...} | None, "models": [...]}`` from the model store."""
        return self._admin("GET", "/models")

    def promote(self, name: str, version: str) -> dict[str, Any]:
        """Serve this version; returns the new serving reference."""
        return self._admin("POST", f"/models/{name}/{version}/promote")

    def set_operating_point(self, name: str, version: str, point: dict[str, Any] | None) -> dict[str, Any]:
        """Set the version's decision threshold (a threshold + source, or an evaluate job's candidate); None
        clears it. Returns the point now recorded."""
        path = f"/models/{name}/{version}/operating-point"
        if point is None:
            return self._admin("DELETE", path)
        return self._admin("PUT", path, content=json.dumps(point).encode(), json_body=True)

    def rollback(self) -> dict[str, Any]:
        """Serve the previously promoted version again."""
        return self._admin("POST", "/models/rollback")

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
    """A 200 answer as its protocol model; a GatewayError saying why otherwise."""
    body = _json(resp)
    if resp.status_code != 200:
        detail = body.get("detail") or resp.text[:300]
        raise GatewayError(f"{detail} (HTTP {resp.status_code})", resp.status_code, body.get("error"))
    try:
        return answer.model_validate(body)
    except ValidationError as exc:
        raise GatewayError(f"the gateway's answer does not follow the protocol: {exc}") from None
