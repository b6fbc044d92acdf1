"""The gateway's dependencies, in the FastAPI full-stack template's style: routes ask for what they use
(``SettingsDep``, ``QueueDep``, ``TrainingDep``, ``StoreDep``, ``ReadinessDep``, ``DecodersDep``, ``UploadBufferDep``) and
never reach into ``request.app.state``. Tests replace any of them with ``app.dependency_overrides``.

Auth is a dependency too: :func:`require_api_key` on the prediction routes, :func:`require_admin_key` on
the training and model routes. Keys are compared in constant time, never logged.

Every dependency here is ``async def`` although none awaits anything: FastAPI runs a plain ``def``
dependency in its thread pool, and each such hand-off costs more than the dependency's own work; /predict
resolves eight of them one after the other. None of them blocks, so they run on the event loop.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from xrayfm_gateway.decoding import DecodePool
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.metrics import QUEUE_ERRORS
from xrayfm_gateway.queue import InferenceQueue, QueueUnavailable, TrainingQueue, protocol_mismatch
from xrayfm_gateway.uploads import UploadBuffer
from xrayfm_stack.protocol import Readiness
from xrayfm_stack.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"


async def get_settings(request: Request) -> GatewaySettings:
    """The app's settings (made once by ``create_app``)."""
    settings: GatewaySettings = request.app.state.settings  # app.state holds Any
    return settings


async def get_queue(request: Request) -> InferenceQueue:
    """The inference queue (made at start-up)."""
    queue: InferenceQueue = request.app.state.queue  # app.state holds Any
    return queue


async def get_training(request: Request) -> TrainingQueue:
    """The training queue (made at start-up)."""
    training: TrainingQueue = request.app.state.training  # app.state holds Any
    return training


async def get_decoders(request: Request) -> DecodePool:
    """The decoder processes uploads are decoded in (bounded in number, memory and time)."""
    decoders: DecodePool = request.app.state.decoders  # app.state holds Any
    return decoders


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
QueueDep = Annotated[InferenceQueue, Depends(get_queue)]
TrainingDep = Annotated[TrainingQueue, Depends(get_training)]


async def get_upload_buffer(request: Request) -> UploadBuffer:
    """Bounds the bytes of uploads this process holds at once."""
    upload_buffer: UploadBuffer = request.app.state.upload_buffer  # app.state holds Any
    return upload_buffer


DecodersDep = Annotated[DecodePool, Depends(get_decoders)]
UploadBufferDep = Annotated[UploadBuffer, Depends(get_upload_buffer)]


async def get_store(settings: SettingsDep) -> Path:
    """The model store's folder (layout in :mod:`xrayfm_stack.store`)."""
    return settings.model_store


StoreDep = Annotated[Path, Depends(get_store)]


class ReadinessProbe:
    """Can the stack predict now? Redis answers, a worker with a loaded model sends heartbeats, and every
    live worker speaks this gateway's protocol version. When not, it says why, including what the
    first-start bootstrap is doing."""

    def __init__(self, queue: InferenceQueue, training: TrainingQueue) -> None:
        self.queue, self.training = queue, training

    async def check(self, fresh: bool = False) -> Readiness:
        """The readiness report (also used by /predict, which refuses work while not ready). /ready asks
        for a `fresh` read of Redis; /predict may use a worker list up to ``WORKERS_CACHE_S`` old."""
        try:
            workers = await self.queue.workers(fresh=fresh)
        except QueueUnavailable as exc:
            QUEUE_ERRORS.labels("ready").inc()
            return Readiness(ready=False, broker="unreachable", detail=str(exc))
        mismatch = protocol_mismatch(workers)
        if mismatch is not None:  # they share the queue: no work is sent while one is live
            return Readiness(ready=False, broker="ok", workers=workers, detail=mismatch)
        answering = [w for w in workers if w.get("ready")]
        if answering:
            return Readiness(
                ready=True, broker="ok", workers=workers, detail=f"{len(answering)} worker(s) answering"
            )
        if not workers:
            detail = "no inference worker is running"
        else:
            reasons = {
                w.get("error") or ("loading the model" if w.get("loading") else "not ready") for w in workers
            }
            detail = "no worker has a model answering: " + "; ".join(sorted(reasons))
        try:
            first_start = await self.training.bootstrap_detail()
        except QueueUnavailable:
            first_start = None
        # A bootstrap under way says why there is no model yet; each worker's own state stays in `workers`.
        return Readiness(ready=False, broker="ok", workers=workers, detail=first_start or detail)


async def get_readiness(queue: QueueDep, training: TrainingDep) -> ReadinessProbe:
    """The readiness probe over the app's queues."""
    return ReadinessProbe(queue, training)


ReadinessDep = Annotated[ReadinessProbe, Depends(get_readiness)]

# -- auth ---------------------------------------------------------------------------------------------
_predict_key = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="needed when XRAYFM_API_KEYS is set"
)
_admin_key = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="an admin key (XRAYFM_ADMIN_KEYS)"
)


def key_hash(key: str) -> str:
    """Who holds a key, without keeping it: the first 12 hex digits of its SHA-256 (feedback and audit
    records)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def key_matches(given: str | None, keys: frozenset[str]) -> bool:
    """True when `given` is one of `keys`. Compared against every key with no early exit, in constant
    time, so timing does not tell which key nearly matched."""
    candidate = (given or "").encode()
    matched = [secrets.compare_digest(candidate, key.encode()) for key in keys]
    return any(matched)


async def require_api_key(
    settings: SettingsDep, key: Annotated[str | None, Depends(_predict_key)] = None
) -> None:
    """401 unless auth is off or the ``X-API-Key`` header holds one of the configured keys."""
    if settings.auth_enabled and not key_matches(key, settings.api_keys):
        raise APIError(
            401,
            "unauthorized",
            f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )


_bearer = HTTPBearer(
    auto_error=False, description="a key as `Authorization: Bearer <key>` (what Prometheus sends)"
)


async def shows_details(
    settings: SettingsDep,
    key: Annotated[str | None, Depends(_predict_key)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> bool:
    """May this request see per-worker and per-job details (/ready, /metrics)? Yes when no key is configured
    (local development) or when it carries an API or admin key, in ``X-API-Key`` or as a bearer token."""
    keys = settings.api_keys | settings.admin_keys
    return not keys or key_matches(key or (bearer.credentials if bearer else None), keys)


DetailsDep = Annotated[bool, Depends(shows_details)]

CLOSED = (
    "the training and model endpoints are closed: no admin key is configured. Set XRAYFM_ADMIN_KEYS to a "
    "long random key on the gateway and send it in the X-API-Key header (or, for local development only, "
    "XRAYFM_INSECURE_NO_AUTH=1)"
)


async def key_identity(
    settings: SettingsDep, key: Annotated[str | None, Depends(_predict_key)] = None
) -> str | None:
    """Who sent a request, without keeping the key: the first 12 hex digits of its SHA-256 (None when
    auth is off)."""
    if not settings.auth_enabled or not key:
        return None
    return key_hash(key)


async def require_admin_key(
    settings: SettingsDep, key: Annotated[str | None, Depends(_admin_key)] = None
) -> None:
    """Closed by default: 403 while no admin key is configured (unless XRAYFM_INSECURE_NO_AUTH=1), then 401
    unless ``X-API-Key`` holds one of the admin keys (a prediction key is not enough)."""
    if not settings.admin_keys:
        if settings.insecure_no_auth:
            return
        raise APIError(403, "admin_closed", CLOSED)
    if not key_matches(key, settings.admin_keys):
        raise APIError(
            401,
            "unauthorized",
            f"an admin key is needed in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
