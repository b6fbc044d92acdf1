"""The gateway's side of the two queues.

:class:`InferenceQueue`: who is ready, submit a request, wait for or look up its result. Sending goes
through Celery (the same app configuration as the workers, :mod:`xrayfm_stack.celery`); reading results
and worker heartbeats uses an asyncio Redis client, so no request thread blocks while a result is pending.

:class:`TrainingQueue`: training job records (:mod:`xrayfm_stack.jobs`), submitting jobs, and the
first-start bootstrap's state. Its Redis calls are blocking (redis-py), so each runs in a thread.

Both raise :class:`QueueUnavailable` when Redis cannot be reached; the routes answer 503.

Waiting for a result does not poll: Celery's Redis result backend PUBLISHes every state it stores on a
channel named like the result's key, so :class:`ResultListener` keeps one subscriber connection per
gateway process, subscribes to a job's channel before reading the key once (no missed answer), and hands
each published state to the waiting request. A published message that got lost (a Redis restart
under the subscriber) costs at most ``RECHECK_S``: the wait reads the key again that often.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple, cast

import anyio
import redis.asyncio as aioredis
from celery import states
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from xrayfm_stack.celery import (
    collected_publishes,
    inference_celery,
    inputs_key,
    send_training_job,
    training_celery,
)
from xrayfm_stack.jobs import BootstrapState, JobRecords, as_text, describe_bootstrap
from xrayfm_stack.protocol import (
    PREDICT_STUDY_TASK,
    PREDICT_TASK,
    PROTOCOL_VERSION,
    JobLost,
    JobRecord,
    PredictRequest,
    StudyAnswer,
    StudyRecord,
    WorkerAnswer,
    WorkerRejection,
    parse_worker_reply,
)
from xrayfm_stack.settings import QueueSettings, TrainingSettings
from xrayfm_stack.studies import recent

log = logging.getLogger("xrayfm.gateway")


# What losing Redis raises. AttributeError too: redis-py's asyncio client raises it ("'NoneType' object
# has no attribute 'writelines'") when the server closes a connection under a command, as a Redis restart
# does; seen in the compose test (1 request in ~270 answered 500 before this).
LOST = (RedisError, OSError, AttributeError)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class QueueUnavailable(Exception):
    """Redis cannot be reached (or refused the operation)."""


@dataclass
class JobState:
    """A job as the API reports it: queued, running, done or failed (with the answer or the error)."""

    status: str
    result: WorkerAnswer | StudyAnswer | WorkerRejection | None = None
    error: str | None = None  # "Type: message"
    error_type: str | None = None  # the failure's exception type, by name (e.g. protocol.InferenceTimeout)


RECHECK_S = 0.5  # a waiting request reads its result key at least this often (lost pub/sub messages)
WORKERS_CACHE_S = 0.25  # the live-worker list is read from Redis at most this often per gateway process


def protocol_mismatch(workers: list[dict[str, Any]]) -> str | None:
    """Why this gateway sends no work, in words, when live workers (their heartbeats, as
    :meth:`InferenceQueue.workers` reads them) speak another protocol version than
    :data:`~xrayfm_stack.protocol.PROTOCOL_VERSION`; None when every one speaks it.

    Every worker takes messages from the one queue, so the gateway cannot steer work around a worker of
    another version: it sends none while one is live (such a worker would misread the requests, or its
    answers would be misread), and ``/ready`` says so."""
    others = Counter(w.get("protocol") for w in workers if w.get("protocol") != PROTOCOL_VERSION)
    if not others:
        return None
    speak = [
        f"{n} worker{'s speak' if n > 1 else ' speaks'} "
        + (f"protocol {version}" if version is not None else "no protocol version (an earlier release)")
        for version, n in sorted(others.items(), key=lambda item: str(item[0]))
    ]
    return (
        f"{', '.join(speak)}, this gateway speaks {PROTOCOL_VERSION}: "
        "stop or upgrade them (they share the queue)"
    )


class ResultListener:
    """One Redis subscriber for the whole gateway process: job channel -> the waiters' message queues.

    Each waiter gets a queue rather than a future, so that every state published while it waits reaches
    it (STARTED, then the answer) without re-subscribing or reading the key again in between."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.pubsub: Any = None
        self.waiters: dict[str, set[asyncio.Queue[bytes]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.unsubscribing: set[asyncio.Task[None]] = set()

    async def watch(self, channel: str) -> asyncio.Queue[bytes]:
        """A queue that gets every message published on `channel` from now on (subscribed before
        returning); give it back with :meth:`release`."""
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        async with self.lock:
            if self.pubsub is None:
                self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            first = channel not in self.waiters
            self.waiters.setdefault(channel, set()).add(inbox)
            try:
                if first:
                    await self.pubsub.subscribe(channel)
            except RuntimeError as exc:  # uvloop's "handler is closed": Redis went away under the send
                self._drop(channel, inbox)
                raise RedisConnectionError(f"the subscriber's connection closed: {exc}") from None
            except BaseException:
                self._drop(channel, inbox)
                raise
            if self.task is None or self.task.done():
                self.task = asyncio.create_task(self._listen(), name="xrayfm-result-listener")
        return inbox

    def release(self, channel: str, inbox: asyncio.Queue[bytes]) -> None:
        """Stop waiting on `channel` with `inbox`, at once. When nobody else waits on it, the channel is
        unsubscribed in a task of its own, which runs once the caller awaits next (a waiting request:
        once its answer is on its way) and skips a channel watched again meanwhile."""
        if self._drop(channel, inbox):
            task = asyncio.create_task(self._unsubscribe(channel))
            self.unsubscribing.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.unsubscribing.discard)

    async def _unsubscribe(self, channel: str) -> None:
        async with self.lock:
            if channel in self.waiters or self.pubsub is None:
                return
            try:
                await self.pubsub.unsubscribe(channel)
            except LOST:  # the connection is gone: so is the subscription
                pass

    def _drop(self, channel: str, inbox: asyncio.Queue[bytes]) -> bool:
        waiting = self.waiters.get(channel)
        if waiting is not None:
            waiting.discard(inbox)
            if not waiting:
                del self.waiters[channel]
                return True
        return False

    async def _listen(self) -> None:
        while self.waiters:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            # RuntimeError: redis-py's "pubsub connection not set" after a reset. Waiters fall back to
            # reading their keys (RECHECK_S) meanwhile.
            except (*LOST, RuntimeError) as exc:
                log.warning("result subscriber lost Redis (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(RECHECK_S)
                async with self.lock:
                    await self._resubscribe()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            for inbox in list(self.waiters.get(channel, ())):
                inbox.put_nowait(message["data"])

    async def _resubscribe(self) -> None:
        try:
            await self.pubsub.aclose()
        except LOST:
            pass
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        if self.waiters:
            try:
                await self.pubsub.subscribe(*self.waiters)
            except LOST:
                pass  # next round

    async def close(self) -> None:
        """Stop listening and release the subscriber connection."""
        for task in (self.task, *self.unsubscribing):
            if task is not None:
                task.cancel()
        if self.pubsub is not None:
            try:
                await self.pubsub.aclose()
            except LOST:
                pass


class InferenceQueue:
    """Submit requests to the inference workers and collect their answers."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.celery = inference_celery(settings)
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1.0, socket_timeout=3.0, health_check_interval=10
        )
        # The subscriber's connection waits for messages: no socket timeout on it (get_message has its own).
        self.listener = ResultListener(
            aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, health_check_interval=10)
        )
        self._workers: tuple[float, list[dict[str, Any]]] | None = None

    async def close(self) -> None:
        """Release the Redis connections."""
        await self.listener.close()
        await self.listener.redis.aclose()
        await self.redis.aclose()

    async def workers(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Live workers (heartbeat younger than its TTL) with their self-description (read from Redis at
        most every ``WORKERS_CACHE_S``: /predict asks on every request; `fresh` always reads)."""
        cached = self._workers
        if not fresh and cached is not None and time.monotonic() - cached[0] < WORKERS_CACHE_S:
            return cached[1]
        found = await self._read_workers()
        self._workers = (time.monotonic(), found)
        return found

    async def _read_workers(self) -> list[dict[str, Any]]:
        now = time.time()
        try:
            names = await self.redis.zrangebyscore(
                self.settings.workers_key, now - self.settings.heartbeat_ttl_s, "+inf"
            )
            if not names:
                return []
            # redis-py types every reply form of ZRANGEBYSCORE together; without withscores: the members
            members = cast(list[bytes], names)
            raw = await self.redis.mget([self.settings.worker_info_key(as_text(n)) for n in members])
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        return [json.loads(item) for item in raw if item]

    async def submit(
        self,
        request: PredictRequest | list[PredictRequest],
        record: dict[str, Any],
        inputs: list[bytes],
    ) -> str:
        """Queue one request (or a study's list of them, answered in one worker call); returns its job id.
        `record` (technical facts only: no names, no header) is kept with the job until it expires, so
        that unknown ids answer 404 and results say what came in. `inputs`: the requests' images
        (:meth:`PredictRequest.to_store`), in order, written raw to the job's inputs key
        (:func:`xrayfm_stack.celery.inputs_key`) before the message that names them; they expire with it,
        and go when the answer is stored.

        The record, the inputs and the Celery message go in one pipeline from the asyncio client: Celery
        and kombu build the message (``send_task``) but do not send it (:func:`collected_publishes`), so no
        request waits on a blocking client, on the event loop or in a thread, and the message costs no round
        trip of its own."""
        job_id = str(uuid.uuid4())
        key, expires = self.settings.job_key(job_id), self.settings.result_expires_s
        try:  # all before the id is handed out, so /jobs/{id} never answers 404 for a queued job
            with collected_publishes() as message:
                self._send(job_id, request)
            async with self.redis.pipeline(transaction=False) as writes:  # executed in this order
                writes.set(key, json.dumps(record), ex=expires)
                writes.hset(inputs_key(job_id), mapping={str(i): data for i, data in enumerate(inputs)})
                writes.expire(inputs_key(job_id), expires)
                for command, args in message:  # LPUSH onto the queue, after the inputs it names
                    getattr(writes, command)(*args)
                await writes.execute()
        except (*LOST, KombuError, OperationalError) as exc:
            raise QueueUnavailable(f"cannot queue the request: {exc}") from None
        return job_id

    def _send(self, job_id: str, request: PredictRequest | list[PredictRequest]) -> None:
        args: tuple[Any, ...]
        if isinstance(request, list):
            task, args = PREDICT_STUDY_TASK, ([r.model_dump() for r in request],)
            shown = f"<study of {len(request)} images>"
        else:
            task, args, shown = PREDICT_TASK, (request.model_dump(),), request.describe()
        self.celery.send_task(
            task,
            args=args,
            task_id=job_id,
            queue=self.settings.queue,
            argsrepr=shown,  # pixels never appear in logs or events
            kwargsrepr="{}",
            expires=self.settings.result_expires_s,  # a message nobody took in time is dropped, not run
            # No queue declaration on each send (kombu's check, even cached, is a large part of building a message):
            # Celery sends to a direct queue by its name (kombu's default exchange), which needs no binding,
            # and the workers declare the queue they consume.
            declare=[],
        )

    async def keep_pixels(self, job_id: str, png: bytes) -> None:
        """Keep a job's image (PNG) as long as its result, for feedback (deployments that opted in only)."""
        try:
            await self.redis.set(
                self.settings.job_key(job_id) + ":pixels", png, ex=self.settings.result_expires_s
            )
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None

    async def pixels(self, job_id: str) -> bytes | None:
        """The image kept by :meth:`keep_pixels`, or None."""
        try:
            # redis-py types a reply bytes | str whatever the client; this one does not decode: bytes
            return cast(bytes | None, await self.redis.get(self.settings.job_key(job_id) + ":pixels"))
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None

    async def record(self, job_id: str) -> dict[str, Any] | None:
        """What was recorded when this gateway queued `job_id`; None if unknown or expired."""
        try:
            raw = await self.redis.get(self.settings.job_key(job_id))
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        return None if raw is None else json.loads(raw)

    async def state(self, job_id: str, *, check_record: bool = False) -> JobState:
        """The job's current state, read from the result backend. With `check_record` (a waiting request's
        periodic re-read), the job's record is read in the same round trip: a job with neither an answer
        nor a record went with Redis (restarted without its data, taking the queued message and the image
        along) and is failed as :class:`JobLost` at once (503: send it again), not waited for until the
        timeout (504)."""
        key = self.celery.backend.get_key_for_task(job_id)
        try:
            if check_record:
                async with self.redis.pipeline(transaction=False) as reads:
                    reads.get(key)
                    reads.exists(self.settings.job_key(job_id))
                    raw, recorded = await reads.execute()
            else:
                raw, recorded = await self.redis.get(key), True
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        if raw is not None:
            return self._decode_state(raw)
        if not recorded:
            return _failed(
                JobLost("the job's record and message are no longer in Redis (restarted without its data)")
            )
        return JobState("queued")

    def _decode_state(self, raw: Any) -> JobState:
        meta = self.celery.backend.decode_result(raw)
        status = meta.get("status")
        if status == states.SUCCESS:
            return JobState("done", result=parse_worker_reply(meta.get("result")))
        if status in states.EXCEPTION_STATES:
            return _failed(meta.get("result"))
        return JobState("running" if status == states.STARTED else "queued")

    async def wait(self, job_id: str, timeout: float) -> JobState:
        """Wait until the job is done or failed, or `timeout` seconds passed (then its last state).

        Woken by the result backend's publications; the key is read again at least every RECHECK_S."""
        deadline = time.monotonic() + timeout
        channel = self.celery.backend.get_key_for_task(job_id).decode()
        try:
            inbox = await self.listener.watch(channel)
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        try:
            job = await self.state(job_id)  # subscribed first: an answer stored before now is read here
            while job.status not in ("done", "failed"):
                left = deadline - time.monotonic()
                if left <= 0:
                    return job
                try:
                    job = self._decode_state(await asyncio.wait_for(inbox.get(), min(left, RECHECK_S)))
                except TimeoutError:  # nothing published for a while: read the key (a lost message)
                    job = await self.state(job_id, check_record=True)
            return job
        except LOST as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None
        finally:
            self.listener.release(channel, inbox)


def _failed(result: Any) -> JobState:
    """A failed task's state. Celery stores the exception as type + message (JSON); its ``decode_result``
    hands it back as an exception: the class itself where its module is imported here, else a stand-in of
    the same name (the worker's own exceptions). A raw stored dict is read too."""
    if isinstance(result, BaseException):
        kind, message = type(result).__name__, str(result)
    elif isinstance(result, dict):
        kind, message = str(result.get("exc_type", "Error")), result.get("exc_message", "")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
    else:
        kind, message = "Error", str(result)
    return JobState("failed", error=f"{kind}: {message}".strip(), error_type=kind)


class TrainingQueue:
    """Training jobs as the gateway sees them: submit, list, read, cancel; the bootstrap's state."""

    def __init__(self, settings: TrainingSettings) -> None:
        self.settings = settings
        self.celery = training_celery(settings)
        self.records = JobRecords(settings.redis_url, settings.queue)  # connects lazily: no I/O here
        self.bootstrap = BootstrapState(settings.redis_url, settings.queue)

    async def _call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (*LOST, KombuError, OperationalError) as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from None

    async def submit(self, spec: dict[str, Any]) -> str:
        """Record a checked spec as a queued job and send it to the training workers; returns its id."""
        job_id = await self._call(self.records.create, spec)
        await self._call(send_training_job, self.celery, self.settings, job_id)
        return job_id

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

    async def delete(self, job_id: str) -> tuple[str, bool] | None:
        """Delete a finished job's record and log (:meth:`JobRecords.delete`): its status and whether it
        was deleted, or None when unknown."""
        return await self._call(self.records.delete, job_id)

    async def bootstrap_detail(self) -> str | None:
        """What the first-start bootstrap is doing, for /ready; None when none is under way."""
        return await self._call(lambda: describe_bootstrap(self.bootstrap.get(), self.records))

    async def studies(self, prefix: str, limit: int) -> list[StudyRecord]:
        """The latest studies the PACS router handled (kept under its `prefix`), newest first."""
        return await self._call(recent, self.records.redis, prefix, limit)

    # Last in the class: below this method, `list` in an annotation would name it, not the builtin.
    async def list(self) -> list[JobRecord]:
        """The latest jobs, newest first (without their specs)."""
        return [JobRecord.model_validate(job) for job in await self._call(self.records.list)]
