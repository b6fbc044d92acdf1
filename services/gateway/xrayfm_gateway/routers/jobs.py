"""The asynchronous form: ``POST /jobs`` (202 + job id), ``GET /jobs/{job_id}`` to poll."""

from __future__ import annotations

import uuid

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from xrayfm_gateway.audit import audit_prediction
from xrayfm_gateway.deps import QueueDep, require_api_key
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.queue import QueueUnavailable
from xrayfm_gateway.routers.predict import (
    ERRORS,
    IN_PROGRESS,
    UPLOAD_BODY,
    UploadDepsDep,
    prediction_from,
    queue_upload,
)
from xrayfm_stack.protocol import ErrorBody, ExplainMethod, JobStatus, JobSubmitted

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])


@router.post(
    "",
    status_code=202,
    response_model=JobSubmitted,
    responses={k: v for k, v in ERRORS.items() if k != 504},
    openapi_extra=UPLOAD_BODY,
    summary="Submit a radiograph; answers 202 with a job id at once",
)
async def submit_job(
    request: Request,
    deps: UploadDepsDep,
    explain: bool = Query(True, description="false skips the heatmap"),
    method: ExplainMethod | None = Query(None, description="heatmap method (default: XRAYFM_EXPLAIN_METHOD)"),
) -> JSONResponse:
    """Same input as ``POST /predict``; the result waits in Redis until ``XRAYFM_RESULT_EXPIRES``."""
    with IN_PROGRESS.one():
        async with audit_prediction(request, done_status=202) as seen:  # queued: no model or verdict yet
            job_id, _ = await queue_upload(request, deps, explain, method)
            seen.job_id = job_id
    url = f"/jobs/{job_id}"
    body = JobSubmitted(job_id=job_id, status_url=url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})


@router.get(
    "/{job_id}",
    response_model=JobStatus,
    responses={404: {"model": ErrorBody, "description": "unknown or expired job"}, 503: {"model": ErrorBody}},
    summary="A job's state and, when done, its result",
)
async def job_status(job_id: str, queue: QueueDep) -> JobStatus:
    """``queued`` | ``running`` | ``done`` (with ``result``) | ``failed`` (with ``error``)."""
    try:
        job_id = str(uuid.UUID(job_id))
    except ValueError:
        raise APIError(404, "unknown_job", "job ids are UUIDs; this one is not") from None
    try:
        record = await queue.record(job_id)
        if record is None:
            raise APIError(404, "unknown_job", f"no job {job_id} (unknown, or expired)")
        job = await queue.state(job_id)
    except QueueUnavailable as exc:
        raise APIError(503, "queue_unavailable", str(exc)) from None
    if job.status not in ("done", "failed"):
        return JobStatus(job_id=job_id, status=job.status)
    try:
        result = await anyio.to_thread.run_sync(prediction_from, job_id, job, record, None, False)
        return JobStatus(job_id=job_id, status="done", result=result)
    except APIError as exc:
        return JobStatus(job_id=job_id, status="failed", error=f"{exc.code}: {exc.detail}")
