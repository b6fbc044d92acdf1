"""The model store: list versions, promote one, roll back, set a version's operating point. Admin
endpoints (see routers/training.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends

from xrayfm import feedback
from xrayfm.errors import XrayfmError
from xrayfm_gateway.audit import AdminAuditDep, model_facts, model_target
from xrayfm_gateway.deps import SettingsDep, StoreDep, require_admin_key
from xrayfm_gateway.errors import APIError
from xrayfm_stack import store as model_store
from xrayfm_stack.protocol import (
    ErrorBody,
    ModelList,
    ModelRefBody,
    OperatingPointAnswer,
    OperatingPointBody,
    ServingAnswer,
)

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_admin_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "an admin key is needed (when auth is on)"}
}
AUDITED: dict[int | str, dict[str, Any]] = {  # the routes that change something (xrayfm_gateway.audit)
    **ERRORS,
    503: {"model": ErrorBody, "description": "audit_unavailable: the audit log cannot be written"},
}


@router.get(
    "",
    response_model=ModelList,
    responses={**ERRORS, 500: {"model": ErrorBody, "description": "the store cannot be read"}},
    summary="Model versions in the store, with metrics and lineage",
)
async def list_models(store: StoreDep, settings: SettingsDep) -> ModelList:
    """Each version with its metrics, evaluations, operating point and staff feedback (agree / disagree /
    agreement rate; null without any)."""
    try:
        versions = await anyio.to_thread.run_sync(model_store.list_versions, store)
        serving = await anyio.to_thread.run_sync(model_store.serving, store)
    except XrayfmError as exc:
        raise APIError(500, "store_unreadable", str(exc)) from None
    records = await anyio.to_thread.run_sync(feedback.load_records, settings.feedback_dir)
    rates = feedback.agreement(records)
    for row in versions:
        row["feedback"] = rates.get((row["name"], row["version"]))
    return ModelList.model_validate({"serving": serving, "models": versions})


@router.post(
    "/{name}/{version}/promote",
    response_model=ServingAnswer,
    responses={
        **AUDITED,
        404: {"model": ErrorBody, "description": "no such version"},
        422: {"model": ErrorBody, "description": "not a valid name or version"},
    },
    summary="Serve this version",
)
async def promote_model(name: str, version: str, store: StoreDep, audit: AdminAuditDep) -> ServingAnswer:
    try:
        model_store.version_dir(store, name, version)
    except XrayfmError as exc:
        raise APIError(422, "invalid_name", str(exc)) from None
    await audit.requested(model={"name": name, "version": version})
    try:
        await anyio.to_thread.run_sync(model_store.promote, store, name, version)
    except XrayfmError as exc:
        raise APIError(404, "unknown_model", str(exc)) from None
    await audit.ok(model=await model_facts(store, name, version))
    return ServingAnswer(serving=ModelRefBody(name=name, version=version))


@router.post(
    "/rollback",
    response_model=ServingAnswer,
    responses={**AUDITED, 409: {"model": ErrorBody, "description": "no earlier promoted version"}},
    summary="Serve the previously promoted version again",
)
async def rollback_model(store: StoreDep, audit: AdminAuditDep) -> ServingAnswer:
    await audit.requested()
    try:
        serving = await anyio.to_thread.run_sync(model_store.rollback, store)
    except XrayfmError as exc:
        raise APIError(409, "nothing_to_roll_back", str(exc)) from None
    model = await model_facts(store, serving["name"], serving["version"])
    await audit.ok(target=model_target(serving["name"], serving["version"]), model=model)
    return ServingAnswer(serving=ModelRefBody(**serving))


POINT_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUDITED,
    404: {"model": ErrorBody, "description": "no such version"},
    422: {"model": ErrorBody, "description": "not a valid point, or no such evaluation or candidate"},
}


@router.put(
    "/{name}/{version}/operating-point",
    response_model=OperatingPointAnswer,
    responses=POINT_ERRORS,
    summary="Set the version's decision threshold",
)
async def set_operating_point(
    name: str, version: str, body: OperatingPointBody, store: StoreDep, audit: AdminAuditDep
) -> OperatingPointAnswer:
    """A threshold with its `source`, or a candidate point of one of the version's evaluate jobs
    (`job_id` + `rule`, e.g. youden). Workers serving this version decide with it within seconds, and every
    answer states it (`model.threshold`, `model.threshold_source`)."""
    _version_folder(store, name, version)
    if body.job_id is None and (body.threshold is None or not body.source):
        raise APIError(
            422, "invalid_operating_point", "give a threshold and its source, or an evaluate job_id"
        )
    point = body.model_dump(exclude_none=True)
    await audit.requested(model={"name": name, "version": version})
    try:
        saved = await anyio.to_thread.run_sync(model_store.set_operating_point, store, name, version, point)
    except XrayfmError as exc:
        raise APIError(422, "invalid_operating_point", str(exc)) from None
    assert saved is not None, "a point given is a point written (None only clears it)"
    await audit.ok(detail={"threshold": saved.get("threshold"), "rule": saved.get("rule")})
    return OperatingPointAnswer(name=name, version=version, operating_point=saved)


@router.delete(
    "/{name}/{version}/operating-point",
    response_model=OperatingPointAnswer,
    responses=POINT_ERRORS,
    summary="Back to the default threshold 0.5 (not calibrated)",
)
async def clear_operating_point(
    name: str, version: str, store: StoreDep, audit: AdminAuditDep
) -> OperatingPointAnswer:
    _version_folder(store, name, version)
    await audit.requested(model={"name": name, "version": version})
    await anyio.to_thread.run_sync(model_store.set_operating_point, store, name, version, None)
    await audit.ok()
    return OperatingPointAnswer(name=name, version=version, operating_point=None)


def _version_folder(store: Path, name: str, version: str) -> Path:
    """The version's folder: 422 for a malformed name, 404 when it is not in the store."""
    try:
        folder = model_store.version_dir(store, name, version)
    except XrayfmError as exc:
        raise APIError(422, "invalid_name", str(exc)) from None
    if not folder.is_dir():
        raise APIError(404, "unknown_model", f"no version {name}/{version} in the model store")
    return folder
