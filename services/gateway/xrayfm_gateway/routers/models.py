"""The model store: list versions, promote one, roll back. Admin endpoints (see routers/training.py)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends

from xrayfm.errors import XrayfmError
from xrayfm_gateway.deps import StoreDep, require_admin_key
from xrayfm_gateway.errors import APIError
from xrayfm_stack import store as model_store
from xrayfm_stack.protocol import ErrorBody, ModelList, ModelRefBody, ServingAnswer

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_admin_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "an admin key is needed (when auth is on)"}
}


@router.get(
    "",
    response_model=ModelList,
    responses={**ERRORS, 500: {"model": ErrorBody, "description": "the store cannot be read"}},
    summary="Model versions in the store, with metrics and lineage",
)
async def list_models(store: StoreDep) -> ModelList:
    try:
        versions = await anyio.to_thread.run_sync(model_store.list_versions, store)
        serving = await anyio.to_thread.run_sync(model_store.serving, store)
    except XrayfmError as exc:
        raise APIError(500, "store_unreadable", str(exc)) from None
    return ModelList(serving=serving, models=versions)


@router.post(
    "/{name}/{version}/promote",
    response_model=ServingAnswer,
    responses={
        **ERRORS,
        404: {"model": ErrorBody, "description": "no such version"},
        422: {"model": ErrorBody, "description": "not a valid name or version"},
    },
    summary="Serve this version",
)
async def promote_model(name: str, version: str, store: StoreDep) -> ServingAnswer:
    try:
        model_store.version_dir(store, name, version)
    except XrayfmError as exc:
        raise APIError(422, "invalid_name", str(exc)) from None
    try:
        await anyio.to_thread.run_sync(model_store.promote, store, name, version)
    except XrayfmError as exc:
        raise APIError(404, "unknown_model", str(exc)) from None
    return ServingAnswer(serving=ModelRefBody(name=name, version=version))


@router.post(
    "/rollback",
    response_model=ServingAnswer,
    responses={**ERRORS, 409: {"model": ErrorBody, "description": "no earlier promoted version"}},
    summary="Serve the previously promoted version again",
)
async def rollback_model(store: StoreDep) -> ServingAnswer:
    try:
        serving = await anyio.to_thread.run_sync(model_store.rollback, store)
    except XrayfmError as exc:
        raise APIError(409, "nothing_to_roll_back", str(exc)) from None
    return ServingAnswer(serving=ModelRefBody(**serving))
