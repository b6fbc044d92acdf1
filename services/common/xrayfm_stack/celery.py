"""The two Celery applications of the stack, configured once: inference (Redis broker + results) and
training (the job record in Redis is the result). The gateway sends with them, the workers run them.

Reliability choices, shared by both: late acknowledgement (a message is removed only after its task
returned), so a worker killed mid-task leaves the message in Redis and another worker (or the restarted
one) gets it after the visibility timeout; one message per worker thread at a time; publishing fails fast
when Redis is down (the gateway answers 503, never hangs); JSON only; a task's arguments are never stored
with results (``result_extended`` off) nor shown in logs (``argsrepr``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

import redis
from celery import Celery, states
from celery.backends.redis import RedisBackend
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import RedisError

from xrayfm_stack.protocol import PREDICT_STUDY_TASK, PREDICT_TASK
from xrayfm_stack.settings import QueueSettings, TrainingSettings

log = logging.getLogger("xrayfm.celery")

TRAIN_TASK = "xrayfm.train_job"


class _QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that a channel whose connection is already gone does not stop the worker.

    kombu 5.7 reaches Redis through ``channel.connection``, which it sets to None when it closes the channel
    of a lost connection; anything that then touches the old channel raises AttributeError, which Celery
    treats as unrecoverable and exits. Two paths did so when Redis restarted under load (the soak):
    handing unacknowledged messages back, and the late ack of a task that finished just after the
    reconnection (its message belongs to the closed channel). Either is now a warning: the message stays
    in Redis's unacked index and is redelivered after the visibility timeout (a prediction is answered
    twice at worst; a training job resumes from its checkpoint and publishes once)."""

    def restore_unacked_once(self, stderr: IO[str] | None = None) -> None:  # noqa: D102 (kombu's)
        try:
            super().restore_unacked_once(stderr)
        except (AttributeError, RedisError, OSError) as exc:
            log.warning("could not hand unacknowledged messages back now (%s); they are redelivered "
                        "after the visibility timeout", type(exc).__name__)  # fmt: skip

    def ack(self, delivery_tag: str) -> None:  # noqa: D102 (kombu's)
        try:
            super().ack(delivery_tag)
        except AttributeError:
            if self.channel.connection is not None:
                raise  # not the closed-channel case: a real bug, keep it loud
            log.warning("could not acknowledge a message on a channel closed by a lost connection; "
                        "it is redelivered after the visibility timeout")  # fmt: skip


class PublishCommands:
    """The Redis commands that send a message, as kombu's Redis channel makes them (``("lpush", (key,
    message))``...), kept instead of sent: see :func:`collected_publishes`. It is the interface of kombu's
    own publish batches (``Channel._put(..., _publish_batch=...)``), which hand each command to ``add``."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, name: str, *args: Any) -> None:  # noqa: D102 (kombu's PublishBatch.add)
        self.commands.append((name, args))


_COLLECTING: ContextVar[PublishCommands | None] = ContextVar("xrayfm_collecting", default=None)


@contextmanager
def collected_publishes() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Inside the block, whatever this module's Redis transport publishes (``send_task``) is not sent: its
    Redis commands, built by Celery and kombu as always, land in the list yielded, for the caller to send
    in a round trip of its own (the gateway sends them from its asyncio client, in one pipeline with the
    job's record and inputs). Raises :class:`RuntimeError` if nothing was collected (a kombu without
    publish batches would have sent it already)."""
    collected = PublishCommands()
    token = _COLLECTING.set(collected)
    try:
        yield collected.commands
    finally:
        _COLLECTING.reset(token)
    if not collected.commands:
        raise RuntimeError("kombu sent the message itself: this kombu has no Redis publish batches")


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel with :class:`_QoS`, one client object for its blocking commands, and its
    publishes collected instead of sent inside :func:`collected_publishes`.

    kombu builds a new ``redis.Redis`` around the channel's connection pool for every publish, every
    message taken (recording it as unacknowledged) and every acknowledgement; building one is not free
    (redis-py 8), and it happens twice on each request's way to the worker. The client holds no connection of its own (each
    command borrows one from the pool, so threads may share it); a new pool, after a lost connection, gets a
    new client."""

    QoS = _QoS

    def _create_client(self, asynchronous: bool = False) -> redis.Redis:  # noqa: D102 (kombu's)
        if asynchronous:  # BRPOP's client: kombu keeps it itself
            client: redis.Redis = super()._create_client(asynchronous=True)
            return client
        cached: redis.Redis | None = getattr(self, "_xrayfm_client", None)
        if cached is None or cached.connection_pool is not self.pool:
            cached = self._xrayfm_client = super()._create_client()
        return cached

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:  # noqa: D102 (kombu's: LPUSH)
        collecting = _COLLECTING.get()
        if collecting is not None and kwargs.get("_publish_batch") is None:
            kwargs["_publish_batch"] = collecting
        super()._put(queue, message, **kwargs)


class RedisTransport(kombu_redis.Transport):
    """The Redis transport both Celery apps use (``broker_transport``): kombu's, with :class:`_QoS`."""

    Channel = _Channel


# Store a task state unless a SUCCESS is stored already, and publish it (unless ARGV[3] is '0'): Celery's rule
# (a redelivered task must not overwrite an answer), applied inside Redis. Unparsable stored values are
# overwritten, as Celery does. A final state also deletes the task's inputs key (KEYS[2], when given: see
# inputs_key).
_STORE_STATE = """
if KEYS[2] then redis.call('DEL', KEYS[2]) end
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
if ARGV[3] ~= '0' then redis.call('PUBLISH', KEYS[1], ARGV[1]) end
return 1
"""


class ResultBackend(RedisBackend):  # type: ignore[misc]  # Celery ships no types: its classes are Any
    """Celery's Redis result backend, storing a task's state in one round trip instead of two.

    Celery reads the stored state before writing a new one (a GET, then SETEX + PUBLISH), so that a task run
    twice cannot overwrite a SUCCESS. A prediction stores two states (STARTED, then its answer), each on the
    request's path: four round trips. :data:`_STORE_STATE` applies the same rule inside Redis
    in one call, which also closes the gap Celery leaves between its read and its write. Values stay JSON
    (``result_serializer``), which the script reads with Redis's own cjson."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing. Celery subscribes to every sent task's result channel here (and unsubscribes when its
        ``AsyncResult`` is collected), for callers that wait with ``AsyncResult.get()``; the gateway waits
        through its own subscriber (``xrayfm_gateway.queue.ResultListener``), so those were two Redis
        commands per request for nobody, inside ``send_task``. ``get()`` still works: it
        subscribes when called and reads the stored state."""

    def _store_result(  # noqa: D102 (Celery's)
        self,
        task_id: str | bytes,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        expires = self.failure_expires if state == states.FAILURE else None  # as Celery's _set_with_state
        inputs = inputs_key(bytes_to_str(task_id)) if state in states.READY_STATES else None
        self.ensure(self._set, (self.get_key_for_task(task_id), self.encode(meta), expires, inputs))
        return result

    def start_and_read_inputs(self, task_id: str, hostname: str, count: int) -> list[bytes | None]:
        """Store what Celery's ``track_started`` stores (STARTED, with this process's pid and `hostname`)
        and read the task's first `count` inputs (:func:`inputs_key`), in one round trip where Celery's
        STARTED and the read took two, both before a prediction can start. Tasks that call this at their
        start are declared with ``track_started=False``.

        STARTED is stored, not published: nobody waits for it (the gateway's waiters want the answer, and
        ``/jobs/{id}`` reads the key), and its publication woke the waiting gateway for nothing, on the
        CPU the prediction was starting on.

        Lost Redis is retried as Celery retries every store (``ensure``: ~20 s), so that a Redis restart
        is a pause, as it was with ``track_started``; then the connection error is raised."""
        inputs: list[bytes | None] = self.ensure(self._start_and_read_inputs, (task_id, hostname, count))
        return inputs

    def _start_and_read_inputs(self, task_id: str, hostname: str, count: int) -> list[bytes | None]:
        meta = self._get_result_meta(
            result={"pid": os.getpid(), "hostname": hostname},
            state=states.STARTED,
            traceback=None,
            request=None,
        )
        meta["task_id"] = task_id
        # EVAL, not the registered script's EVALSHA: redis-py checks a pipeline's scripts with one more
        # round trip (SCRIPT EXISTS) on every execute; Redis finds the compiled script by its hash anyway.
        with self.client.pipeline(transaction=False) as pipe:
            pipe.eval(
                _STORE_STATE, 1, self.get_key_for_task(task_id), self.encode(meta), int(self.expires or 0), 0
            )
            if count:
                pipe.hmget(inputs_key(task_id), [str(i) for i in range(count)])
            replies = pipe.execute()
        return replies[1] if count else []

    def _set(  # noqa: D102 (Celery's, through ensure(): retries)
        self, key: str | bytes, value: str | bytes, expires: float | None = None, inputs: str | None = None
    ) -> None:
        expires = self.expires if expires is None else expires
        script = self.__dict__.get("_xrayfm_store")
        if script is None:  # redis-py's Script: EVALSHA, loading the script again after a Redis restart
            script = self.__dict__["_xrayfm_store"] = self.client.register_script(_STORE_STATE)
        keys = [key] if inputs is None else [key, inputs]
        script(keys=keys, args=[value, int(expires or 0), 1], client=self.client)


INPUTS_PREFIX = "xrayfm-task-inputs-"


def inputs_key(task_id: str) -> str:
    """The Redis key (a hash) where a task's large inputs wait beside its message, raw, out of its JSON:
    the images of a prediction (``PredictRequest.stored``). The gateway writes it before sending the task,
    with the message's expiry; :class:`ResultBackend` deletes it when it stores the task's final state, so
    that an image stays in Redis exactly as long as the message that needs it would be redelivered."""
    return f"{INPUTS_PREFIX}{task_id}"


def backend_url(redis_url: str) -> str:
    """The result backend setting for `redis_url`: :class:`ResultBackend` on that Redis."""
    return f"{__name__}:ResultBackend+{redis_url}"


BOOTSTRAP_TASK = "xrayfm.bootstrap_demo"


def reliable_queue_conf(queue: str, visibility_timeout_s: int) -> dict[str, Any]:
    """The settings both Celery apps share: JSON only, late acknowledgement, redelivery of a dead worker's
    message after `visibility_timeout_s`, one message per worker at a time, fail-fast publishing when
    Redis is down, no task events."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,  # a task that failed cleanly is not retried forever
        "task_publish_retry": False,  # Redis down: fail at once (the gateway answers 503), never hang
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            # Sweep for abandoned (unacknowledged) messages every second, so redelivery happens right
            # after the visibility timeout instead of up to 100 s later (kombu's default interval x throttle).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
            # The JSON body goes into the message as it is, not base64-encoded once more (kombu's default
            # for Redis): a third less to push and pop, and so less queue wait for large requests.
            # Receivers decode by the message's own body_encoding, so either kind of sender works.
            "body_encoding": None,
        },
        "broker_transport": f"{__name__}:RedisTransport",  # survives a Redis restart (see _QoS)
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 2,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def inference_celery(settings: QueueSettings | None = None) -> Celery:
    """The inference queue's Celery app, configured from `settings` (default: the environment)."""
    settings = QueueSettings.from_env() if settings is None else settings
    app = Celery("xrayfm", broker=settings.redis_url, backend=backend_url(settings.redis_url))
    app.conf.update(
        **reliable_queue_conf(settings.queue, settings.visibility_timeout_s),
        task_routes={PREDICT_TASK: {"queue": settings.queue}, PREDICT_STUDY_TASK: {"queue": settings.queue}},
        task_track_started=True,
        task_time_limit=settings.task_time_limit_s + 5,  # enforced by prefork pools; threads: see worker
        result_expires=settings.result_expires_s,
        result_extended=False,
        result_backend_transport_options={"socket_connect_timeout": 2, "socket_timeout": 10},
        redis_socket_connect_timeout=2,
        redis_socket_timeout=10,
    )
    return app


def training_celery(settings: TrainingSettings | None = None) -> Celery:
    """The training queue's Celery app. Long jobs: a visibility timeout of hours; a redelivered job still
    running elsewhere is recognised by its Redis lock and not run twice. Messages carry the job id only."""
    settings = TrainingSettings.from_env() if settings is None else settings
    app = Celery("xrayfm-training", broker=settings.redis_url, backend=backend_url(settings.redis_url))
    app.conf.update(
        **reliable_queue_conf(settings.queue, settings.visibility_timeout_s),
        task_routes={TRAIN_TASK: {"queue": settings.queue}, BOOTSTRAP_TASK: {"queue": settings.queue}},
        task_ignore_result=True,  # the job record in Redis is the result
    )
    return app


def send_training_job(app: Celery, settings: TrainingSettings, job_id: str) -> None:
    """Queue the training job `job_id` (its record must exist)."""
    app.send_task(TRAIN_TASK, args=(job_id,), task_id=job_id, queue=settings.queue)
