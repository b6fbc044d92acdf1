"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from xrayfm_gateway.deps import DetailsDep, ReadinessDep, SettingsDep, StoreDep, TrainingDep
from xrayfm_gateway.metrics import feedback_exposition, gateway_exposition, training_exposition
from xrayfm_stack.protocol import Readiness

router = APIRouter(tags=["health"])


@router.get("/health", summary="The gateway process is alive")
async def health() -> dict[str, str]:
    """Always 200 while the process serves HTTP."""
    return {"status": "ok"}


@router.get(
    "/ready", response_model=Readiness, responses={503: {"model": Readiness}}, summary="Ready to predict"
)
async def ready(probe: ReadinessDep, details: DetailsDep) -> JSONResponse:
    """200 when Redis answers and a worker with a loaded model sends heartbeats; otherwise 503 with why.
    Each worker's details (host, pid, model and its sha256) only with a key, when keys are configured."""
    body = await probe.check(fresh=True)
    shown = body.model_dump() if details else body.model_dump(exclude={"workers"})
    return JSONResponse(shown, status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(
    training: TrainingDep, store: StoreDep, settings: SettingsDep, details: DetailsDep
) -> Response:
    """The gateway's metrics in Prometheus' text format, with the training jobs, the served model and staff
    feedback per model version (left out, not failed, when Redis, the store or the folder cannot be read).
    The per-job series only with a key, when keys are configured."""
    series = await training_exposition(training.records, store, per_job=details)
    series += await feedback_exposition(settings.feedback_dir)
    return Response(gateway_exposition() + series, media_type=CONTENT_TYPE_LATEST)
