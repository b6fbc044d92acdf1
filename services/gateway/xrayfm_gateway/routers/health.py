"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from xrayfm_gateway.metrics import QUEUE_ERRORS, training_exposition
from xrayfm_gateway.queue import QueueUnavailable
from xrayfm_gateway.schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/health", summary="The gateway process is alive")
async def health() -> dict[str, str]:
    """Always 200 while the process serves HTTP."""
    return {"status": "ok"}


@router.get(
    "/ready", response_model=Readiness, responses={503: {"model": Readiness}}, summary="Ready to predict"
)
async def ready(request: Request) -> JSONResponse:
    """200 when Redis answers and a worker with a loaded model sends heartbeats; otherwise 503 with why."""
    body = await readiness(request)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


async def readiness(request: Request) -> Readiness:
    """The readiness report (shared with /predict, which refuses work while not ready)."""
    try:
        workers = await request.app.state.queue.workers()
    except QueueUnavailable as exc:
        QUEUE_ERRORS.labels("ready").inc()
        return Readiness(ready=False, broker="unreachable", detail=str(exc))
    answering = [w for w in workers if w.get("ready")]
    if answering:
        return Readiness(
            ready=True, broker="ok", workers=workers, detail=f"{len(answering)} worker(s) answering"
        )
    if not workers:
        detail = "no inference worker is running"
    else:
        reasons = sorted(
            {w.get("error") or ("loading the model" if w.get("loading") else "not ready") for w in workers}
        )
        detail = "no worker has a model answering: " + "; ".join(reasons)
    first_start = await _bootstrap_detail(request)
    if first_start:  # says why there is no model yet; each worker's own state stays in `workers`
        detail = first_start
    return Readiness(ready=False, broker="ok", workers=workers, detail=detail)


async def _bootstrap_detail(request: Request) -> str | None:
    """What the first-start bootstrap is doing (xrayfm_training.bootstrap), or None when it is not running."""
    from xrayfm_training.bootstrap import BootstrapState, describe
    from xrayfm_training.jobs import JobRecords
    from xrayfm_training.settings import TrainingSettings

    def read() -> str | None:
        if getattr(request.app.state, "bootstrap", None) is None:
            t = TrainingSettings.from_env()
            request.app.state.bootstrap = (
                BootstrapState(t.redis_url, t.queue),
                JobRecords(t.redis_url, t.queue),
            )
        state, records = request.app.state.bootstrap
        return describe(state.get(), records)

    try:
        return await anyio.to_thread.run_sync(read)
    except (RedisError, OSError):
        return None


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """The gateway's metrics in Prometheus' text format, with the training jobs and the served model
    (left out, not failed, when Redis or the store cannot be read)."""
    from xrayfm_training.jobs import JobRecords
    from xrayfm_training.settings import TrainingSettings

    state = request.app.state
    if getattr(state, "metrics_records", None) is None:
        t = TrainingSettings.from_env()
        state.metrics_records = JobRecords(t.redis_url, t.queue)  # connects lazily: no I/O here
    training = await training_exposition(state.metrics_records, state.settings.model_store)
    return Response(generate_latest() + training, media_type=CONTENT_TYPE_LATEST)
