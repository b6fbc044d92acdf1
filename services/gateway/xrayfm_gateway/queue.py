"""The gateway's side of the two queues.

:class:`InferenceQueue`: who is ready, submit a request, wait for or look up its result. Sending goes
through Celery (the same app configuration as the workers, :mod:`xrayfm_stack.celery`); reading results
and worker heartbeats uses an asyncio Redis client, so no request thread blocks while a result is pending.

:class:`TrainingQueue`: training job records (:mod:`xrayfm_stack.jobs`), submitting jobs, and the
first-start bootstrap's state. Its Redis calls are blocking (redis-py), so each runs in a thread.

Both raise :class:`QueueUnavailable` when Redis cannot be reached; the routes answer 503.
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

from xrayfm_stack.celery import inference_celery, send_training_job, training_celery
from xrayfm_stack.jobs import BootstrapState, JobRecords, describe_bootstrap
from xrayfm_stack.protocol import (
    PREDICT_TASK,
    JobRecord,
    PredictRequest,
    WorkerAnswer,
    WorkerRejection,
    parse_worker_reply,
)
from xrayfm_stack.settings import QueueSettings, TrainingSettings

log = logging.getLogger("xrayfm.gateway")


class QueueUnavailable(Exception):
    """Redis cannot be reached (or refused the operation)."""


@dataclass
class JobState:
    """A job as the API reports it: queued, running, done or failed (with the answer or the error)."""

    status: str
    result: WorkerAnswer | WorkerRejection | None = None
    error: str | None = None


class InferenceQueue:
    """Submit requests to the inference workers and collect their answers."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.celery = inference_celery(settings)
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

    async def submit(self, request: PredictRequest, record: dict[str, Any]) -> str:
        """Queue one request; returns its job id. `record` (technical facts only: no names, no header)
        is kept with the job until it expires, so that unknown ids answer 404 and results say what came in."""
        job_id = str(uuid.uuid4())
        try:
            await self.redis.set(
                self.settings.job_key(job_id), json.dumps(record), ex=self.settings.result_expires_s
            )
            await anyio.to_thread.run_sync(self._send, job_id, request)
        except (RedisError, OSError, KombuError, OperationalError) as exc:
            raise QueueUnavailable(f"cannot queue the request: {exc}") from None
        return job_id

    def _send(self, job_id: str, request: PredictRequest) -> None:
        self.celery.send_task(
            PREDICT_TASK,
            args=(request.model_dump(),),
            task_id=job_id,
            queue=self.settings.queue,
            argsrepr=request.describe(),  # pixels never appear in logs or events
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
            return JobState("done", result=parse_worker_reply(meta.get("result")))
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


class TrainingQueue:
    """Training jobs as the gateway sees them: submit, list, read, cancel; the bootstrap's state."""

    def __init__(self, settings: TrainingSettings) -> None:
        self.settings = settings
        self.celery = training_celery(settings)
        self.records = JobRecords(settings.redis_url, settings.queue)  # connects lazily: no I/O here
        self.bootstrap = BootstrapState(settings.redis_url, settings.queue)

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (RedisError, OSError, KombuError, OperationalError) as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None

    async def submit(self, spec: dict[str, Any]) -> str:
        """Record a checked spec as a queued job and send it to the training workers; returns its id."""
        job_id = await self._call(self.records.create, spec)
        await self._call(send_training_job, self.celery, self.settings, job_id)
        return job_id

    async def list(self) -> list[JobRecord]:
        """The latest jobs, newest first (without their specs)."""
        return [JobRecord.model_validate(job) for job in await self._call(self.records.list)]

    async def get(self, job_id: str) -> JobRecord | None:
        """One job's full record, or None when unknown."""
        job = await self._call(self.records.get, job_id)
        return None if job is None else JobRecord.model_validate(job)

    async def log_tail(self, job_id: str, lines: int) -> list[str]:
        """The last `lines` lines of the job's log."""
        return await self._call(self.records.log_tail, job_id, lines)

    async def cancel(self, job_id: str) -> str:
        """Ask the job to stop; returns its new status."""
        return await self._call(self.records.request_cancel, job_id)

    async def bootstrap_detail(self) -> str | None:
        """What the first-start bootstrap is doing, for /ready; None when none is under way."""
        return await self._call(lambda: describe_bootstrap(self.bootstrap.get(), self.records))
