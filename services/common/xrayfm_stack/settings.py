"""Every service's settings, read from the environment in one place (``XRAYFM_*``; see services/README.md).

One frozen dataclass per service, all built the same way: ``Settings.from_env(env=None)`` reads
``os.environ`` (or the mapping given, in tests), checks each value and raises :class:`XrayfmError` naming
the variable when one is wrong. :class:`QueueSettings` is what the gateway and the inference workers must
agree on; :class:`TrainingSettings` what the gateway and the training workers agree on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xrayfm.errors import XrayfmError
from xrayfm_stack.protocol import DOMAIN_POLICIES, EXPLAIN_METHODS, MAX_SIDE

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STORE = Path("runs/model-store")
DEFAULT_DATA_DIR = Path("/data")  # where compose mounts the datasets
BOOTSTRAP_MODES = {  # XRAYFM_BOOTSTRAP -> what a first start with an empty model store does
    "shipped": "installing the shipped real-data model, no training: seconds",
    "demo": "training the demo model on SYNTHETIC phantoms: a few minutes",
    "quick": "training a tiny demo model on SYNTHETIC phantoms: a minute or two",
    "off": "nothing is installed",
}
RUNTIMES = ("torch", "onnxruntime")  # XRAYFM_RUNTIME (xrayfm.inference.runtime)
QUANTIZATIONS = ("none", "int8", "auto")  # XRAYFM_QUANTIZE (auto: the version's int8 verdict)


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


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A yes/no variable: 1, true, yes, on (any case) are yes; unset or anything else is no."""
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_paths(env: Mapping[str, str], name: str, default: tuple[Path, ...]) -> tuple[Path, ...]:
    """A list of folders separated by ':' or ','; `default` when unset."""
    raw = env.get(name, "").replace(",", os.pathsep)
    paths = tuple(Path(p.strip()) for p in raw.split(os.pathsep) if p.strip())
    return paths or default


def env_keys(env: Mapping[str, str], name: str) -> frozenset[str]:
    """A comma-separated list of keys (blank entries dropped)."""
    return frozenset(k.strip() for k in env.get(name, "").split(",") if k.strip())


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


@dataclass(frozen=True)
class QueueSettings:
    """What the gateway and the inference workers must agree on: the Redis URL, the queue, expiries and
    timeouts."""

    redis_url: str = DEFAULT_REDIS_URL  # broker and result backend (XRAYFM_REDIS_URL)
    queue: str = "xrayfm-inference"  # Celery queue name; also the prefix of the stack's own keys
    result_expires_s: int = 600  # results (and job records) vanish from Redis after this
    task_time_limit_s: float = 30.0  # a request still unanswered by the worker after this fails clearly
    visibility_timeout_s: int = 60  # an unacknowledged message (its worker died) is redelivered after this
    heartbeat_s: float = 2.0  # workers announce themselves this often; 3 missed beats = gone

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> QueueSettings:
        """Read ``XRAYFM_REDIS_URL``, ``XRAYFM_QUEUE``, ``XRAYFM_RESULT_EXPIRES``, ``XRAYFM_TASK_TIME_LIMIT``,
        ``XRAYFM_VISIBILITY_TIMEOUT`` and ``XRAYFM_HEARTBEAT_S``."""
        env = _environ(env)
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
class InferenceSettings:
    """The inference worker's settings (see services/README.md for each variable)."""

    queue: QueueSettings = field(default_factory=QueueSettings)
    model_path: Path | None = None  # XRAYFM_MODEL_PATH: a checkpoint folder; wins over the store
    model_store: Path = DEFAULT_STORE  # XRAYFM_MODEL_STORE (layout in xrayfm_stack.store)
    device: str = "auto"  # XRAYFM_DEVICE: auto (cuda when present), cpu, cuda, cuda:1...
    # XRAYFM_BATCH_MAX: the most images per model batch; 1 disables batching; "auto" (None here): the worker
    # measures its model at load and picks a size (xrayfm.inference.batching.auto_batch_max)
    batch_max: int | None = None
    # XRAYFM_BATCH_TUNE_S: the time that measurement may take, at most
    batch_tune_s: float = 10.0
    batch_wait_ms: float = 5.0  # XRAYFM_BATCH_WAIT_MS: how long a batch waits for company
    metrics_port: int = 9101  # XRAYFM_WORKER_METRICS_PORT: Prometheus endpoint; 0 = off
    metrics_addr: str = "0.0.0.0"  # XRAYFM_WORKER_METRICS_ADDR: where that endpoint listens
    torch_threads: int = 0  # XRAYFM_TORCH_THREADS: 0 = torch's default
    # XRAYFM_HEATMAP_SIDE: the heatmap PNG's long side at most (the image's aspect ratio); 0 = the size of
    # the image the worker got. A map of 14x14 to 28x28 patches loses nothing at 256 px, and a smaller PNG
    # is faster to encode and to carry (38 -> ~15 KB for a 390 x 320 image).
    heatmap_side: int = 256
    explain_method: str = "rollout"  # XRAYFM_EXPLAIN_METHOD: default heatmap method
    model_poll_s: float = 2.0  # XRAYFM_MODEL_POLL_S: seconds between looks at serving.json; 0 = off
    runtime: str = "torch"  # XRAYFM_RUNTIME: torch or onnxruntime (exported once per checkpoint, cached)
    # XRAYFM_QUANTIZE: none, int8 (dynamic int8 weights; onnxruntime only) or auto (int8 when the version's
    # verdict allows it: it lost at most 0.005 AUROC on its validation images; else fp32)
    quantize: str = "none"
    runtime_cache: Path | None = None  # XRAYFM_RUNTIME_CACHE: ONNX exports; None = ~/.cache/xrayfm/onnx

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InferenceSettings:
        """Read the worker's ``XRAYFM_*`` variables (plus the queue settings)."""
        env = _environ(env)
        model_path = env_str(env, "XRAYFM_MODEL_PATH", "")
        runtime_cache = env_str(env, "XRAYFM_RUNTIME_CACHE", "")
        settings = cls(
            queue=QueueSettings.from_env(env),
            model_path=Path(model_path) if model_path else None,
            model_store=Path(env_str(env, "XRAYFM_MODEL_STORE", str(cls.model_store))),
            device=env_str(env, "XRAYFM_DEVICE", cls.device),
            batch_max=batch_max(env),
            batch_tune_s=env_number(env, "XRAYFM_BATCH_TUNE_S", cls.batch_tune_s, float, 0),
            batch_wait_ms=env_number(env, "XRAYFM_BATCH_WAIT_MS", cls.batch_wait_ms, float, 0),
            metrics_port=int(env_number(env, "XRAYFM_WORKER_METRICS_PORT", cls.metrics_port, int, 0)),
            metrics_addr=env_str(env, "XRAYFM_WORKER_METRICS_ADDR", cls.metrics_addr),
            torch_threads=int(env_number(env, "XRAYFM_TORCH_THREADS", cls.torch_threads, int, 0)),
            heatmap_side=int(env_number(env, "XRAYFM_HEATMAP_SIDE", cls.heatmap_side, int, 0)),
            explain_method=explain_method(env),
            model_poll_s=float(env_number(env, "XRAYFM_MODEL_POLL_S", cls.model_poll_s, float, 0)),
            runtime=env_choice(env, "XRAYFM_RUNTIME", cls.runtime, RUNTIMES),
            quantize=env_choice(env, "XRAYFM_QUANTIZE", cls.quantize, QUANTIZATIONS),
            runtime_cache=Path(runtime_cache) if runtime_cache else None,
        )
        if settings.quantize == "int8" and settings.runtime == "torch":
            raise XrayfmError(f"XRAYFM_QUANTIZE={settings.quantize} needs XRAYFM_RUNTIME=onnxruntime")
        return settings


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """The variable `name` (lower case) if it is one of `choices`, else a clear error; `default` when unset."""
    value = env_str(env, name, default).lower()
    if value not in choices:
        raise XrayfmError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def batch_max(env: Mapping[str, str]) -> int | None:
    """``XRAYFM_BATCH_MAX``: a whole number >= 1, or ``auto`` (the default) as None."""
    raw = env_str(env, "XRAYFM_BATCH_MAX", "auto")
    if raw.lower() == "auto":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise XrayfmError(f"XRAYFM_BATCH_MAX must be auto or a whole number >= 1, got {raw!r}")
    return value


def domain_policy(env: Mapping[str, str]) -> str:
    """``XRAYFM_DOMAIN_POLICY``: refuse (default), flag or off."""
    policy = env_str(env, "XRAYFM_DOMAIN_POLICY", "refuse").strip().lower()
    if policy not in DOMAIN_POLICIES:
        raise XrayfmError(f"XRAYFM_DOMAIN_POLICY must be one of {DOMAIN_POLICIES}, got {policy!r}")
    return policy


def explain_method(env: Mapping[str, str]) -> str:
    """``XRAYFM_EXPLAIN_METHOD`` checked against the methods the workers know."""
    method = env_str(env, "XRAYFM_EXPLAIN_METHOD", "rollout")
    if method not in EXPLAIN_METHODS:
        raise XrayfmError(f"XRAYFM_EXPLAIN_METHOD must be one of {EXPLAIN_METHODS}, got {method!r}")
    return method


@dataclass(frozen=True)
class TrainingSettings:
    """What the gateway and the training worker agree on, and the worker's own folders."""

    # XRAYFM_TRAINING_REDIS_URL (else XRAYFM_REDIS_URL): broker and job records of the training side. It
    # may be a Redis of its own that keeps its data on disk (AOF), while the inference Redis keeps none.
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = "xrayfm-training"  # XRAYFM_TRAINING_QUEUE: Celery queue; prefix of the job keys
    model_store: Path = DEFAULT_STORE  # XRAYFM_MODEL_STORE: where finished jobs publish
    runs_dir: Path = Path("runs/training")  # XRAYFM_TRAINING_RUNS: one run folder per job (resume point)
    # XRAYFM_TRAINING_VISIBILITY_TIMEOUT: an unacknowledged job message is redelivered after this; the
    # per-job lock (not this timeout) is what keeps a redelivered job from running twice at once.
    visibility_timeout_s: int = 6 * 3600
    lock_ttl_s: float = 30.0  # XRAYFM_TRAINING_LOCK_TTL: a job's lock lapses this long after its worker died
    # XRAYFM_TRAINING_MAX_ATTEMPTS: a job whose worker died this many times fails (e.g. it runs out of memory)
    max_attempts: int = 3
    torch_threads: int = 0  # XRAYFM_TORCH_THREADS: 0 = torch's default
    # XRAYFM_BOOTSTRAP: first start with an empty store: shipped (install and serve the shipped real-data
    # model, no training), demo (train one on synthetic phantoms), quick (a tiny demo, for tests), off
    bootstrap: str = "shipped"
    # XRAYFM_BOOTSTRAP_MODEL: the shipped model (xrayfm/<name>) that `shipped` installs
    bootstrap_model: str = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
    # XRAYFM_DATA_DIRS: the data folders; publishing the shipped model looks there for the dataset it was
    # validated on, to measure its int8 verdict (xrayfm.inference.graphs)
    data_dirs: tuple[Path, ...] = (DEFAULT_DATA_DIR,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainingSettings:
        """Read the variables above."""
        env = _environ(env)
        bootstrap = env_str(env, "XRAYFM_BOOTSTRAP", cls.bootstrap).lower()
        if bootstrap not in BOOTSTRAP_MODES:
            raise XrayfmError(f"XRAYFM_BOOTSTRAP={bootstrap!r}: choose one of {list(BOOTSTRAP_MODES)}")
        return cls(
            redis_url=env_str(
                env, "XRAYFM_TRAINING_REDIS_URL", env_str(env, "XRAYFM_REDIS_URL", cls.redis_url)
            ),
            queue=env_str(env, "XRAYFM_TRAINING_QUEUE", cls.queue),
            model_store=Path(env_str(env, "XRAYFM_MODEL_STORE", str(cls.model_store))),
            runs_dir=Path(env_str(env, "XRAYFM_TRAINING_RUNS", str(cls.runs_dir))),
            visibility_timeout_s=int(
                env_number(env, "XRAYFM_TRAINING_VISIBILITY_TIMEOUT", cls.visibility_timeout_s, int, 1)
            ),
            lock_ttl_s=env_number(env, "XRAYFM_TRAINING_LOCK_TTL", cls.lock_ttl_s, float, 1.0),
            max_attempts=int(env_number(env, "XRAYFM_TRAINING_MAX_ATTEMPTS", cls.max_attempts, int, 1)),
            torch_threads=int(env_number(env, "XRAYFM_TORCH_THREADS", cls.torch_threads, int, 0)),
            bootstrap=bootstrap,
            bootstrap_model=env_str(env, "XRAYFM_BOOTSTRAP_MODEL", cls.bootstrap_model),
            data_dirs=env_paths(env, "XRAYFM_DATA_DIRS", cls.data_dirs),
        )


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway accepts and how long it waits."""

    queue: QueueSettings = field(default_factory=QueueSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    api_keys: frozenset[str] = frozenset()  # XRAYFM_API_KEYS (comma-separated); empty = auth off
    max_upload_bytes: int = 64 * 1024 * 1024  # XRAYFM_MAX_UPLOAD_MB (per file)
    max_study_images: int = 12  # XRAYFM_MAX_STUDY_IMAGES: files per /predict/study (MURA studies have <= 11)
    max_pixels: int = 60_000_000  # XRAYFM_MAX_PIXELS: larger images are refused before decoding
    max_image_side: int = 20_000  # XRAYFM_MAX_IMAGE_SIDE: absurd dimensions are refused
    min_image_side: int = 8  # XRAYFM_MIN_IMAGE_SIDE
    transport_side: int = 512  # XRAYFM_TRANSPORT_SIDE: longest side of the pixels sent to the worker
    predict_timeout_s: float = 60.0  # XRAYFM_PREDICT_TIMEOUT: /predict waits this long, then 504 + job id
    explain_method: str = "rollout"  # XRAYFM_EXPLAIN_METHOD: the default heatmap method
    decode_concurrency: int = 4  # XRAYFM_DECODE_CONCURRENCY: decoder processes (uploads decoded at once)
    decode_timeout_s: float = 15.0  # XRAYFM_DECODE_TIMEOUT: a decode taking longer is abandoned (422)
    decode_memory_mb: int = 1024  # XRAYFM_DECODE_MEMORY_MB: address-space cap of each decoder process
    max_study_pixels: int = 240_000_000  # XRAYFM_MAX_STUDY_PIXELS: pixels of a study's images in all
    max_study_bytes: int = 256 * 1024 * 1024  # XRAYFM_MAX_STUDY_MB: a /predict/study upload in all
    upload_buffer_bytes: int = (
        512 * 1024 * 1024
    )  # XRAYFM_UPLOAD_BUFFER_MB: uploads held at once (per process)
    workers: int = 1  # XRAYFM_GATEWAY_WORKERS: gateway processes sharing the port (xrayfm_gateway.serve)
    max_json_bytes: int = 256 * 1024  # XRAYFM_MAX_JSON_KB: any request body but an upload (413 above)
    admin_keys: frozenset[str] = frozenset()  # XRAYFM_ADMIN_KEYS: training and model-store endpoints
    model_store: Path = DEFAULT_STORE  # XRAYFM_MODEL_STORE: listed, promoted, rolled back
    # XRAYFM_INSECURE_NO_AUTH=1: with no admin key, leave the training and model endpoints open (local
    # development only; `make up` sets it). Unset, they answer 403 until XRAYFM_ADMIN_KEYS is set.
    insecure_no_auth: bool = False
    # XRAYFM_DATA_DIRS (':' or ','-separated): the folders training jobs may read; a spec's dataset roots,
    # caches and foundations must lie under one of them (or be store: references).
    data_dirs: tuple[Path, ...] = (DEFAULT_DATA_DIR,)
    feedback_dir: Path = Path(
        "runs/feedback"
    )  # XRAYFM_FEEDBACK_DIR: staff feedback records (xrayfm.feedback)
    # XRAYFM_FEEDBACK_KEEP_IMAGES=1: keep the (transport-sized) image of each answer given feedback, so that
    # the feedback becomes a training set. Off by default: no uploaded image is written anywhere.
    feedback_keep_images: bool = False
    feedback_retention_days: float = 30.0  # XRAYFM_FEEDBACK_RETENTION_DAYS: kept images are deleted after
    # XRAYFM_DOMAIN_POLICY: an image outside the served version's domain is refused (422 out_of_domain),
    # answered with a warning (flag), or not checked (off)
    domain_policy: str = "refuse"
    drift_window: int = 500  # XRAYFM_DRIFT_WINDOW: answers per version in the drift gauges' rolling window
    # XRAYFM_AUDIT_LOG: the audit trail (xrayfm.audit), one hash-chained line per admin action and prediction
    audit_log: Path = Path("runs/audit/audit.jsonl")
    # XRAYFM_ROUTER_PREFIX: the PACS router's Redis key prefix; GET /studies reads its list of studies there
    router_prefix: str = "xrayfm:router"

    @property
    def auth_enabled(self) -> bool:
        """True when at least one API key is configured."""
        return bool(self.api_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read the gateway's variables (plus the queue settings shared with the workers)."""
        env = _environ(env)
        settings = cls(
            queue=QueueSettings.from_env(env),
            training=TrainingSettings.from_env(env),
            api_keys=env_keys(env, "XRAYFM_API_KEYS"),
            max_upload_bytes=int(env_number(env, "XRAYFM_MAX_UPLOAD_MB", 64, float, 0.001) * 1024 * 1024),
            max_study_images=int(env_number(env, "XRAYFM_MAX_STUDY_IMAGES", cls.max_study_images, int, 1)),
            max_pixels=int(env_number(env, "XRAYFM_MAX_PIXELS", cls.max_pixels, int, 1)),
            max_image_side=int(env_number(env, "XRAYFM_MAX_IMAGE_SIDE", cls.max_image_side, int, 1)),
            min_image_side=int(env_number(env, "XRAYFM_MIN_IMAGE_SIDE", cls.min_image_side, int, 1)),
            transport_side=int(env_number(env, "XRAYFM_TRANSPORT_SIDE", cls.transport_side, int, 16)),
            predict_timeout_s=env_number(env, "XRAYFM_PREDICT_TIMEOUT", cls.predict_timeout_s, float, 0.1),
            explain_method=explain_method(env),
            decode_concurrency=int(
                env_number(env, "XRAYFM_DECODE_CONCURRENCY", cls.decode_concurrency, int, 1)
            ),
            decode_timeout_s=env_number(env, "XRAYFM_DECODE_TIMEOUT", cls.decode_timeout_s, float, 0.01),
            decode_memory_mb=int(env_number(env, "XRAYFM_DECODE_MEMORY_MB", cls.decode_memory_mb, int, 0)),
            max_study_pixels=int(env_number(env, "XRAYFM_MAX_STUDY_PIXELS", cls.max_study_pixels, int, 1)),
            max_study_bytes=int(env_number(env, "XRAYFM_MAX_STUDY_MB", 256, float, 0.001) * 1024 * 1024),
            upload_buffer_bytes=int(env_number(env, "XRAYFM_UPLOAD_BUFFER_MB", 512, float, 1) * 1024 * 1024),
            workers=int(env_number(env, "XRAYFM_GATEWAY_WORKERS", cls.workers, int, 1)),
            max_json_bytes=int(env_number(env, "XRAYFM_MAX_JSON_KB", 256, int, 1)) * 1024,
            admin_keys=env_keys(env, "XRAYFM_ADMIN_KEYS"),
            model_store=Path(env_str(env, "XRAYFM_MODEL_STORE", str(cls.model_store))),
            insecure_no_auth=env_flag(env, "XRAYFM_INSECURE_NO_AUTH"),
            feedback_dir=Path(env_str(env, "XRAYFM_FEEDBACK_DIR", str(cls.feedback_dir))),
            feedback_keep_images=env_flag(env, "XRAYFM_FEEDBACK_KEEP_IMAGES"),
            feedback_retention_days=env_number(
                env, "XRAYFM_FEEDBACK_RETENTION_DAYS", cls.feedback_retention_days, float, 0.0
            ),
            data_dirs=env_paths(env, "XRAYFM_DATA_DIRS", cls.data_dirs),
            domain_policy=domain_policy(env),
            drift_window=int(env_number(env, "XRAYFM_DRIFT_WINDOW", cls.drift_window, int, 10)),
            audit_log=Path(env_str(env, "XRAYFM_AUDIT_LOG", str(cls.audit_log))),
            router_prefix=env_str(env, "XRAYFM_ROUTER_PREFIX", cls.router_prefix),
        )
        if settings.transport_side > MAX_SIDE:
            raise XrayfmError(f"XRAYFM_TRANSPORT_SIDE must be <= {MAX_SIDE}, got {settings.transport_side}")
        return settings


def env_secret(env: Mapping[str, str], name: str) -> str | None:
    """A secret from `name`, else from the file `name`_FILE names (compose mounts secrets as files)."""
    value = env_str(env, name, "")
    path = env_str(env, f"{name}_FILE", "")
    if not value and path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise XrayfmError(f"{name}_FILE={path} cannot be read: {exc}") from None
    return value or None


@dataclass(frozen=True)
class RouterSettings:
    """The PACS router (xrayfm_router): the Orthanc it follows, the gateway it asks, where it keeps its place."""

    orthanc_url: str = "http://127.0.0.1:8042"  # XRAYFM_ORTHANC_URL: REST root (DICOMweb: /dicom-web)
    orthanc_user: str = "xrayfm"  # XRAYFM_ORTHANC_USER
    orthanc_password: str | None = None  # XRAYFM_ORTHANC_PASSWORD, or the file XRAYFM_ORTHANC_PASSWORD_FILE
    gateway_url: str = "http://127.0.0.1:8000"  # XRAYFM_GATEWAY_URL
    api_key: str | None = None  # XRAYFM_ROUTER_API_KEY: sent to the gateway (one of its XRAYFM_API_KEYS)
    # XRAYFM_ROUTER_REDIS_URL, else XRAYFM_TRAINING_REDIS_URL (kept on disk), else XRAYFM_REDIS_URL: the
    # position in Orthanc's changes feed and the studies answered, so that a restart goes on where it was
    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = "xrayfm:router"  # XRAYFM_ROUTER_PREFIX: of its Redis keys
    poll_s: float = 2.0  # XRAYFM_ROUTER_POLL_S: how often an idle router asks for changes
    backfill: bool = False  # XRAYFM_ROUTER_BACKFILL=1: a first start answers the studies already stored
    remember_days: float = 90.0  # XRAYFM_ROUTER_REMEMBER_DAYS: how long an answered study is remembered
    timeout_s: float = 120.0  # XRAYFM_ROUTER_TIMEOUT: one HTTP call to Orthanc or the gateway
    audit_log: Path = Path("runs/audit/audit.jsonl")  # XRAYFM_AUDIT_LOG: study_result records go here

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterSettings:
        """Read the router's variables."""
        env = _environ(env)
        redis_url = env_str(env, "XRAYFM_TRAINING_REDIS_URL", env_str(env, "XRAYFM_REDIS_URL", cls.redis_url))
        return cls(
            orthanc_url=env_str(env, "XRAYFM_ORTHANC_URL", cls.orthanc_url).rstrip("/"),
            orthanc_user=env_str(env, "XRAYFM_ORTHANC_USER", cls.orthanc_user),
            orthanc_password=env_secret(env, "XRAYFM_ORTHANC_PASSWORD"),
            gateway_url=env_str(env, "XRAYFM_GATEWAY_URL", cls.gateway_url).rstrip("/"),
            api_key=env_str(env, "XRAYFM_ROUTER_API_KEY", "") or None,
            redis_url=env_str(env, "XRAYFM_ROUTER_REDIS_URL", redis_url),
            prefix=env_str(env, "XRAYFM_ROUTER_PREFIX", cls.prefix),
            poll_s=env_number(env, "XRAYFM_ROUTER_POLL_S", cls.poll_s, float, 0.05),
            backfill=env_flag(env, "XRAYFM_ROUTER_BACKFILL"),
            remember_days=env_number(env, "XRAYFM_ROUTER_REMEMBER_DAYS", cls.remember_days, float, 0.001),
            timeout_s=env_number(env, "XRAYFM_ROUTER_TIMEOUT", cls.timeout_s, float, 1),
            audit_log=Path(env_str(env, "XRAYFM_AUDIT_LOG", str(cls.audit_log))),
        )


@dataclass(frozen=True)
class FrontendSettings:
    """Where the gateway is and how to call it."""

    gateway_url: str = "http://127.0.0.1:8000"  # XRAYFM_GATEWAY_URL
    api_key: str | None = None  # XRAYFM_FRONTEND_API_KEY: sent with predictions
    timeout_s: float = 90.0  # XRAYFM_FRONTEND_TIMEOUT: seconds a prediction may take
    admin_key: str | None = None  # XRAYFM_FRONTEND_ADMIN_KEY: for the training and model pages
    refresh_s: float = 3.0  # XRAYFM_FRONTEND_REFRESH_S: training page refresh while a job is active; 0 = off
    # XRAYFM_PACS_VIEWER_URL: Orthanc Explorer's root (the Studies page links each study to it); None = no links
    pacs_viewer_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FrontendSettings:
        """Read the frontend's variables."""
        env = _environ(env)
        return cls(
            gateway_url=env_str(env, "XRAYFM_GATEWAY_URL", cls.gateway_url).rstrip("/"),
            api_key=env_str(env, "XRAYFM_FRONTEND_API_KEY", "") or None,
            timeout_s=env_number(env, "XRAYFM_FRONTEND_TIMEOUT", cls.timeout_s, float, 0.1),
            admin_key=env_str(env, "XRAYFM_FRONTEND_ADMIN_KEY", "") or None,
            refresh_s=max(env_number(env, "XRAYFM_FRONTEND_REFRESH_S", cls.refresh_s, float, -math.inf), 0.0),
            pacs_viewer_url=env_str(env, "XRAYFM_PACS_VIEWER_URL", "").rstrip("/") or None,
        )
