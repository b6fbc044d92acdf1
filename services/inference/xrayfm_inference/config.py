"""Queue and worker settings, all read from the environment in one place (``XRAYFM_*`` variables)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from xrayfm.errors import XrayfmError


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable `name` stripped, or `default` when unset or blank."""
    value = env.get(name, "").strip()
    return value if value else default


def env_number(env: Mapping[str, str], name: str, default: float, kind: type, minimum: float) -> float:
    """The variable `name` as `kind` (int/float) >= `minimum`, or `default`; a clear error otherwise."""
    raw = env_str(env, name, str(default))
    try:
        value = kind(raw)
    except ValueError:
        raise XrayfmError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if value < minimum:
        raise XrayfmError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class QueueSettings:
    """What the gateway and the workers must agree on: the Redis URL, the queue, expiries and timeouts."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # broker and result backend (XRAYFM_REDIS_URL)
    queue: str = "xrayfm-inference"  # Celery queue name; also the prefix of the stack's own keys
    result_expires_s: int = 600  # results (and job records) vanish from Redis after this
    task_time_limit_s: float = 30.0  # a request still unanswered by the worker after this fails clearly
    visibility_timeout_s: int = 60  # an unacknowledged message (its worker died) is redelivered after this
    heartbeat_s: float = 2.0  # workers announce themselves this often; 3 missed beats = gone

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> QueueSettings:
        """Read ``XRAYFM_REDIS_URL``, ``XRAYFM_QUEUE``, ``XRAYFM_RESULT_EXPIRES``, ``XRAYFM_TASK_TIME_LIMIT``,
        ``XRAYFM_VISIBILITY_TIMEOUT`` and ``XRAYFM_HEARTBEAT_S``."""
        env = os.environ if env is None else env
        settings = cls(
            redis_url=env_str(env, "XRAYFM_REDIS_URL", cls.redis_url),
            queue=env_str(env, "XRAYFM_QUEUE", cls.queue),
            result_expires_s=int(env_number(env, "XRAYFM_RESULT_EXPIRES", cls.result_expires_s, int, 1)),
            task_time_limit_s=env_number(env, "XRAYFM_TASK_TIME_LIMIT", cls.task_time_limit_s, float, 0.1),
            visibility_timeout_s=int(
                env_number(env, "XRAYFM_VISIBILITY_TIMEOUT", cls.visibility_timeout_s, int, 1)
            ),
            heartbeat_s=env_number(env, "XRAYFM_HEARTBEAT_S", cls.heartbeat_s, float, 0.1),
        )
        if settings.visibility_timeout_s <= settings.task_time_limit_s:
            raise XrayfmError(
                f"XRAYFM_VISIBILITY_TIMEOUT ({settings.visibility_timeout_s} s) must exceed "
                f"XRAYFM_TASK_TIME_LIMIT ({settings.task_time_limit_s} s), "
                "or requests still running get redelivered"
            )
        return settings

    @property
    def workers_key(self) -> str:
        """Redis sorted set of live workers (member = hostname, score = last heartbeat, unix time)."""
        return f"{self.queue}:workers"

    def worker_info_key(self, hostname: str) -> str:
        """Redis key with a worker's JSON self-description (model, device), expiring with its heartbeat."""
        return f"{self.queue}:worker:{hostname}"

    def job_key(self, job_id: str) -> str:
        """Redis key marking a job submitted through the gateway (so unknown ids answer 404)."""
        return f"{self.queue}:job:{job_id}"

    @property
    def heartbeat_ttl_s(self) -> float:
        """A worker whose last heartbeat is older than this is considered gone."""
        return 3.0 * self.heartbeat_s


@dataclass(frozen=True)
class WorkerSettings:
    """The inference worker's own settings (see services/README.md for each variable)."""

    queue: QueueSettings
    model_path: Path | None = None  # XRAYFM_MODEL_PATH: a checkpoint folder; wins over the store
    model_store: Path = Path("runs/model-store")  # XRAYFM_MODEL_STORE (layout in xrayfm_inference.store)
    device: str = "auto"  # XRAYFM_DEVICE: auto (cuda when present), cpu, cuda, cuda:1...
    batch_max: int = 8  # XRAYFM_BATCH_MAX: 1 disables batching
    batch_wait_ms: float = 5.0  # XRAYFM_BATCH_WAIT_MS: how long a batch waits for company
    metrics_port: int = 9101  # XRAYFM_WORKER_METRICS_PORT: Prometheus endpoint; 0 = off
    metrics_addr: str = "0.0.0.0"  # XRAYFM_WORKER_METRICS_ADDR: where that endpoint listens
    torch_threads: int = 0  # XRAYFM_TORCH_THREADS: 0 = torch's default
    explain_method: str = "rollout"  # XRAYFM_EXPLAIN_METHOD: default heatmap method

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read the worker's ``XRAYFM_*`` variables (plus the queue settings)."""
        env = os.environ if env is None else env
        defaults = {f.name: f.default for f in fields(cls)}
        model_path = env_str(env, "XRAYFM_MODEL_PATH", "")
        return cls(
            queue=QueueSettings.from_env(env),
            model_path=Path(model_path) if model_path else None,
            model_store=Path(env_str(env, "XRAYFM_MODEL_STORE", str(defaults["model_store"]))),
            device=env_str(env, "XRAYFM_DEVICE", defaults["device"]),
            batch_max=int(env_number(env, "XRAYFM_BATCH_MAX", defaults["batch_max"], int, 1)),
            batch_wait_ms=env_number(env, "XRAYFM_BATCH_WAIT_MS", defaults["batch_wait_ms"], float, 0),
            metrics_port=int(env_number(env, "XRAYFM_WORKER_METRICS_PORT", defaults["metrics_port"], int, 0)),
            metrics_addr=env_str(env, "XRAYFM_WORKER_METRICS_ADDR", defaults["metrics_addr"]),
            torch_threads=int(env_number(env, "XRAYFM_TORCH_THREADS", defaults["torch_threads"], int, 0)),
            explain_method=env_str(env, "XRAYFM_EXPLAIN_METHOD", defaults["explain_method"]),
        )
