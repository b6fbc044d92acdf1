"""``POST /predict``: upload an image, wait for the answer (the synchronous form)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request

from xrayfm_gateway.deps import DecodeSlotsDep, QueueDep, ReadinessDep, SettingsDep, require_api_key
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.metrics import PREDICTIONS, QUEUE_ERRORS, UPLOAD_BYTES
from xrayfm_gateway.queue import JobState, QueueUnavailable
from xrayfm_gateway.uploads import decode_upload, receive_upload
from xrayfm_stack.protocol import (
    ErrorBody,
    ExplainMethod,
    ImageInfo,
    Prediction,
    PredictRequest,
    Timings,
    WorkerRejection,
)

log = logging.getLogger("xrayfm.gateway")
router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": ".png .jpg .dcm"}
                    },
                }
            }
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "empty, corrupt or truncated image; malformed multipart",
        401: "missing or wrong API key (when auth is on)",
        413: "upload over the size limit",
        415: "not a PNG, JPEG or DICOM; not multipart/form-data",
        422: "absurd dimensions, too many pixels, no 'file' field, bad parameters",
        503: "Redis unreachable or no worker ready",
        504: "no answer in time (the job goes on: poll /jobs/{job_id})",
    }.items()
}


@dataclass
class UploadDeps:
    """Everything a prediction route needs to take an upload: its dependencies, resolved."""

    settings: SettingsDep
    queue: QueueDep
    probe: ReadinessDep
    decode_slots: DecodeSlotsDep


async def queue_upload(
    request: Request, deps: UploadDeps, explain: bool, method: str | None
) -> tuple[str, dict[str, Any]]:
    """Receive, check and decode the upload, then queue its pixels; returns (job id, job record).

    The upload is checked before readiness, so a bad file gets its 4xx even while no worker is ready."""
    settings = deps.settings
    started = time.perf_counter()
    upload = await receive_upload(request, settings.max_upload_bytes)
    async with deps.decode_slots:  # bounds the memory and CPU spent decoding at once
        decoded = await anyio.to_thread.run_sync(decode_upload, upload, settings)
    UPLOAD_BYTES.observe(len(upload.data))
    decode_ms = 1000 * (time.perf_counter() - started)
    ready = await deps.probe.check()
    if not ready.ready:
        raise APIError(
            503, "not_ready", f"the inference stack is not ready: {ready.detail}", {"Retry-After": "5"}
        )
    payload = PredictRequest.from_image(
        decoded.pixels, explain=explain, method=method or settings.explain_method
    )
    record = {
        "image": {"format": decoded.format, "width": decoded.width, "height": decoded.height},
        "decode_ms": decode_ms,
        "submitted": time.time(),
    }
    try:
        job_id = await deps.queue.submit(payload, record)
    except QueueUnavailable as exc:
        QUEUE_ERRORS.labels("submit").inc()
        raise APIError(503, "queue_unavailable", str(exc), {"Retry-After": "5"}) from None
    # Technical facts only: never the file name, the key or anything from a DICOM header.
    log.info(
        "queued job %s: %s %dx%d, %d bytes, decode %.1f ms",
        job_id, decoded.format, decoded.width, decoded.height, len(upload.data), decode_ms,
    )  # fmt: skip
    return job_id, record


def prediction_from(job_id: str, job: JobState, record: dict, total_ms: float | None = None) -> Prediction:
    """Turn a finished job into the API answer, or raise the matching APIError."""
    if job.status == "failed":
        PREDICTIONS.labels("failed").inc()
        code, status = (
            ("timeout", 504) if "InferenceTimeout" in (job.error or "") else ("inference_failed", 500)
        )
        raise APIError(status, code, f"job {job_id} failed: {job.error}")
    if isinstance(job.result, WorkerRejection):
        PREDICTIONS.labels("rejected").inc()
        raise APIError(422, job.result.error.type, job.result.error.message)
    answer = job.result
    assert answer is not None, "a done job has a result"
    timings = {key: round(float(value), 3) for key, value in answer.timings.model_dump().items()}
    timings["decode_ms"] = round(float(record.get("decode_ms", 0.0)), 3)
    if total_ms is not None:
        timings["total_ms"] = round(total_ms, 3)
    PREDICTIONS.labels("ok").inc()
    return Prediction(
        **answer.model_dump(exclude={"timings"}),
        timings=Timings(**timings),
        image=ImageInfo(**record["image"]),
        job_id=job_id,
    )


@router.post(
    "/predict",
    response_model=Prediction,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="Predict from one radiograph (waits for the answer)",
)
async def predict(
    request: Request,
    deps: Annotated[UploadDeps, Depends()],
    explain: bool = Query(True, description="false skips the heatmap (faster)"),
    method: ExplainMethod | None = Query(None, description="heatmap method (default: XRAYFM_EXPLAIN_METHOD)"),
) -> Prediction:
    """Multipart field ``file`` (.png, .jpg, .jpeg, .dcm). Answers the decision, its probability, the
    probabilities per label, the heatmap (base64 PNG), the model's identity and timings."""
    started = time.perf_counter()
    settings = deps.settings
    job_id, record = await queue_upload(request, deps, explain, method)
    try:
        job = await deps.queue.wait(job_id, settings.predict_timeout_s)
    except QueueUnavailable as exc:
        raise APIError(
            503,
            "queue_unavailable",
            f"lost Redis while waiting for job {job_id}: {exc}",
            {"Retry-After": "5"},
        ) from None
    if job.status not in ("done", "failed"):
        PREDICTIONS.labels("timeout").inc()
        raise APIError(
            504,
            "timeout",
            f"no answer within {settings.predict_timeout_s:g} s; job {job_id} goes on: poll /jobs/{job_id}",
        )
    return prediction_from(job_id, job, record, 1000 * (time.perf_counter() - started))
