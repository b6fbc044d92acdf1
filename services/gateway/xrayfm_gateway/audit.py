"""The gateway's audit trail (:mod:`xrayfm.audit`, the file ``XRAYFM_AUDIT_LOG``): every admin action and
every prediction leaves a record. No patient data: who (a key's hash), what, on which model or job, how it
ended; for a prediction the model and the domain gate's verdict, never the image, its file name, a DICOM
header or the answer.

Admin actions (:data:`ADMIN_ACTIONS`) are recorded twice: ``requested`` before anything changes
(:meth:`AdminAudit.requested`; when that line cannot be written the action is refused, 503
``audit_unavailable``), then how it ended: ``ok`` from the route (:meth:`AdminAudit.ok`), ``refused`` or
``failed`` from the error handler (:func:`xrayfm_gateway.errors.api_error_handler`), which also records the
refusals that come before the route runs (401, 403, 422). Both lines carry the same ``request_id``. They
are written in a worker thread and fsynced (refusals are not). A prediction is one line, written on the
event loop (a short append, not fsynced; ``bench/bench_audit.py`` measures it): when it cannot be written the
answer still goes out, and the failure is counted (``xrayfm_gateway_audit_failures_total``) and logged.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request

from xrayfm import audit
from xrayfm.errors import XrayfmError
from xrayfm.utils import sha256_folder
from xrayfm_gateway.deps import API_KEY_HEADER, key_hash, key_matches
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.metrics import AUDIT_FAILURES
from xrayfm_gateway.queue import JobState
from xrayfm_stack import store as model_store
from xrayfm_stack.protocol import DomainInfo, StudyAnswer, WorkerAnswer, WorkerRejection
from xrayfm_stack.settings import GatewaySettings

log = logging.getLogger("xrayfm.gateway")

# (method, route template) -> action. A route here records its refusals (error handler) and must call
# AdminAudit.requested before acting and AdminAudit.ok after.
ADMIN_ACTIONS = {
    ("POST", "/models/{name}/{version}/promote"): "promote",
    ("POST", "/models/rollback"): "rollback",
    ("PUT", "/models/{name}/{version}/operating-point"): "operating_point_set",
    ("DELETE", "/models/{name}/{version}/operating-point"): "operating_point_clear",
    ("POST", "/training/jobs"): "train_submit",
    ("POST", "/training/jobs/{job_id}/cancel"): "train_cancel",
    ("DELETE", "/training/jobs/{job_id}"): "train_delete",
}
PREDICT_ACTIONS = {
    "/predict": "predict", "/predict/study": "predict_study", "/jobs": "predict_job",
    "/dicomweb/studies": "predict_study", "/dicomweb/studies/{study}": "predict_study",  # STOW-RS: a line a job
    "/v2/models/{name}/infer": "predict", "/v2/models/{name}/versions/{version}/infer": "predict",  # OIP v2
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a store name or version (xrayfm_stack.store)


def actor(settings: GatewaySettings, key: str | None) -> str:
    """Who sent a request: a configured key's hash (as feedback records it), ``unknown-key`` for a key that
    is none of them (its hash is not kept: it may be a mistyped secret), ``anonymous`` without a key."""
    if not key:
        return "anonymous"
    return key_hash(key) if key_matches(key, settings.api_keys | settings.admin_keys) else "unknown-key"


def checked_name(value: Any) -> str:
    """A model name or version as sent when it is a valid one; ``(invalid)`` otherwise (never copied)."""
    return value if isinstance(value, str) and _NAME.match(value) else "(invalid)"


def model_target(name: Any, version: Any) -> str:
    """``model:<name>/<version>``, each checked (:func:`checked_name`)."""
    return f"model:{checked_name(name)}/{checked_name(version)}"


def job_target(job_id: Any) -> str:
    """``job:<uuid>``; anything else as ``job:(invalid)``."""
    try:
        return f"job:{uuid.UUID(str(job_id))}"
    except ValueError:
        return "job:(invalid)"


def target_of(path_params: dict[str, Any]) -> str | None:
    """What an admin route acts on, from its path (checked, never echoed as sent)."""
    if "job_id" in path_params:
        return job_target(path_params["job_id"])
    if "name" in path_params:
        return model_target(path_params["name"], path_params.get("version"))
    return None


async def model_facts(store: Path, name: str, version: str) -> dict[str, Any]:
    """A store version's name, version and sha256: of its folder, as the inference workers compute it (in a
    thread: it reads the weights). The sha256 is None when the folder cannot be read."""
    try:
        digest = await anyio.to_thread.run_sync(sha256_folder, model_store.version_dir(store, name, version))
    except (OSError, XrayfmError):
        digest = None
    return {"name": name, "version": version, "sha256": digest}


class Auditor:
    """Appends to the app's audit log; says when it cannot, once, and again when it can (app.state.audit)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.failing = False

    def write(self, kind: str, action: str, outcome: str, durable: bool = False, **fields: Any) -> bool:
        """Append one line (:func:`xrayfm.audit.make_record` of the arguments); False when it cannot be
        written. `kind`: admin or prediction, the failure counter's label."""
        try:
            audit.append(self.path, audit.make_record(action, outcome, **fields), durable=durable)
        except (OSError, XrayfmError) as exc:
            AUDIT_FAILURES.labels(kind).inc()
            if not self.failing:
                log.error("audit log %s cannot be written (%s record lost): %s", self.path, kind, exc)
            self.failing = True
            return False
        if self.failing:
            log.warning("audit log %s is written again", self.path)
            self.failing = False
        return True

    async def admin_outcome(self, request: Request, status: int, code: str) -> None:
        """The error handler's hook: record how an admin request was refused (or failed)."""
        found = AdminAudit.of(request)
        if found is not None and code != "audit_unavailable":  # that one could not be written anyway
            await found.record("refused" if status < 500 else "failed", status=status, reason=code)


@dataclass
class AdminAudit:
    """One admin request's records: who, which action, on what; ``requested`` and then its outcome."""

    auditor: Auditor
    action: str
    who: str
    target: str | None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    model: dict[str, Any] | None = None
    detail: dict[str, Any] | None = None

    @classmethod
    def of(cls, request: Request) -> AdminAudit | None:
        """The request's AdminAudit (made once, kept in ``request.state``); None for a route not audited."""
        found: AdminAudit | None = getattr(request.state, "admin_audit", None)
        if found is not None:
            return found
        route: str | None = getattr(request.scope.get("route"), "path", None)
        action = ADMIN_ACTIONS.get((request.method, route)) if route is not None else None
        if action is None:
            return None
        who = actor(request.app.state.settings, request.headers.get(API_KEY_HEADER))
        found = cls(request.app.state.audit, action, who, target_of(request.path_params))
        request.state.admin_audit = found
        return found

    def update(
        self,
        action: str | None,
        target: str | None,
        model: dict[str, Any] | None,
        detail: dict[str, Any] | None,
    ) -> None:
        """Set what the route knows better than its path (the fields given, not None)."""
        self.action = action or self.action
        self.target = target or self.target
        self.model = model or self.model
        self.detail = detail or self.detail

    async def record(self, outcome: str, status: int | None = None, reason: str | None = None) -> bool:
        """Append one line, in a worker thread; fsynced, but for refusals (a flood of wrong keys costs no
        fsync each)."""
        return await anyio.to_thread.run_sync(lambda: self.auditor.write(
            "admin", self.action, outcome, durable=outcome != "refused", who=self.who, status=status, reason=reason,
            target=self.target, model=self.model, request_id=self.request_id, detail=self.detail,
        ))  # fmt: skip

    async def requested(
        self, *, action: str | None = None, target: str | None = None, model: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Record the action before it runs; 503 ``audit_unavailable`` when that line cannot be written."""
        self.update(action, target, model, detail)
        if not await self.record("requested"):
            raise APIError(
                503, "audit_unavailable", "the audit log cannot be written: admin actions are refused until "
                "it can (the gateway's log says why)", {"Retry-After": "30"},
            )  # fmt: skip

    async def ok(
        self, status: int = 200, *, target: str | None = None, model: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Record that the action was done. A line that cannot be written now is counted and logged: the
        action has happened, and its ``requested`` line is there."""
        self.update(None, target, model, detail)
        await self.record("ok", status=status)


async def admin_audit(request: Request) -> AdminAudit:
    """The dependency of the audited admin routes."""
    found = AdminAudit.of(request)
    assert found is not None, f"{request.method} {request.url.path} is not in ADMIN_ACTIONS"
    return found


AdminAuditDep = Annotated[AdminAudit, Depends(admin_audit)]


# -- predictions ----------------------------------------------------------------------------------------
@dataclass
class SeenPrediction:
    """What a prediction request got to before it ended: its job id and the finished job."""

    job_id: str | None = None
    job: JobState | None = None


def _verdict(domain: DomainInfo | None) -> dict[str, Any] | None:
    """The gate's verdict as codes (None: the gate did not run)."""
    if domain is None:
        return None
    return {"in_domain": domain.in_domain, "reasons": [r.code for r in domain.reasons]}


def prediction_facts(seen: SeenPrediction) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(model name/version/sha256, detail: the domain verdict of each image) of a finished job."""
    result = seen.job.result if seen.job is not None else None
    if isinstance(result, WorkerRejection):
        model, domains = result.error.model, [result.error.domain]
    elif isinstance(result, StudyAnswer):
        model, domains = result.model, [image.domain for image in result.images]
    elif isinstance(result, WorkerAnswer):
        model, domains = result.model, [result.domain]
    else:
        return None, None
    facts = None if model is None else {"name": model.name, "version": model.version, "sha256": model.sha256}
    return facts, {"domain": [_verdict(d) for d in domains]}


def _record_prediction(request: Request, seen: SeenPrediction, status: int, reason: str | None) -> None:
    """Append the prediction's line on the event loop (a short, unsynced append); a failure is counted and logged."""
    model, detail = prediction_facts(seen)
    request.app.state.audit.write(
        "prediction",
        PREDICT_ACTIONS[request.scope["route"].path],
        "ok" if status < 400 else "refused" if status < 500 else "failed",
        who=actor(request.app.state.settings, request.headers.get(API_KEY_HEADER)),
        status=status,
        reason=reason,
        target=job_target(seen.job_id) if seen.job_id else None,
        model=model,
        detail=detail,
    )


@asynccontextmanager
async def audit_prediction(request: Request, done_status: int = 200) -> AsyncIterator[SeenPrediction]:
    """Around one /predict, /predict/study or POST /jobs: one record, however the request ends (`done_status`,
    or the APIError's status and code). The block fills in the job id and the finished job as it gets them."""
    seen = SeenPrediction()
    try:
        yield seen
    except APIError as exc:
        _record_prediction(request, seen, exc.status, exc.code)
        raise
    except Exception:
        _record_prediction(request, seen, 500, "internal_error")
        raise
    _record_prediction(request, seen, done_status, None)
