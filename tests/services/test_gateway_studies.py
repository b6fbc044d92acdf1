"""``GET /studies`` in process: the real gateway app (TestClient) reading the PACS router's list of studies
from a real Redis (127.0.0.1:6379, under a key prefix of its own, as the router writes it); the API key it
needs, its limit, the list's cap, and 503 in the one error shape when Redis is unreachable."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from tests.services.gateway_fakes import FakeQueue, gateway_client
from tests.services.svc_helpers import free_port
from xrayfm_gateway.queue import TrainingQueue
from xrayfm_stack import studies
from xrayfm_stack.protocol import SeriesOutcome, StudyRecord
from xrayfm_stack.settings import TrainingSettings

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "staff-key"
STUDY = "0d5b8c44-8cbf9d24-5f2bd8a9-6a0c7e3d-01a2b3c4"


@pytest.fixture()
def prefix() -> Iterator[str]:
    """A router key prefix of the test's own in the real Redis; its list deleted afterwards."""
    db = redis.Redis.from_url(REDIS_URL)
    try:
        db.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"xrayfm-test-{uuid.uuid4().hex[:8]}:router"
    yield prefix
    db.delete(studies.studies_key(prefix))


def _client(prefix: str, redis_url: str = REDIS_URL) -> TestClient:
    training = TrainingQueue(TrainingSettings(redis_url=redis_url))
    return gateway_client(FakeQueue(), training, router_prefix=prefix, api_keys=frozenset({KEY}))


def _record(n: int, **fields) -> StudyRecord:
    fields.setdefault("outcome", "answered")
    return StudyRecord(time=1_800_000_000.0 + n, study=f"{STUDY[:-2]}{n:02d}", **fields)


def test_lists_the_routers_studies_newest_first(prefix):
    db = redis.Redis.from_url(REDIS_URL)
    tibia = SeriesOutcome(
        series="ab" * 8, instances=1, answered=False, reason="out_of_domain", gate=["body_part"]
    )
    chest = SeriesOutcome(series="cd" * 8, instances=3, answered=True)
    studies.push(db, prefix, _record(1, outcome="skipped", series=[tibia]))
    db.lpush(studies.studies_key(prefix), b"{not json")  # an entry that does not parse is left out
    studies.push(db, prefix, _record(2, job_id="j2", prediction="Abnormal", probability=0.91,
                                     model="m/3", series=[chest, tibia], sr_written=True, captures=3))  # fmt: skip
    with _client(prefix) as http:
        resp = http.get("/studies", headers={"X-API-Key": KEY})
        assert resp.status_code == 200, resp.text
        listed = resp.json()["studies"]
        assert [s["study"][-2:] for s in listed] == ["02", "01"]
        newest = listed[0]
        assert (
            newest["prediction"] == "Abnormal" and newest["probability"] == 0.91 and newest["model"] == "m/3"
        )
        assert newest["sr_written"] is True and newest["captures"] == 3 and newest["job_id"] == "j2"
        assert newest["series"][1] == tibia.model_dump()
        assert listed[1]["outcome"] == "skipped" and listed[1]["sr_written"] is False
        only = http.get("/studies", params={"limit": 1}, headers={"X-API-Key": KEY}).json()["studies"]
        assert [s["study"][-2:] for s in only] == ["02"]
        assert http.get("/studies", params={"limit": 0}, headers={"X-API-Key": KEY}).status_code == 422


def test_the_list_keeps_the_latest_only(prefix):
    db = redis.Redis.from_url(REDIS_URL)
    for n in range(studies.KEEP + 5):
        studies.push(db, prefix, _record(n % 100))
    assert db.llen(studies.studies_key(prefix)) == studies.KEEP
    assert studies.recent(db, prefix, 1)[0].time == _record((studies.KEEP + 4) % 100).time


def test_needs_the_api_key(prefix):
    with _client(prefix) as http:
        for headers in ({}, {"X-API-Key": "wrong"}):
            resp = http.get("/studies", headers=headers)
            assert resp.status_code == 401 and resp.json()["error"] == "unauthorized", resp.text


def test_503_when_redis_is_unreachable(prefix):
    with _client(prefix, f"redis://127.0.0.1:{free_port()}/0") as http:
        resp = http.get("/studies", headers={"X-API-Key": KEY})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5", resp.text
    body = resp.json()
    assert body["error"] == "queue_unavailable" and "Redis unreachable" in body["detail"]
