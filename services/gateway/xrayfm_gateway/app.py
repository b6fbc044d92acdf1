"""The FastAPI application: ``uvicorn xrayfm_gateway.app:create_app --factory --port 8000`` (one process), or
``python -m xrayfm_gateway.serve`` (``XRAYFM_GATEWAY_WORKERS`` processes)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from xrayfm_gateway import __version__
from xrayfm_gateway.audit import Auditor
from xrayfm_gateway.decoding import DecodePool
from xrayfm_gateway.errors import (
    APIError,
    api_error_handler,
    http_error_handler,
    queue_unavailable_handler,
    validation_error_handler,
)
from xrayfm_gateway.limits import BodyLimit
from xrayfm_gateway.metrics import DRIFT_WATCH, MetricsMiddleware, process_stopped
from xrayfm_gateway.queue import InferenceQueue, QueueUnavailable, TrainingQueue
from xrayfm_gateway.routers import (
    dicomweb,
    feedback,
    health,
    inference_v2,
    jobs,
    models,
    predict,
    studies,
    training,
)
from xrayfm_gateway.uploads import UploadBuffer
from xrayfm_stack.settings import GatewaySettings

DESCRIPTION = """Predictions and attention heatmaps for radiographs (PNG, JPEG, DICOM).

`curl -X POST "http://127.0.0.1:8000/predict" -F "file=@sample_xray.png"`

Uploads are checked and decoded here, in decoder processes; only grey pixels travel to the inference workers.
"""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the gateway (settings default to the environment). The queues are made at start-up and
    reach the routes through the dependencies of :mod:`xrayfm_gateway.deps`."""
    settings = GatewaySettings.from_env() if settings is None else settings
    # One BLAS thread. The gateway's only linear algebra is drawing heatmaps (a few tiny matrix products,
    # xrayfm.explain.overlay), and OpenBLAS's other threads spin after each call, burning far more CPU per
    # /predict than the products themselves, which on a small machine is CPU the worker needs.
    threadpool_limits(limits=1, user_api="blas")
    log = logging.getLogger("xrayfm.gateway")
    log.setLevel(logging.INFO)
    if not log.handlers:  # uvicorn configures only its own loggers
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.queue = InferenceQueue(settings.queue)
        app.state.training = TrainingQueue(settings.training)
        app.state.decoders = DecodePool(settings)
        app.state.upload_buffer = UploadBuffer(settings.upload_buffer_bytes)
        try:
            yield
        finally:
            await app.state.decoders.close()
            await app.state.queue.close()
            process_stopped()

    if not settings.api_keys:
        log.warning("XRAYFM_API_KEYS is not set: /predict and /jobs answer anyone who can reach this port")
    if not settings.admin_keys:
        log.warning(
            "no XRAYFM_ADMIN_KEYS: the training and model endpoints are %s",
            "OPEN (XRAYFM_INSECURE_NO_AUTH=1, local development only)"
            if settings.insecure_no_auth
            else "closed (403)",
        )
    app = FastAPI(title="xrayfm gateway", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.audit = Auditor(settings.audit_log)  # xrayfm_gateway.audit: admin actions, predictions
    DRIFT_WATCH.configure(settings.model_store, settings.drift_window)
    if settings.domain_policy != "refuse":
        log.warning("XRAYFM_DOMAIN_POLICY=%s: images outside the model's domain are %s", settings.domain_policy,
                    "answered with a warning" if settings.domain_policy == "flag" else "not checked")  # fmt: skip
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # never echoes the input
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(QueueUnavailable, queue_unavailable_handler)  # 503 from any route
    app.add_middleware(BodyLimit, max_bytes=settings.max_json_bytes)
    app.add_middleware(MetricsMiddleware)  # added last: outermost, so it counts the 413s of BodyLimit too
    for router in (
        health.router,
        predict.router,
        jobs.router,
        training.router,
        models.router,
        feedback.router,
        dicomweb.router,
        studies.router,
        inference_v2.router,
    ):
        app.include_router(router)
    return app
