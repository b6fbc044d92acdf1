"""Training worker settings, read from the environment in one place (``XRAYFM_*``; see services/README.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xrayfm_inference.config import env_number, env_str


@dataclass(frozen=True)
class TrainingSettings:
    """What the gateway and the training worker agree on, and the worker's own folders."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # XRAYFM_REDIS_URL: broker, results, job records
    queue: str = "xrayfm-training"  # XRAYFM_TRAINING_QUEUE: Celery queue; prefix of the job keys
    model_store: Path = Path("runs/model-store")  # XRAYFM_MODEL_STORE: where finished jobs publish
    runs_dir: Path = Path("runs/training")  # XRAYFM_TRAINING_RUNS: one run folder per job (resume point)
    # XRAYFM_TRAINING_VISIBILITY_TIMEOUT: an unacknowledged job message is redelivered after this; the
    # per-job lock (not this timeout) is what keeps a redelivered job from running twice at once.
    visibility_timeout_s: int = 6 * 3600
    lock_ttl_s: float = 30.0  # XRAYFM_TRAINING_LOCK_TTL: a job's lock lapses this long after its worker died
    # XRAYFM_TRAINING_MAX_ATTEMPTS: a job whose worker died this many times fails (e.g. it runs out of memory)
    max_attempts: int = 3
    torch_threads: int = 0  # XRAYFM_TORCH_THREADS: 0 = torch's default

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainingSettings:
        """Read the variables above."""
        env = os.environ if env is None else env
        return cls(
            redis_url=env_str(env, "XRAYFM_REDIS_URL", cls.redis_url),
            queue=env_str(env, "XRAYFM_TRAINING_QUEUE", cls.queue),
            model_store=Path(env_str(env, "XRAYFM_MODEL_STORE", str(cls.model_store))),
            runs_dir=Path(env_str(env, "XRAYFM_TRAINING_RUNS", str(cls.runs_dir))),
            visibility_timeout_s=int(
                env_number(env, "XRAYFM_TRAINING_VISIBILITY_TIMEOUT", cls.visibility_timeout_s, int, 1)
            ),
            lock_ttl_s=env_number(env, "XRAYFM_TRAINING_LOCK_TTL", cls.lock_ttl_s, float, 1.0),
            max_attempts=int(env_number(env, "XRAYFM_TRAINING_MAX_ATTEMPTS", cls.max_attempts, int, 1)),
            torch_threads=int(env_number(env, "XRAYFM_TORCH_THREADS", cls.torch_threads, int, 0)),
        )
