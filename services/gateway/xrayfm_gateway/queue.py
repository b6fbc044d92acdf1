"""The gateway's side of the queue: who is ready, submit a request, wait for or look up its result.

Sending goes through Celery (the same app configuration as the workers); reading results and worker
heartbeats uses an asyncio Redis client, so no request thread blocks while a result is pending.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import states
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError

from xrayfm_inference.celery_app import make_celery
from xrayfm_inference.config import QueueSettings
from xrayfm_inference.protocol import PREDICT_TASK, describe_request

log = logging.getLogger("xrayfm.gateway")


class QueueUnavailable(Exception):
    """Redis cannot be reached (or refused the operation)."""


@dataclass
class JobState:
    """A job as the API reports it: queued, running, done or failed (with the result or the error)."""

    status: str
    result: dict[str, Any] | None = None
    error: str | None = None


class QueueClient:
    """Submit requests to the inference workers and collect their answers."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1.0, socket_timeout=3.0, health_check_interval=10
        )

    async def close(self) -> None:
        """Release the Redis connections."""
        await self.redis.aclose()

    async def workers(self) -> list[dict[str, Any]]:
        """Live workers (heartbeat younger than its TTL) with their self-description."""
        now = time.time()
        try:
            names = await self.redis.zrangebyscore(
                self.settings.workers_key, now - self.settings.heartbeat_ttl_s, "+inf"
            )
            if not names:
                return []
            raw = await self.redis.mget([self.settings.worker_info_key(n.decode()) for n in names])
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        return [json.loads(item) for item in raw if item]

    async def submit(self, payload: dict[str, Any], record: dict[str, Any]) -> str:
        """Queue one request; returns its job id. `record` (technical facts only: no names, no header)
        is kept with the job until it expires, so that unknown ids answer 404 and results say what came in."""
        job_id = str(uuid.uuid4())
        try:
            await self.redis.set(
                self.settings.job_key(job_id), json.dumps(record), ex=self.settings.result_expires_s
            )
            await anyio.to_thread.run_sync(self._send, job_id, payload)
        except (RedisError, OSError, KombuError, OperationalError) as exc:
            raise QueueUnavailable(f"cannot queue the request: {exc}") from None
        return job_id

    def _send(self, job_id: str, payload: dict[str, Any]) -> None:
        self.celery.send_task(
            PREDICT_TASK,
            args=(payload,),
            task_id=job_id,
            queue=self.settings.queue,
            argsrepr=describe_request(payload),  # pixels never appear in logs or events
            kwargsrepr="{}",
            expires=self.settings.result_expires_s,  # a message nobody took in time is dropped, not run
        )

    async def record(self, job_id: str) -> dict[str, Any] | None:
        """What was recorded when this gateway queued `job_id`; None if unknown or expired."""
        try:
            raw = await self.redis.get(self.settings.job_key(job_id))
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        return None if raw is None else json.loads(raw)

    async def state(self, job_id: str) -> JobState:
        """The job's current state, read from the result backend."""
        backend = self.celery.backend
        try:
            raw = await self.redis.get(backend.get_key_for_task(job_id))
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        if raw is None:
            return JobState("queued")
        meta = backend.decode_result(raw)
        status = meta.get("status")
        if status == states.SUCCESS:
            return JobState("done", result=meta.get("result"))
        if status in states.EXCEPTION_STATES:
            return JobState("failed", error=_error_text(meta.get("result")))
        return JobState("running" if status == states.STARTED else "queued")

    async def wait(self, job_id: str, timeout: float) -> JobState:
        """Poll the job until it is done or failed, or `timeout` seconds passed (then its last state)."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            job = await self.state(job_id)
            if job.status in ("done", "failed") or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.01)  # 10 ms at most: Redis GETs are cheap, latency matters


def _error_text(result: Any) -> str:
    """A failed task's error as text (Celery stores the exception as type + message in JSON)."""
    if isinstance(result, dict):
        message = result.get("exc_message", "")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        return f"{result.get('exc_type', 'Error')}: {message}".strip()
    return str(result)
