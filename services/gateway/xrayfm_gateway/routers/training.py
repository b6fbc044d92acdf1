"""Training jobs: submit / list / watch / cancel / delete.

Admin endpoints: when auth is on (``XRAYFM_API_KEYS`` or ``XRAYFM_ADMIN_KEYS`` set), they need one of the
``XRAYFM_ADMIN_KEYS`` in ``X-API-Key``; a prediction key is not enough. The job spec is checked here with
the training worker's own check (:func:`xrayfm_stack.spec.validate_spec`) before anything is queued: a
bad spec answers 422.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from xrayfm.errors import XrayfmError
from xrayfm_gateway.audit import AdminAuditDep, checked_name, job_target
from xrayfm_gateway.deps import SettingsDep, StoreDep, TrainingDep, require_admin_key
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.queue import QueueUnavailable
from xrayfm_stack.jobs import LOG_LINES, TERMINAL
from xrayfm_stack.protocol import (
    CancelAnswer,
    ErrorBody,
    JobList,
    JobLogTail,
    JobRecord,
    JobSpec,
    JobSubmitted,
)
from xrayfm_stack.spec import validate_spec

router = APIRouter(prefix="/training/jobs", tags=["training"], dependencies=[Depends(require_admin_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "an admin key is needed (when auth is on)"},
    503: {"model": ErrorBody, "description": "Redis unreachable, or the audit log cannot be written"},
}
UNKNOWN = {404: {"model": ErrorBody, "description": "unknown job"}}
SPEC_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": JobSpec.model_json_schema()}},
    }
}


def _job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise APIError(404, "unknown_job", "job ids are UUIDs; this one is not") from None


def _unavailable(exc: QueueUnavailable) -> APIError:
    return APIError(503, "queue_unavailable", str(exc), {"Retry-After": "5"})


async def _existing(training: TrainingDep, job_id: str) -> JobRecord:
    """The job's record, or 404."""
    try:
        job = await training.get(_job_id(job_id))
    except QueueUnavailable as exc:
        raise _unavailable(exc) from None
    if job is None:
        raise APIError(404, "unknown_job", f"no training job {job_id}")
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobSubmitted,
    responses={**ERRORS, 422: {"model": ErrorBody, "description": "the spec is not valid (says why)"}},
    openapi_extra=SPEC_BODY,
    summary="Queue a training job (JSON spec); 202 + job id",
)
async def submit_training_job(
    request: Request, training: TrainingDep, store: StoreDep, settings: SettingsDep, audit: AdminAuditDep
) -> JSONResponse:
    """Body: ``{"kind": "pretrain"|"adapt"|"evaluate", "name": "...", "config": {...}}``; 422 says what is
    wrong, including a path outside ``XRAYFM_DATA_DIRS``."""
    try:
        spec = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise APIError(422, "invalid_spec", f"the body is not JSON: {exc}") from None
    except RecursionError:  # the stdlib parser's own limit (~1,000 levels); validate_spec allows far fewer
        raise APIError(422, "invalid_spec", "the body is nested too deeply") from None
    try:
        spec = validate_spec(spec, store, settings.data_dirs)
    except XrayfmError as exc:
        raise APIError(422, "invalid_spec", str(exc)) from None
    action = "calibrate" if spec["kind"] == "calibrate" else "train_submit"
    await audit.requested(
        action=action, detail={"kind": spec["kind"], "name": checked_name(spec.get("name"))}
    )
    try:
        job_id = await training.submit(spec)
    except QueueUnavailable as exc:
        raise _unavailable(exc) from None
    await audit.ok(202, target=job_target(job_id))
    url = f"/training/jobs/{job_id}"
    body = JobSubmitted(job_id=job_id, status_url=url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})


@router.get("", response_model=JobList, responses=ERRORS, summary="The latest training jobs, newest first")
async def list_training_jobs(training: TrainingDep) -> JobList:
    try:
        return JobList(jobs=await training.list())
    except QueueUnavailable as exc:
        raise _unavailable(exc) from None


@router.get(
    "/{job_id}",
    response_model=JobRecord,
    response_model_exclude_unset=True,
    responses={**ERRORS, **UNKNOWN},
    summary="A job's status, progress, metrics, model and error",
)
async def training_job(job_id: str, training: TrainingDep) -> JobRecord:
    return await _existing(training, job_id)


@router.get(
    "/{job_id}/log",
    response_model=JobLogTail,
    responses={**ERRORS, **UNKNOWN},
    summary="The last lines of a job's log",
)
async def training_job_log(
    job_id: str, training: TrainingDep, tail: int = Query(200, ge=1, le=LOG_LINES, description="lines")
) -> JobLogTail:
    """Worker events, per-epoch progress and metrics, and the traceback of a failure (the whole log is
    ``job.log`` in the job's run folder)."""
    job = await _existing(training, job_id)
    try:
        return JobLogTail(job_id=job.job_id, lines=await training.log_tail(job.job_id, tail))
    except QueueUnavailable as exc:
        raise _unavailable(exc) from None


@router.post(
    "/{job_id}/cancel",
    response_model=CancelAnswer,
    responses={**ERRORS, **UNKNOWN, 409: {"model": ErrorBody, "description": "the job has already ended"}},
    summary="Ask a job to stop (cooperative)",
)
async def cancel_training_job(job_id: str, training: TrainingDep, audit: AdminAuditDep) -> CancelAnswer:
    job = await _existing(training, job_id)
    if job.status in TERMINAL:
        raise APIError(409, "job_finished", f"job {job.job_id} is already {job.status}")
    await audit.requested(detail={"kind": job.kind})
    try:
        status = await training.cancel(job.job_id)
    except QueueUnavailable as exc:
        raise _unavailable(exc) from None
    await audit.ok(detail={"kind": job.kind, "status": status})
    return CancelAnswer(job_id=job.job_id, status=status)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses={**ERRORS, **UNKNOWN, 409: {"model": ErrorBody, "description": "the job has not finished"}},
    summary="Delete a finished job's record and log (its run folder and published version stay)",
)
async def delete_training_job(job_id: str, training: TrainingDep, audit: AdminAuditDep) -> Response:
    """Only a done, failed or cancelled job (409 while it is queued or running: cancel it first)."""
    job_id = _job_id(job_id)
    await audit.requested()
    try:
        outcome = await training.delete(job_id)
    except QueueUnavailable as exc:
        raise _unavailable(exc) from None
    if outcome is None:
        raise APIError(404, "unknown_job", f"no training job {job_id}")
    status, deleted = outcome
    if not deleted:
        why = (
            "its worker is still wrapping it up; try again in a few seconds"
            if status in TERMINAL
            else "cancel it first, and delete it once it has ended"
        )
        raise APIError(409, "job_not_finished", f"job {job_id} is {status}: {why}")
    await audit.ok(204)
    return Response(status_code=204)
