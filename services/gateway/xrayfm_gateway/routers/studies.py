"""``GET /studies``: what the PACS router (``xrayfm_router``) did with the latest studies, newest first.

The router appends a :class:`~xrayfm_stack.protocol.StudyRecord` per study to a capped list in the training
Redis (:mod:`xrayfm_stack.studies`): the answer, each series answered or skipped with the gate's reason codes,
the SR and heatmaps written, or what failed. No patient data: a study is named by its Orthanc id. Staff read
it (the UI's "Studies" page), so it takes an API key as ``/predict`` does.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from xrayfm_gateway.deps import SettingsDep, TrainingDep, require_api_key
from xrayfm_stack.protocol import ErrorBody, StudyList
from xrayfm_stack.studies import KEEP

router = APIRouter(prefix="/studies", tags=["studies"], dependencies=[Depends(require_api_key)])


@router.get(
    "",
    response_model=StudyList,
    responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody, "description": "Redis unreachable"}},
    summary="The latest studies the PACS router answered, skipped or failed",
)
async def list_studies(
    settings: SettingsDep,
    training: TrainingDep,
    limit: int = Query(50, ge=1, le=KEEP, description="how many, newest first"),
) -> StudyList:
    """The router's records of the latest studies (it keeps the last 200)."""
    return StudyList(studies=await training.studies(settings.router_prefix, limit))
