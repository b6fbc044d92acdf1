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
from xrayfm_stack.jobs import LOG_LINES, TERMINAL
from xrayfm_stack.protocol import (
    CancelAnswer,
    ErrorBody,
    JobList,
    JobLogTail,
    JobRecord,
    JobSubmitted,
)
from xrayfm_stack.spec import JOB_SPEC, KINDS, job_kind, validate_spec

router = APIRouter(prefix="/training/jobs", tags=["training"], dependencies=[Depends(require_admin_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "an admin key is needed (when auth is on)"},
    503: {"model": ErrorBody, "description": "Redis unreachable, or the audit log cannot be written"},
}
UNKNOWN: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "unknown job"}}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its ``$defs`` written in place of their ``$ref``s (the configs do not nest, so
    this ends), to stand alone inside the OpenAPI document; a discriminator keeps its property name only
    (its mapping named the ``$defs``)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        if str(node.get("$ref", "")).startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return walk({**defs[node["$ref"].rpartition("/")[2]], **rest})
        out = {k: walk(v) for k, v in node.items()}
        if isinstance(out.get("discriminator"), dict) and "propertyName" in out["discriminator"]:
            out["discriminator"] = {"propertyName": out["discriminator"]["propertyName"]}
        return out

    inlined: dict[str, Any] = walk(schema)
    return inlined


def _spec_body_schema() -> dict[str, Any]:
    """The request body as documented: an object of ``kind``, ``name`` and ``config``, and one of the job
    kinds' models (told apart by ``kind``: :data:`xrayfm_stack.spec.JobSpecBody`), each with its config's
    settings, types, choices, ranges and help."""
    union = _inlined(JOB_SPEC.json_schema())
    common = union["oneOf"][0]["properties"]
    return {
        "type": "object",
        "properties": {
            "kind": {
                "type": "string",
                "enum": list(KINDS),
                "description": common["kind"].get("description"),
            },
            "name": common["name"],
            "config": {"type": "object", "description": "the settings of the kind's config (see oneOf)"},
        },
        "required": ["kind", "config"],
        **union,
    }


# The route reads the body itself, so that a spec nested too deeply or holding a NUL is refused (by
# validate_spec, naming why) before anything parses it as a model.
SPEC_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _spec_body_schema()}}}
}


def _job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise APIError(404, "unknown_job", "job ids are UUIDs; this one is not") from None


async def _existing(training: TrainingDep, job_id: str) -> JobRecord:
    """The job's record, or 404."""
    job = await training.get(_job_id(job_id))
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
    """Body: ``{"kind": "pretrain"|"adapt"|"evaluate"|"tune"|"calibrate", "name": "...", "config": {...}}``
    (each kind's config in the schema); 422 says what is wrong, including a path outside
    ``XRAYFM_DATA_DIRS``."""
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
    action = job_kind(spec["kind"]).audit_action
    await audit.requested(
        action=action, detail={"kind": spec["kind"], "name": checked_name(spec.get("name"))}
    )
    job_id = await training.submit(spec)
    await audit.ok(202, target=job_target(job_id))
    url = f"/training/jobs/{job_id}"
    body = JobSubmitted(job_id=job_id, status_url=url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})


@router.get("", response_model=JobList, responses=ERRORS, summary="The latest training jobs, newest first")
async def list_training_jobs(training: TrainingDep) -> JobList:
    return JobList(jobs=await training.list())


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
    return JobLogTail(job_id=job.job_id, lines=await training.log_tail(job.job_id, tail))


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
    status = await training.cancel(job.job_id)
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
    outcome = await training.delete(job_id)
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
