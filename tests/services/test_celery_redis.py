"""The stack's Celery pieces on the machine's real Redis (db 14): the result backend that stores a state in
one call (:class:`xrayfm_stack.celery.ResultBackend`) and kombu's channel with one reused client."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from celery import states

from xrayfm_stack.celery import ResultBackend, collected_publishes, inference_celery, inputs_key
from xrayfm_stack.settings import QueueSettings

URL = "redis://127.0.0.1:6379/14"


def published(pubsub, timeout: float) -> dict | None:
    """The next message published on `pubsub`'s channels within `timeout` s (subscribe replies skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            return json.loads(message["data"])
    return None


@pytest.fixture()
def client() -> redis.Redis:
    client = redis.Redis.from_url(URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return client


@pytest.fixture()
def app(client: redis.Redis):
    return inference_celery(
        QueueSettings(redis_url=URL, queue=f"xrayfm-test-{uuid.uuid4().hex[:8]}", result_expires_s=77)
    )


def test_each_state_is_stored_published_and_expires(app, client: redis.Redis) -> None:
    backend = app.backend
    assert isinstance(backend, ResultBackend)
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    pubsub = client.pubsub()
    pubsub.subscribe(key)
    try:
        backend.store_result(task_id, {"pid": 1}, states.STARTED)
        assert (published(pubsub, 2) or {}).get("status") == "STARTED"
        assert 0 < client.ttl(key) <= 77  # result_expires
        backend.store_result(task_id, {"probability": 0.7}, states.SUCCESS)
        meta = backend.get_task_meta(task_id, cache=False)
        assert (meta["status"], meta["result"]) == ("SUCCESS", {"probability": 0.7})
        assert (published(pubsub, 2) or {}).get("status") == "SUCCESS"
    finally:
        pubsub.close()
        client.delete(key)


@pytest.mark.parametrize("final", [states.SUCCESS, states.FAILURE])
def test_a_final_state_deletes_the_tasks_inputs_and_no_other_does(app, client: redis.Redis, final) -> None:
    """The images waiting in a task's inputs key go when its answer (or failure) is stored, not when it
    starts: a task that dies before its answer is redelivered with its image still there."""
    backend, task_id = app.backend, str(uuid.uuid4())
    inputs = inputs_key(task_id)
    client.hset(inputs, "0", b"\x00\xff raw pixels")
    try:
        backend.store_result(task_id, {"pid": 1}, states.STARTED)
        assert client.hget(inputs, "0") == b"\x00\xff raw pixels"
        result = {"probability": 0.7} if final == states.SUCCESS else ValueError("no")
        backend.store_result(task_id, result, final)
        assert not client.exists(inputs)
        assert backend.get_task_meta(task_id, cache=False)["status"] == final
    finally:
        client.delete(inputs, backend.get_key_for_task(task_id))


def test_a_stored_answer_is_never_overwritten(app, client: redis.Redis) -> None:
    """Celery's rule (a task run twice, e.g. redelivered after a lost worker, must not replace the answer),
    now inside Redis: a later STARTED or FAILURE leaves the SUCCESS and publishes nothing."""
    backend = app.backend
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    try:
        backend.store_result(task_id, {"probability": 0.7}, states.SUCCESS)
        pubsub = client.pubsub()
        pubsub.subscribe(key)
        backend.store_result(task_id, {"pid": 2}, states.STARTED)
        backend.mark_as_failure(task_id, RuntimeError("second run"))
        assert published(pubsub, 0.5) is None
        pubsub.close()
        meta = json.loads(client.get(key))
        assert (meta["status"], meta["result"]) == ("SUCCESS", {"probability": 0.7})
        client.set(key, b"not json")  # what Celery would overwrite, it still does
        backend.store_result(task_id, {"pid": 3}, states.STARTED)
        assert json.loads(client.get(key))["status"] == "STARTED"
    finally:
        client.delete(key)


def test_storing_survives_redis_forgetting_the_script(app, client: redis.Redis) -> None:
    """A restarted Redis has no scripts loaded: the next store loads it again instead of failing."""
    backend = app.backend
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    try:
        backend.store_result(task_id, {"pid": 1}, states.STARTED)
        client.script_flush()
        backend.store_result(task_id, {"probability": 0.1}, states.SUCCESS)
        assert json.loads(client.get(key))["status"] == "SUCCESS"
    finally:
        client.delete(key)


def test_the_channel_reuses_one_client_until_its_pool_is_replaced(app, client: redis.Redis) -> None:
    """Publishing, taking and acknowledging go through one client object; after kombu replaces the
    connection pool (as on a lost connection) the client is rebuilt on the new pool and messages flow."""
    import kombu

    name = app.conf.task_default_queue
    with app.connection_for_write() as conn:
        channel = conn.channel()
        queue = kombu.Queue(name, channel=channel)
        queue.declare()
        try:
            first = channel._create_client()
            assert channel._create_client() is first and first.connection_pool is channel.pool
            for n in (1, 2):
                kombu.Producer(channel).publish({"n": n}, routing_key=name, serializer="json")
                message = queue.get(no_ack=False)
                assert message.payload == {"n": n}
                message.ack()
                assert not client.hexists("unacked", message.delivery_tag)
                channel._disconnect_pools()  # the next round runs on a new pool
            assert channel._create_client() is not first
            assert channel._create_client().connection_pool is channel.pool
        finally:
            client.delete(name)
            channel.close()


def test_sending_does_not_subscribe_yet_results_can_still_be_awaited(app, client: redis.Redis) -> None:
    """The gateway waits through its own subscriber, so sending a task subscribes to nothing; a caller
    that does wait with ``AsyncResult.get()`` still gets the result (stored before or after it asks)."""
    task_id = str(uuid.uuid4())
    result = app.send_task("xrayfm.never_run", args=(1,), task_id=task_id, queue=app.conf.task_default_queue)
    try:
        key = app.backend.get_key_for_task(task_id)
        assert client.pubsub_numsub(key) == [(key, 0)]
        app.backend.store_result(task_id, {"answer": 42}, states.SUCCESS)
        assert result.get(timeout=5) == {"answer": 42}
    finally:
        client.delete(app.conf.task_default_queue, app.backend.get_key_for_task(task_id))


def test_a_collected_publish_is_the_message_kombu_would_have_sent(app, client: redis.Redis) -> None:
    """Inside ``collected_publishes`` nothing reaches Redis: the commands kombu would have run come back
    (an LPUSH onto the queue), and the message they push is the one ``send_task`` sends outside it, but
    for its own id and delivery tag."""
    queue = app.conf.task_default_queue
    options = {"args": ({"x": 1},), "queue": queue, "argsrepr": "<x>", "kwargsrepr": "{}", "expires": 60}
    try:
        with collected_publishes() as commands:
            app.send_task("xrayfm.never_run", task_id="collected", **options)
        assert client.llen(queue) == 0
        [(name, (key, payload))] = commands
        assert (name, key) == ("lpush", queue)
        app.send_task("xrayfm.never_run", task_id="sent", **options)
        [sent] = client.lrange(queue, 0, -1)
    finally:
        client.delete(queue)
    collected, sent = json.loads(payload), json.loads(sent)
    for message, task_id in ((collected, "collected"), (sent, "sent")):
        assert message["headers"].pop("id") == message["properties"].pop("correlation_id") == task_id
        message["headers"].pop("root_id")
        message["headers"].pop("expires")  # a time stamp: now + 60 s
        message["properties"].pop("delivery_tag")
    assert collected == sent
    with pytest.raises(RuntimeError, match="kombu sent the message itself"), collected_publishes():
        pass  # nothing published: as if this kombu had sent it (no publish batches)


def test_the_gateway_queues_record_inputs_and_message_in_one_go(client: redis.Redis) -> None:
    """`InferenceQueue.submit` writes the job record and the inputs and pushes the Celery message, all from
    its asyncio client: the message is in the queue under the job's id; with Redis gone, QueueUnavailable."""
    import asyncio

    import numpy as np

    from xrayfm_gateway.queue import InferenceQueue, QueueUnavailable
    from xrayfm_stack.protocol import PredictRequest

    settings = QueueSettings(redis_url=URL, queue=f"xrayfm-test-{uuid.uuid4().hex[:8]}")
    request, pixels = PredictRequest.to_store(np.full((8, 8), 7, dtype=np.uint8))

    async def submit(queue: InferenceQueue) -> str:
        try:
            return await queue.submit(request, {"decode_ms": 1.0}, inputs=[pixels])
        finally:
            await queue.close()

    job_id = asyncio.run(submit(InferenceQueue(settings)))
    try:
        [message] = client.lrange(settings.queue, 0, -1)
        assert json.loads(message)["headers"]["id"] == job_id
        assert json.loads(client.get(settings.job_key(job_id))) == {"decode_ms": 1.0}
        assert client.hgetall(inputs_key(job_id)) == {b"0": pixels}
        assert 0 < client.ttl(inputs_key(job_id)) <= settings.result_expires_s
    finally:
        client.delete(settings.queue, settings.job_key(job_id), inputs_key(job_id))
    gone = QueueSettings(redis_url="redis://127.0.0.1:9/0", queue=settings.queue)
    with pytest.raises(QueueUnavailable):
        asyncio.run(submit(InferenceQueue(gone)))


def test_started_and_the_inputs_in_one_call(app, client: redis.Redis) -> None:
    """``start_and_read_inputs`` stores STARTED as Celery's ``track_started`` would (pid and host name)
    without publishing it, leaves the inputs in place, and gives them back in order (None for a missing
    one)."""
    import os

    backend, task_id = app.backend, str(uuid.uuid4())
    key, inputs = backend.get_key_for_task(task_id), inputs_key(task_id)
    client.hset(inputs, mapping={"0": b"first", "1": b"second"})
    pubsub = client.pubsub()
    pubsub.subscribe(key)
    try:
        assert backend.start_and_read_inputs(task_id, "w1@host", 3) == [b"first", b"second", None]
        meta = backend.get_task_meta(task_id, cache=False)
        assert meta["status"] == states.STARTED and meta["result"] == {
            "pid": os.getpid(),
            "hostname": "w1@host",
        }
        assert 0 < client.ttl(key) <= 77 and client.exists(inputs)
        backend.store_result(task_id, {"probability": 0.7}, states.SUCCESS)
        assert (published(pubsub, 2) or {}).get("status") == "SUCCESS"  # the first published: STARTED was not
        assert backend.start_and_read_inputs(task_id, "w1@host", 0) == []  # a redelivery: SUCCESS stays
        assert backend.get_task_meta(task_id, cache=False)["status"] == states.SUCCESS
    finally:
        pubsub.close()
        client.delete(key, inputs)


def test_waiters_get_the_answer_and_the_channel_is_let_go(client: redis.Redis) -> None:
    """Two requests waiting on one job both get its answer, published after they began waiting; once both
    have it, the gateway's subscriber leaves the job's channel (in the background: the answers go first)."""
    import asyncio

    from xrayfm_gateway.queue import InferenceQueue

    settings = QueueSettings(redis_url=URL, queue=f"xrayfm-test-{uuid.uuid4().hex[:8]}")
    job_id, reply = str(uuid.uuid4()), {"error": {"type": "bad_request", "message": "no"}}

    async def scenario() -> tuple[list, list]:
        queue = InferenceQueue(settings)
        backend = queue.celery.backend
        channel = backend.get_key_for_task(job_id).decode()
        try:
            waiting = [asyncio.create_task(queue.wait(job_id, 10)) for _ in range(2)]
            while client.pubsub_numsub(channel)[0][1] == 0:  # both subscribed through one connection
                await asyncio.sleep(0.01)
            await asyncio.to_thread(backend.store_result, job_id, reply, states.SUCCESS)
            jobs = await asyncio.gather(*waiting)
            for _ in range(100):
                if client.pubsub_numsub(channel)[0][1] == 0:
                    break
                await asyncio.sleep(0.01)
            return jobs, client.pubsub_numsub(channel)
        finally:
            await queue.close()
            client.delete(backend.get_key_for_task(job_id))

    jobs, subscribers = asyncio.run(scenario())
    assert [job.status for job in jobs] == ["done", "done"]
    assert all(job.result.error.message == "no" for job in jobs)
    assert subscribers[0][1] == 0


def test_the_gateway_reads_a_stored_failure_by_its_type(app, client: redis.Redis) -> None:
    """A failure stored by the real result backend reaches the gateway with its exception's type, whether
    the gateway imports that type (the protocol's InferenceTimeout and JobLost) or not (a worker's own):
    Celery's decoding hands back an exception object, not the stored dict."""
    import asyncio

    from xrayfm_gateway.queue import InferenceQueue
    from xrayfm_stack.protocol import InferenceTimeout, JobLost

    class WorkerOnly(Exception):
        pass

    WorkerOnly.__module__, WorkerOnly.__qualname__ = "xrayfm_inference.not_imported_here", "WorkerOnly"
    failures = [InferenceTimeout("did not finish"), JobLost("image gone"), WorkerOnly("boom")]
    ids = [str(uuid.uuid4()) for _ in failures]
    for task_id, exc in zip(ids, failures, strict=True):
        app.backend.mark_as_failure(task_id, exc)

    async def read() -> list:
        queue = InferenceQueue(QueueSettings(redis_url=URL, queue=app.conf.task_default_queue))
        try:
            return [await queue.state(task_id) for task_id in ids]
        finally:
            await queue.close()

    try:
        jobs = asyncio.run(read())
    finally:
        client.delete(*(app.backend.get_key_for_task(task_id) for task_id in ids))
    assert [(job.status, job.error_type) for job in jobs] == [
        ("failed", "InferenceTimeout"),
        ("failed", "JobLost"),
        ("failed", "WorkerOnly"),
    ]
    assert [job.error for job in jobs] == [
        "InferenceTimeout: did not finish",
        "JobLost: image gone",
        "WorkerOnly: boom",
    ]


def test_starting_a_task_waits_out_a_redis_restart(tmp_path) -> None:
    """``start_and_read_inputs`` retries a lost Redis as Celery retries its stores: the call made while
    Redis is down returns once Redis is back (here ~1.5 s later) instead of failing the task."""
    import threading

    from tests.services.svc_helpers import require_redis_server
    from xrayfm_local import launcher as stack_lib

    require_redis_server()
    port, stack = stack_lib.free_port(), stack_lib.Stack(tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    backend = inference_celery(QueueSettings(redis_url=url, queue="xrayfm-test-restart")).backend
    task_id = str(uuid.uuid4())
    later = threading.Timer(1.5, stack.start_redis, (port,))
    later.start()
    try:
        started = time.monotonic()
        assert backend.start_and_read_inputs(task_id, "w1@host", 1) == [None]
        assert time.monotonic() - started >= 1.0  # it did wait for Redis
        assert backend.get_task_meta(task_id, cache=False)["status"] == states.STARTED
    finally:
        later.join()
        stack.stop_all()


def test_a_wait_notices_a_job_lost_with_redis(client: redis.Redis) -> None:
    """A queued job nobody takes is waited for until the timeout (then still "queued": the gateway's 504);
    once its record is gone too, as when Redis restarted without its data, the wait ends within a recheck
    as failed ``JobLost`` (the gateway's 503: send it again) instead of running out the timeout."""
    import asyncio

    import numpy as np

    from xrayfm_gateway.queue import RECHECK_S, InferenceQueue
    from xrayfm_stack.protocol import PredictRequest

    settings = QueueSettings(redis_url=URL, queue=f"xrayfm-test-{uuid.uuid4().hex[:8]}")
    request, pixels = PredictRequest.to_store(np.full((8, 8), 7, dtype=np.uint8))

    async def scenario() -> tuple:
        queue = InferenceQueue(settings)
        try:
            job_id = await queue.submit(request, {}, inputs=[pixels])
            waited = await queue.wait(job_id, 2 * RECHECK_S + 0.2)  # no worker: still queued
            client.delete(settings.queue, settings.job_key(job_id), inputs_key(job_id))  # "restarted"
            started = time.monotonic()
            lost = await queue.wait(job_id, 30)
            return waited, lost, time.monotonic() - started
        finally:
            await queue.close()

    waited, lost, seconds = asyncio.run(scenario())
    assert waited.status == "queued"
    assert (lost.status, lost.error_type) == ("failed", "JobLost") and "no longer in Redis" in lost.error
    assert seconds < 5
