"""The studies the PACS router handled: a capped Redis list of :class:`~xrayfm_stack.protocol.StudyRecord`
(JSON), newest first. The router appends one per study; the gateway's ``GET /studies`` reads them. It lives
in the training Redis (the router's default), under the router's key prefix (``XRAYFM_ROUTER_PREFIX``).
"""

from __future__ import annotations

import hashlib

import redis
from pydantic import ValidationError

from xrayfm_stack.protocol import StudyRecord

KEEP = 200  # the list holds the latest this many studies


def studies_key(prefix: str) -> str:
    """The list's Redis key under the router's prefix."""
    return f"{prefix}:studies"


def series_tag(series_uid: str) -> str:
    """A series named without its UID: the first 16 hex digits of the UID's SHA-256 (as in the audit log)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def push(db: redis.Redis, prefix: str, record: StudyRecord) -> None:
    """Put `record` first in the list and drop what is beyond :data:`KEEP`."""
    key = studies_key(prefix)
    pipe = db.pipeline()
    pipe.lpush(key, record.model_dump_json())
    pipe.ltrim(key, 0, KEEP - 1)
    pipe.execute()


def recent(db: redis.Redis, prefix: str, limit: int = KEEP) -> list[StudyRecord]:
    """The latest `limit` records, newest first (an entry that does not parse is left out)."""
    records = []
    for raw in db.lrange(studies_key(prefix), 0, limit - 1):
        try:
            records.append(StudyRecord.model_validate_json(raw))
        except ValidationError:
            continue
    return records
