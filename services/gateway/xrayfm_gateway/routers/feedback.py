"""Staff feedback on answers (``POST /feedback``) and the dataset it becomes (``GET /feedback/export``).

Records live in ``XRAYFM_FEEDBACK_DIR`` (:mod:`xrayfm.feedback`): the verdict, the correct label, the
answer's model version, when, and a hash of the key that sent it; never patient data. The image is kept only
when the deployment opted in (``XRAYFM_FEEDBACK_KEEP_IMAGES=1``: the gateway then keeps each answer's
transport-sized image in Redis for as long as its result) and is deleted after
``XRAYFM_FEEDBACK_RETENTION_DAYS``. The export is a label CSV that ``adapt`` and training jobs read.
"""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from xrayfm import feedback
from xrayfm.errors import XrayfmError
from xrayfm_gateway.deps import QueueDep, SettingsDep, key_identity, require_admin_key, require_api_key
from xrayfm_gateway.errors import APIError
from xrayfm_stack.protocol import ErrorBody, FeedbackAnswer, FeedbackBody, StudyAnswer, WorkerAnswer

log = logging.getLogger("xrayfm.gateway")
router = APIRouter(prefix="/feedback", tags=["feedback"])


@router.post(
    "",
    status_code=201,
    response_model=FeedbackAnswer,
    dependencies=[Depends(require_api_key)],
    responses={
        404: {"model": ErrorBody, "description": "no finished answer with this job_id (results expire)"},
        422: {"model": ErrorBody, "description": "a label the model does not answer, or a contradiction"},
        503: {"model": ErrorBody, "description": "Redis unreachable"},
    },
    summary="Agree or disagree with an answer, with the correct label",
)
async def give_feedback(
    body: FeedbackBody,
    queue: QueueDep,
    settings: SettingsDep,
    who: Annotated[str | None, Depends(key_identity)],
) -> FeedbackAnswer:
    """Store a verdict on the answer of `job_id` (its result must still be kept: XRAYFM_RESULT_EXPIRES)."""
    job = await queue.state(body.job_id)  # a lost Redis answers 503 (xrayfm_gateway.errors.unavailable)
    pixels = await queue.pixels(body.job_id) if settings.feedback_keep_images else None
    answer = job.result
    if job.status != "done" or not isinstance(answer, WorkerAnswer | StudyAnswer):
        raise APIError(404, "unknown_job", f"no finished answer for job {body.job_id} (results expire)")
    try:
        record = feedback.make_record(
            job_id=body.job_id, model=answer.model.model_dump(), prediction=answer.prediction,
            probability=answer.probability, verdict=body.verdict, label=body.label, comment=body.comment, key_id=who,
        )  # fmt: skip
    except XrayfmError as exc:
        raise APIError(422, "invalid_feedback", str(exc)) from None
    folder = settings.feedback_dir
    saved = await anyio.to_thread.run_sync(feedback.save_record, folder, record, pixels)
    if pixels is not None:
        await anyio.to_thread.run_sync(feedback.sweep_images, folder, settings.feedback_retention_days)
    log.info(
        "feedback %s on job %s: %s (image kept: %s)",
        saved["id"],
        body.job_id,
        body.verdict,
        pixels is not None,
    )
    return FeedbackAnswer(**saved)


@router.get(
    "/export",
    dependencies=[Depends(require_admin_key)],
    response_class=Response,
    responses={
        200: {
            "content": {"text/csv": {}},
            "description": "the label CSV (also written to the feedback folder)",
        },
        404: {"model": ErrorBody, "description": "no feedback on this model"},
    },
    summary="The feedback on one model as a training set (label CSV)",
)
async def export_feedback(
    settings: SettingsDep, model: str = Query(description="the model name (every version of it)")
) -> Response:
    """The records of `model` that kept their image, as ``path,<label>...`` (the layout of ``adapt --kind
    csv``), written to ``<XRAYFM_FEEDBACK_DIR>/export.csv``: a training job reads it there (the training
    worker mounts the folder: ``{"kind": "csv", "root": "<feedback dir>/export.csv"}``). Headers say how many
    rows and how many records had no image."""
    folder = settings.feedback_dir
    try:
        await anyio.to_thread.run_sync(feedback.sweep_images, folder, settings.feedback_retention_days)
        summary = await anyio.to_thread.run_sync(feedback.export_csv, folder, model)
    except XrayfmError as exc:
        raise APIError(404, "no_feedback", str(exc)) from None
    text = await anyio.Path(summary["csv"]).read_text()
    headers = {
        "X-Xrayfm-Export-Path": summary["csv"],
        "X-Xrayfm-Rows": str(summary["rows"]),
        "X-Xrayfm-Without-Image": str(summary["without_image"]),
    }
    return Response(text, media_type="text/csv", headers=headers)
