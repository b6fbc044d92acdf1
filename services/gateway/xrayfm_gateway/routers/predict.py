"""``POST /predict``: upload an image, wait for the answer (the synchronous form); ``POST /predict/study``:
several images of one study, answered together."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Query, Request

from xrayfm.data.images import to_png_bytes
from xrayfm.errors import XrayfmError
from xrayfm_gateway.audit import audit_prediction
from xrayfm_gateway.decoding import DecodePool
from xrayfm_gateway.deps import (
    DecodersDep,
    QueueDep,
    ReadinessDep,
    ReadinessProbe,
    SettingsDep,
    UploadBufferDep,
    require_api_key,
)
from xrayfm_gateway.drawing import drawn as drawn_answer
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.metrics import PREDICTIONS, QUEUE_ERRORS, UPLOAD_BYTES, observe_domain
from xrayfm_gateway.queue import InferenceQueue, JobState, QueueUnavailable
from xrayfm_gateway.uploads import (
    STUDY_FIELD,
    DecodedImage,
    Upload,
    UploadBuffer,
    receive_upload,
    receive_uploads,
)
from xrayfm_stack.protocol import (
    ErrorBody,
    ExplainMethod,
    ImageInfo,
    InferenceTimeout,
    JobLost,
    Prediction,
    PredictRequest,
    StudyAnswer,
    StudyPrediction,
    Timings,
    WorkerRejection,
)
from xrayfm_stack.settings import GatewaySettings

log = logging.getLogger("xrayfm.gateway")
T = TypeVar("T")
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
        422: "absurd dimensions, too many pixels, no 'file' field, bad parameters; out_of_domain: the "
        "image is outside the served model's domain (XRAYFM_DOMAIN_POLICY=refuse), with the gate's verdict",
        503: "Redis unreachable, no worker ready, or the job lost with Redis (send it again)",
        504: "no answer in time (the job goes on: poll /jobs/{job_id}), or the model timed out",
    }.items()
}


@dataclass
class UploadDeps:
    """Everything a prediction route needs to take an upload: its dependencies, resolved."""

    settings: GatewaySettings
    queue: InferenceQueue
    probe: ReadinessProbe
    decoders: DecodePool
    buffer: UploadBuffer


async def upload_deps(
    settings: SettingsDep,
    queue: QueueDep,
    probe: ReadinessDep,
    decoders: DecodersDep,
    buffer: UploadBufferDep,
) -> UploadDeps:
    """The :class:`UploadDeps` of a request (a coroutine: FastAPI would run a class in its thread pool)."""
    return UploadDeps(settings, queue, probe, decoders, buffer)


UploadDepsDep = Annotated[UploadDeps, Depends(upload_deps)]


class InProgress:
    """The prediction requests this gateway process is handling now (counted on the event loop only)."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def alone(self) -> bool:
        """No other prediction request is in progress (the caller's own is counted)."""
        return self.count <= 1

    @contextmanager
    def one(self) -> Iterator[None]:
        """Count one request while the block runs."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


IN_PROGRESS = InProgress()


async def off_loop(fn: Callable[..., T], *args: Any, small: bool = True) -> T:
    """``fn(*args)``, CPU work on trusted data (drawing heatmaps), in a worker thread so that other
    requests go on meanwhile; or right here when it is `small` and this is the only prediction request in
    progress: nobody waits on the event loop then, and a thread hand-off would cost more than the drawing.
    Uploads are never decoded here: see :mod:`xrayfm_gateway.decoding`."""
    if small and IN_PROGRESS.alone:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


async def decode_one(upload: Upload, deps: UploadDeps, pixel_budget: int | None = None) -> DecodedImage:
    """One upload checked and decoded by a decoder process (an APIError saying why it cannot be), counted."""
    decoded = await deps.decoders.decode(upload, pixel_budget)
    UPLOAD_BYTES.observe(len(upload.data))
    return decoded


async def submit_images(
    deps: UploadDeps,
    images: list[DecodedImage],
    study: bool,
    explain: bool,
    method: str | None,
    decode_ms: float,
    dicom: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Queue decoded images (one request, or a study's list) once the stack is ready; (job id, record).
    `dicom`: the UIDs of a DICOM study's instances, in the order of `images` (no patient data), kept with the
    job for ``GET /jobs/{id}/fhir``."""
    ready = await deps.probe.check()
    if not ready.ready:
        raise APIError(
            503, "not_ready", f"the inference stack is not ready: {ready.detail}", {"Retry-After": "5"}
        )
    method = method or deps.settings.explain_method
    policy = deps.settings.domain_policy
    packed = [  # each image's pixels go raw to the job's inputs key, beside its message
        PredictRequest.to_store(d.pixels, explain=explain, method=method, facts=d.facts, domain_policy=policy)
        for d in images
    ]
    payloads, inputs = [p[0] for p in packed], [p[1] for p in packed]
    facts = [{"format": d.format, "width": d.width, "height": d.height} for d in images]
    record = {
        **({"images": facts} if study else {"image": facts[0]}),
        "decode_ms": decode_ms,
        "submitted": time.time(),
        **({"dicom": dicom} if dicom else {}),
    }
    try:
        job_id = await deps.queue.submit(payloads if study else payloads[0], record, inputs=inputs)
        if deps.settings.feedback_keep_images and not study:  # opted in: feedback may keep this image
            png = await anyio.to_thread.run_sync(to_png_bytes, images[0].pixels)
            await deps.queue.keep_pixels(job_id, png)
    except QueueUnavailable:  # counted here, answered 503 by the app's handler (xrayfm_gateway.errors)
        QUEUE_ERRORS.labels("submit").inc()
        raise
    # Technical facts only: never the file name, the key or anything from a DICOM header.
    log.info(
        "queued job %s: %s, decode %.1f ms", job_id,
        ", ".join(f"{f['format']} {f['width']}x{f['height']}" for f in facts), decode_ms,
    )  # fmt: skip
    return job_id, record


async def queue_upload(
    request: Request, deps: UploadDeps, explain: bool, method: str | None
) -> tuple[str, dict[str, Any]]:
    """Receive, check and decode the upload, then queue its pixels; returns (job id, job record).

    The upload is checked before readiness, so a bad file gets its 4xx even while no worker is ready."""
    started = time.perf_counter()
    with deps.buffer.hold() as take:
        decoded = await decode_one(await receive_upload(request, deps.settings.max_upload_bytes, take), deps)
    return await submit_images(
        deps, [decoded], False, explain, method, 1000 * (time.perf_counter() - started)
    )


async def queue_study(
    request: Request, deps: UploadDeps, explain: bool, method: str | None
) -> tuple[str, dict[str, Any]]:
    """As :func:`queue_upload` for the ``files`` of one study: every file is checked before any is queued."""
    started = time.perf_counter()
    settings = deps.settings
    decoded: list[DecodedImage] = []
    budget = settings.max_study_pixels  # pixels left for the study's other images
    with deps.buffer.hold() as take:
        uploads = await receive_uploads(
            request, settings.max_upload_bytes, STUDY_FIELD, settings.max_study_images,
            settings.max_study_bytes, take,
        )  # fmt: skip
        for k, upload in enumerate(uploads):
            try:
                decoded.append(await decode_one(upload, deps, budget))
            except APIError as exc:  # say which file of the study (by position: names are never echoed)
                detail = f"file {k + 1} of {len(uploads)}: {exc.detail}"
                raise APIError(exc.status, exc.code, detail, exc.headers) from None
            budget -= decoded[-1].width * decoded[-1].height
    return await submit_images(deps, decoded, True, explain, method, 1000 * (time.perf_counter() - started))


async def wait_for(deps: UploadDeps, job_id: str) -> JobState:
    """Wait for a queued job's end: 503 when Redis is lost meanwhile, 504 when it takes too long."""
    timeout = deps.settings.predict_timeout_s
    try:
        job = await deps.queue.wait(job_id, timeout)
    except QueueUnavailable as exc:  # the 503 names the job, which may still be answered
        raise QueueUnavailable(f"lost Redis while waiting for job {job_id}: {exc}") from None
    if job.status not in ("done", "failed"):
        PREDICTIONS.labels("timeout").inc()
        raise APIError(
            504, "timeout", f"no answer within {timeout:g} s; job {job_id} goes on: poll /jobs/{job_id}"
        )
    return job


def prediction_from(
    job_id: str, job: JobState, record: dict[str, Any], started: float | None = None, observe: bool = True
) -> Prediction | StudyPrediction:
    """Turn a finished job into the API answer (one image's, or a study's), its heatmaps drawn from the
    worker's model maps, or raise the matching APIError. `started` (``perf_counter`` at the first byte
    read) gives ``timings.total_ms``. Drawing is CPU work for each image: async routes call this in a thread
    (:func:`off_loop`). `observe`: count the domain verdicts and feed the drift windows (once per answer:
    ``GET /jobs/{id}``, which may be polled many times, does not)."""
    if job.status == "failed":
        PREDICTIONS.labels("failed").inc()
        if job.error_type == JobLost.__name__:  # not the request's fault nor the model's: send it again
            raise APIError(503, "queue_unavailable", f"job {job_id} lost: {job.error}", {"Retry-After": "5"})
        timeout = job.error_type == InferenceTimeout.__name__
        code, status = ("timeout", 504) if timeout else ("inference_failed", 500)
        raise APIError(status, code, f"job {job_id} failed: {job.error}")
    if isinstance(job.result, WorkerRejection):
        error = job.result.error
        if error.type == "out_of_domain":
            PREDICTIONS.labels("out_of_domain").inc()
            if observe:
                observe_domain(error.model, error.domain, None, refused=True)
            extra = {"domain": error.domain.model_dump()} if error.domain is not None else None
            raise APIError(422, error.type, error.message, extra=extra)
        PREDICTIONS.labels("rejected").inc()
        raise APIError(422, error.type, error.message)
    answer = job.result
    assert answer is not None, "a done job has a result"
    try:
        drawn = [drawn_answer(a) for a in (answer.images if isinstance(answer, StudyAnswer) else [answer])]
    except XrayfmError as exc:  # a worker bug, not the caller's: say what, never echo the data
        PREDICTIONS.labels("failed").inc()
        raise APIError(
            500, "inference_failed", f"job {job_id}: the worker's answer is unusable: {exc}"
        ) from None
    timings = {key: round(float(value), 3) for key, value in answer.timings.model_dump().items()}
    timings["decode_ms"] = round(float(record.get("decode_ms", 0.0)), 3)
    if not isinstance(answer, StudyAnswer) and drawn[0].timings.render_ms is not None:
        timings["render_ms"] = round(drawn[0].timings.render_ms, 3)  # a study's images keep their own
    if started is not None:
        timings["total_ms"] = round(1000 * (time.perf_counter() - started), 3)
    PREDICTIONS.labels("ok").inc()
    for image in drawn if observe else ():
        observe_domain(image.model, image.domain, image.probabilities.get(image.model.labels[0]))
    if isinstance(answer, StudyAnswer):
        return StudyPrediction(
            **answer.model_dump(exclude={"timings", "images"}),
            images=drawn,
            timings=Timings(**timings),
            image_info=[ImageInfo(**facts) for facts in record["images"]],
            job_id=job_id,
        )
    return Prediction(
        **drawn[0].model_dump(exclude={"timings"}),
        timings=Timings(**timings),
        image=ImageInfo(**record["image"]),
        job_id=job_id,
    )


# What queues a request for answer_job: (request, deps, explain, method) -> (job id, job record).
QueueIt = Callable[[Request, UploadDeps, bool, str | None], Awaitable[tuple[str, dict[str, Any]]]]


async def answer_job(
    queue_it: QueueIt, request: Request, deps: UploadDeps, explain: bool, method: str | None
) -> tuple[JobState, Prediction | StudyPrediction]:
    """Queue with `queue_it` (one image or a study), wait, and answer (timed from the first byte read);
    (the finished job, the answer). The Open Inference Protocol route (routers/inference_v2.py) takes this
    path too, with its own `queue_it`, and reads the model's map from the job."""
    started = time.perf_counter()
    with IN_PROGRESS.one():
        async with audit_prediction(request) as seen:  # one audit record, however the request ends
            job_id, record = await queue_it(request, deps, explain, method)
            seen.job_id = job_id
            seen.job = job = await wait_for(deps, job_id)
            study = isinstance(job.result, StudyAnswer)
            return job, await off_loop(prediction_from, job_id, job, record, started, small=not study)


async def answer_request(
    queue_it: QueueIt, request: Request, deps: UploadDeps, explain: bool, method: str | None
) -> Prediction | StudyPrediction:
    """As :func:`answer_job`, the answer only."""
    return (await answer_job(queue_it, request, deps, explain, method))[1]


@router.post(
    "/predict",
    response_model=Prediction,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="Predict from one radiograph (waits for the answer)",
)
async def predict(
    request: Request,
    deps: UploadDepsDep,
    explain: bool = Query(True, description="false skips the heatmap (faster)"),
    method: ExplainMethod | None = Query(None, description="heatmap method (default: XRAYFM_EXPLAIN_METHOD)"),
) -> Prediction:
    """Multipart field ``file`` (.png, .jpg, .jpeg, .dcm). Answers the decision, its probability, the
    probabilities per label, the heatmap (base64 PNG), the model's identity and timings."""
    answer = await answer_request(queue_upload, request, deps, explain, method)
    assert isinstance(answer, Prediction), "one image queued: one image's answer"
    return answer


STUDY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [STUDY_FIELD],
                    "properties": {
                        STUDY_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "the study's images (.png .jpg .dcm), up to XRAYFM_MAX_STUDY_IMAGES",
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "/predict/study",
    response_model=StudyPrediction,
    responses=ERRORS,
    openapi_extra=STUDY_BODY,
    summary="Predict from the images of one study (waits for the answer)",
)
async def predict_study(
    request: Request,
    deps: UploadDepsDep,
    explain: bool = Query(True, description="false skips the heatmaps (faster)"),
    method: ExplainMethod | None = Query(None, description="heatmap method (default: XRAYFM_EXPLAIN_METHOD)"),
) -> StudyPrediction:
    """Multipart fields ``files`` (one per image, up to ``XRAYFM_MAX_STUDY_IMAGES``). Answers the study's
    decision and probability (the mean of its images' probabilities, as in the MURA paper; `aggregation`
    says so), and each image's own answer with its heatmap, computed together in one worker call."""
    answer = await answer_request(queue_study, request, deps, explain, method)
    assert isinstance(answer, StudyPrediction), "a study queued: a study's answer"
    return answer
