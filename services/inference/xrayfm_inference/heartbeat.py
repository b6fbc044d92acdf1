"""Workers announce themselves in Redis so the gateway's /ready can tell that a model is answering, and
that the worker speaks the gateway's protocol version (``protocol``: :data:`PROTOCOL_VERSION`)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from xrayfm_stack.protocol import PROTOCOL_VERSION
from xrayfm_stack.settings import QueueSettings

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread writing ``describe()`` to Redis every ``settings.heartbeat_s`` seconds."""

    def __init__(
        self, settings: QueueSettings, hostname: str, describe: Callable[[], dict[str, Any]]
    ) -> None:
        self.settings = settings
        self.hostname = hostname
        self.describe = describe
        self._client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self._stop = threading.Event()
        # The beat thread and the worker (after loading a model) both beat: one at a time, each describing
        # the worker as it is when it writes, so a beat computed before the load cannot land after it.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="xrayfm-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Start beating (the first beat is immediate)."""
        self._thread.start()
        return self

    def beat(self) -> None:
        """Publish one heartbeat: the worker's description plus its protocol version, name and the time."""
        with self._lock:
            info = dict(self.describe(), protocol=PROTOCOL_VERSION, hostname=self.hostname, time=time.time())
            ttl_ms = int(1000 * self.settings.heartbeat_ttl_s)
            pipe = self._client.pipeline()
            pipe.set(self.settings.worker_info_key(self.hostname), json.dumps(info), px=ttl_ms)
            pipe.zadd(self.settings.workers_key, {self.hostname: info["time"]})
            # Drop long-dead members so the set stays small (live workers re-add themselves each beat).
            pipe.zremrangebyscore(
                self.settings.workers_key, "-inf", info["time"] - 60 * self.settings.heartbeat_ttl_s
            )
            pipe.execute()

    def stop(self) -> None:
        """Stop beating and withdraw this worker at once (a clean shutdown is not 'gone for 3 beats')."""
        self._stop.set()
        try:
            self._client.zrem(self.settings.workers_key, self.hostname)
            self._client.delete(self.settings.worker_info_key(self.hostname))
        except redis.RedisError:
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis away: keep trying; the gateway sees no beat meanwhile
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(self.settings.heartbeat_s)
