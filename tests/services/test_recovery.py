"""A training broker that lost messages (restored from an older state, or never sent): jobs recorded as
queued are sent again, and only those (real Redis on the machine, no worker processes)."""

from __future__ import annotations

import json
import time
import uuid

from xrayfm_training.recovery import UNACKED_KEY, reconcile_queued


def _queued(records, age_s: float) -> str:
    job_id = records.create({"kind": "pretrain", "name": "m", "config": {}})
    records.redis.hset(records.key(job_id), "updated", json.dumps(time.time() - age_s))
    return job_id


def test_queued_jobs_without_a_message_are_sent_again(records) -> None:
    lost, waiting, delivered = (_queued(records, 120) for _ in range(3))
    fresh = _queued(records, 1)  # its message may still be on its way
    running = _queued(records, 120)
    records.update(running, status="running")
    queue = records.queue  # the tests' Celery queue is named like the key prefix
    records.redis.rpush(queue, json.dumps({"headers": {"id": waiting, "argsrepr": f"('{waiting}',)"}}))
    tag = f"delivery-{uuid.uuid4().hex}"
    records.redis.hset(
        UNACKED_KEY, tag, json.dumps([{"headers": {"id": f"{delivered}.requeue-1"}}, "", queue])
    )
    sent: list[tuple[str, int]] = []
    try:
        resent = reconcile_queued(records, queue, lambda job_id, n: sent.append((job_id, n)))
    finally:
        records.redis.hdel(UNACKED_KEY, tag)
    assert resent == [lost] and sent == [(lost, 1)]
    assert records.get(lost)["requeued"] == 1 and records.get(lost)["status"] == "queued"
    assert any("sent again" in line for line in records.log_tail(lost))
    assert fresh not in resent  # younger than 60 s: left alone
    assert fresh in reconcile_queued(records, queue, lambda *_: None, older_than_s=0)  # unless asked
