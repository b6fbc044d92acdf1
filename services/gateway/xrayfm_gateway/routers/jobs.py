"""The asynchronous form: ``POST /jobs`` (202 + job id), ``GET /jobs/{job_id}`` to poll; and
``GET /jobs/{job_id}/fhir``: a DICOM study's answer as FHIR R4B resources for an EHR."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset

from xrayfm.hospital.fhir import fhir_bundle
from xrayfm_gateway.audit import audit_prediction
from xrayfm_gateway.deps import QueueDep, require_api_key
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.queue import JobState
from xrayfm_gateway.routers.predict import (
    ERRORS,
    IN_PROGRESS,
    UPLOAD_BODY,
    UploadDepsDep,
    prediction_from,
    queue_upload,
)
from xrayfm_stack.protocol import ErrorBody, ExplainMethod, JobStatus, JobSubmitted, StudyPrediction
from xrayfm_stack.results import study_result

FHIR_JSON = "application/fhir+json"
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
    job_id, record, job = await _job(job_id, queue)
    if job.status not in ("done", "failed"):
        return JobStatus(job_id=job_id, status=job.status)
    try:
        result = await anyio.to_thread.run_sync(prediction_from, job_id, job, record, None, False)
        return JobStatus(job_id=job_id, status="done", result=result)
    except APIError as exc:
        domain = exc.extra.get("domain")  # out_of_domain: the gate's verdict (the router records its reasons)
        return JobStatus(job_id=job_id, status="failed", error=f"{exc.code}: {exc.detail}", domain=domain)


async def _job(job_id: str, queue: QueueDep) -> tuple[str, dict[str, Any], JobState]:
    """(the id as a UUID, the job's record, its state); 404 when unknown or expired, 503 without Redis."""
    try:
        job_id = str(uuid.UUID(job_id))
    except ValueError:
        raise APIError(404, "unknown_job", "job ids are UUIDs; this one is not") from None
    record = await queue.record(job_id)
    if record is None:
        raise APIError(404, "unknown_job", f"no job {job_id} (unknown, or expired)")
    return job_id, record, await queue.state(job_id)


@router.get(
    "/{job_id}/fhir",
    responses={
        200: {"content": {FHIR_JSON: {}}, "description": "a FHIR R4B transaction Bundle"},
        404: {"model": ErrorBody, "description": "unknown or expired job"},
        409: {"model": ErrorBody, "description": "the job has not ended, or ended without an answer"},
        422: {"model": ErrorBody, "description": "not a DICOM study's job: FHIR needs the study's UIDs"},
        503: {"model": ErrorBody},
    },
    summary="A DICOM study's answer as FHIR: DiagnosticReport, Observations, Device",
)
async def job_fhir(job_id: str, queue: QueueDep) -> Response:
    r"""For a study sent through STOW-RS (``/dicomweb/studies``): a transaction Bundle of a
    ``DiagnosticReport`` on the ``ImagingStudy`` (by its Study Instance UID), the finding and probability
    ``Observation``\ s and the model's ``Device`` (:func:`xrayfm.hospital.fhir.fhir_bundle`), with the same
    identifiers as the SR the router writes. The gateway keeps no patient data, so the report has no
    ``subject``: the EHR links it to its patient through the ImagingStudy."""
    job_id, record, job = await _job(job_id, queue)
    dicom = record.get("dicom")
    if not dicom:
        raise APIError(422, "not_dicom", f"job {job_id} was not a DICOM study sent by STOW-RS: no FHIR")
    if job.status not in ("done", "failed"):
        raise APIError(409, "not_finished", f"job {job_id} is {job.status}")
    answer = await anyio.to_thread.run_sync(prediction_from, job_id, job, record, None, False)
    if not isinstance(answer, StudyPrediction):
        raise APIError(409, "not_a_study", f"job {job_id} holds no study answer")
    bundle = await anyio.to_thread.run_sync(_bundle, answer, dicom)
    return Response(bundle, media_type=FHIR_JSON)


def _bundle(answer: StudyPrediction, dicom: dict[str, Any]) -> str:
    """The FHIR JSON of a study's answer, from the UIDs the job kept."""
    sources = []
    for sop_class, sop_instance in dicom["instances"]:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = dicom["study"], sop_class, sop_instance
        sources.append(ds)
    result = study_result(answer, [ds.SOPInstanceUID for ds in sources])
    return fhir_bundle(sources, result).model_dump_json(exclude_none=True)
