"""Training jobs and the model store: submit / list / watch / cancel jobs, list / promote / roll back models.

Admin endpoints: when auth is on (``XRAYFM_API_KEYS`` or ``XRAYFM_ADMIN_KEYS`` set), they need one of the
``XRAYFM_ADMIN_KEYS`` in ``X-API-Key``; a prediction key is not enough. The job spec is checked here
with the worker's own check (xrayfm_training.spec) before anything is queued: a bad spec answers 422.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from redis.exceptions import RedisError

from xrayfm.errors import XrayfmError
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.security import API_KEY_HEADER, get_settings
from xrayfm_gateway.settings import GatewaySettings
from xrayfm_inference import store as model_store
from xrayfm_training.celery_app import make_celery, submit
from xrayfm_training.jobs import LOG_LINES, TERMINAL, JobRecords
from xrayfm_training.settings import TrainingSettings
from xrayfm_training.spec import validate_spec

_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="an admin key (XRAYFM_ADMIN_KEYS)")


def require_admin_key(
    key: str | None = Depends(_header), settings: GatewaySettings = Depends(get_settings)
) -> None:
    """401 unless auth is off or ``X-API-Key`` holds one of the admin keys (constant-time compare)."""
    if not (settings.api_keys or settings.admin_keys):
        return
    given = (key or "").encode()
    matched = [secrets.compare_digest(given, k.encode()) for k in settings.admin_keys]
    if not any(matched):
        raise APIError(401, "unauthorized", f"an admin key is needed in the {API_KEY_HEADER} header",
                       headers={"WWW-Authenticate": API_KEY_HEADER})  # fmt: skip


router = APIRouter(tags=["training"], dependencies=[Depends(require_admin_key)])


class _Training:
    """The gateway's handle on the training queue (made on first use)."""

    def __init__(self) -> None:
        self.settings = TrainingSettings.from_env()
        self.celery = make_celery(self.settings)
        self.records = JobRecords(self.settings.redis_url, self.settings.queue)


def _training(request: Request) -> _Training:
    if getattr(request.app.state, "training", None) is None:
        request.app.state.training = _Training()
    return request.app.state.training


async def _call(fn, *args: Any) -> Any:
    """Run a blocking Redis call in a thread; Redis down answers 503."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except (RedisError, OSError) as exc:
        raise APIError(503, "queue_unavailable", f"Redis unreachable: {exc}") from None


def _job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise APIError(404, "unknown_job", "job ids are UUIDs; this one is not") from None


@router.post("/training/jobs", status_code=202, summary="Queue a training job (JSON spec); 202 + job id")
async def submit_training_job(
    request: Request, settings: GatewaySettings = Depends(get_settings)
) -> JSONResponse:
    """Body: ``{"kind": "pretrain"|"adapt", "name": "...", "config": {...}}``; 422 says what is wrong."""
    try:
        spec = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise APIError(422, "invalid_spec", f"the body is not JSON: {exc}") from None
    try:
        spec = validate_spec(spec, settings.model_store)
    except XrayfmError as exc:
        raise APIError(422, "invalid_spec", str(exc)) from None
    training = _training(request)
    job_id = await _call(training.records.create, spec)
    await _call(submit, training.celery, training.settings, job_id)
    url = f"/training/jobs/{job_id}"
    body = {"job_id": job_id, "status": "queued", "status_url": url}
    return JSONResponse(body, status_code=202, headers={"Location": url})


@router.get("/training/jobs", summary="The latest training jobs, newest first")
async def list_training_jobs(request: Request) -> dict[str, Any]:
    return {"jobs": await _call(_training(request).records.list)}


@router.get("/training/jobs/{job_id}", summary="A job's status, progress, metrics, model and error")
async def training_job(job_id: str, request: Request) -> dict[str, Any]:
    job = await _call(_training(request).records.get, _job_id(job_id))
    if job is None:
        raise APIError(404, "unknown_job", f"no training job {job_id}")
    return job


@router.get("/training/jobs/{job_id}/log", summary="The last lines of a job's log")
async def training_job_log(
    job_id: str, request: Request, tail: int = Query(200, ge=1, le=LOG_LINES, description="lines")
) -> dict[str, Any]:
    """Worker events, per-epoch progress and metrics, and the traceback of a failure (the whole log is
    ``job.log`` in the job's run folder)."""
    records = _training(request).records
    job_id = _job_id(job_id)
    if await _call(records.get, job_id) is None:
        raise APIError(404, "unknown_job", f"no training job {job_id}")
    return {"job_id": job_id, "lines": await _call(records.log_tail, job_id, tail)}


@router.post("/training/jobs/{job_id}/cancel", summary="Ask a job to stop (cooperative)")
async def cancel_training_job(job_id: str, request: Request) -> dict[str, Any]:
    records = _training(request).records
    job_id = _job_id(job_id)
    job = await _call(records.get, job_id)
    if job is None:
        raise APIError(404, "unknown_job", f"no training job {job_id}")
    if job["status"] in TERMINAL:
        raise APIError(409, "job_finished", f"job {job_id} is already {job['status']}")
    return {"job_id": job_id, "status": await _call(records.request_cancel, job_id)}


@router.get("/models", summary="Model versions in the store, with metrics and lineage")
async def list_models(settings: GatewaySettings = Depends(get_settings)) -> dict[str, Any]:
    try:
        versions = await anyio.to_thread.run_sync(model_store.list_versions, settings.model_store)
        serving = await anyio.to_thread.run_sync(model_store.serving, settings.model_store)
    except XrayfmError as exc:
        raise APIError(500, "store_unreadable", str(exc)) from None
    return {"serving": serving, "models": versions}


@router.post("/models/{name}/{version}/promote", summary="Serve this version")
async def promote_model(name: str, version: str, settings: GatewaySettings = Depends(get_settings)) -> dict:
    try:
        model_store.version_dir(settings.model_store, name, version)
    except XrayfmError as exc:
        raise APIError(422, "invalid_name", str(exc)) from None
    try:
        await anyio.to_thread.run_sync(model_store.promote, settings.model_store, name, version)
    except XrayfmError as exc:
        raise APIError(404, "unknown_model", str(exc)) from None
    return {"serving": {"name": name, "version": version}}


@router.post("/models/rollback", summary="Serve the previously promoted version again")
async def rollback_model(settings: GatewaySettings = Depends(get_settings)) -> dict:
    try:
        serving = await anyio.to_thread.run_sync(model_store.rollback, settings.model_store)
    except XrayfmError as exc:
        raise APIError(409, "nothing_to_roll_back", str(exc)) from None
    return {"serving": serving}
