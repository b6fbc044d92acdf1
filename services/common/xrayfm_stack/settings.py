"""Every service's settings, read from the environment in one place (``XRAYFM_*``; see services/README.md).

One pydantic-settings class per service (keys and passwords left out of their repr), all built the same
way: ``Settings.from_env(env=None)`` reads ``os.environ`` (through pydantic-settings) or the mapping given
(tests), checks each value against its field's type and bounds, and raises :class:`XrayfmError` naming the
variable and what it allows when one is wrong. Each field names its variable in full
(``validation_alias``), so ``grep XRAYFM_NAME`` finds it; keyword arguments use the field names
(``GatewaySettings(max_upload_bytes=1000)``) and, as with any ``BaseSettings``, a bare
``GatewaySettings()`` also reads the environment. A blank variable counts as unset.
:class:`QueueSettings` is what the gateway and the inference workers must agree on;
:class:`TrainingSettings` what the gateway and the training workers agree on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field, ValidationError, model_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from xrayfm.errors import XrayfmError
from xrayfm_stack.protocol import MAX_SIDE, DomainPolicy, ExplainMethod

PREFIX = "XRAYFM_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STORE = Path("runs/model-store")
DEFAULT_DATA_DIR = Path("/data")  # where compose mounts the datasets
BOOTSTRAP_MODES = {  # XRAYFM_BOOTSTRAP -> what a first start with an empty model store does
    "shipped": "installing the shipped real-data model, no training: seconds",
    "demo": "training the demo model on SYNTHETIC phantoms: a few minutes",
    "quick": "training a tiny demo model on SYNTHETIC phantoms: a minute or two",
    "off": "nothing is installed",
}
Bootstrap = Literal["shipped", "demo", "quick", "off"]
Runtime = Literal["torch", "onnxruntime"]  # XRAYFM_RUNTIME (xrayfm.inference.runtime)
Quantize = Literal["none", "int8", "auto"]  # XRAYFM_QUANTIZE (auto: the version's int8 verdict)
RUNTIMES: tuple[str, ...] = get_args(Runtime)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantize)
assert set(get_args(Bootstrap)) == set(BOOTSTRAP_MODES), "Bootstrap must list BOOTSTRAP_MODES"

# -- how a variable's text becomes a value (keyword arguments of the right type pass through) -------------


def _lower(value: Any) -> Any:
    """Choices are matched in lower case (``XRAYFM_DOMAIN_POLICY=Flag`` is ``flag``)."""
    return value.lower() if isinstance(value, str) else value


def _flag(value: Any) -> Any:
    """A yes/no variable: 1, true, yes, on (any case) are yes; anything else is no."""
    return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else value


def _paths(value: Any) -> Any:
    """Folders separated by ':' or ','; none named means the default."""
    if not isinstance(value, str):
        return value
    paths = tuple(Path(p.strip()) for p in value.replace(",", os.pathsep).split(os.pathsep) if p.strip())
    if not paths:
        raise PydanticUseDefault()
    return paths


def _keys(value: Any) -> Any:
    """A comma-separated list of keys (blank entries dropped)."""
    return frozenset(k.strip() for k in value.split(",") if k.strip()) if isinstance(value, str) else value


def _batch_max(value: Any) -> Any:
    """``auto`` (None: measured at load) or a whole number >= 1."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = int(value)
        except ValueError:
            value = 0
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError("must be auto or a whole number >= 1")
    return value


def _scaled(unit: int, minimum: float, kind: type = float) -> BeforeValidator:
    """A size given in the variable's unit (MB, KB) as a whole number of bytes; a keyword argument is
    already in bytes and passes through."""

    def parse(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"must be a {'whole number' if kind is int else 'number'}") from None
        if not (math.isfinite(number) and number >= minimum):
            raise ValueError(f"must be >= {minimum}")
        return int(number * unit)

    return BeforeValidator(parse)


def _url(value: str | None) -> str | None:
    """A URL without its trailing slashes (None when nothing is left)."""
    return (value.rstrip("/") or None) if value is not None else None


Choice = BeforeValidator(_lower)
Flag = Annotated[bool, BeforeValidator(_flag)]
Paths = Annotated[tuple[Path, ...], NoDecode, BeforeValidator(_paths)]
Keys = Annotated[frozenset[str], NoDecode, BeforeValidator(_keys)]
Url = Annotated[str, AfterValidator(lambda v: v.rstrip("/"))]
OptionalUrl = Annotated[str | None, AfterValidator(_url)]
MB = 1024 * 1024


def _var(name: str, **field: Any) -> Any:
    """A field read from ``XRAYFM_<name>`` (the full name is the field's alias)."""
    return Field(validation_alias=PREFIX + name, **field)


# -- the shared machinery ---------------------------------------------------------------------------------

_PHRASES: dict[str, Callable[[dict[str, Any]], str]] = {
    "int_parsing": lambda ctx: "must be a whole number",
    "int_from_float": lambda ctx: "must be a whole number",
    "int_type": lambda ctx: "must be a whole number",
    "float_parsing": lambda ctx: "must be a float",
    "float_type": lambda ctx: "must be a float",
    "finite_number": lambda ctx: "must be a finite number",
    "greater_than_equal": lambda ctx: f"must be >= {ctx['ge']}",
    "greater_than": lambda ctx: f"must be > {ctx['gt']}",
    "less_than_equal": lambda ctx: f"must be <= {ctx['le']}",
    "literal_error": lambda ctx: f"must be one of {ctx['expected']} (choose one of them)",
}


# The mapping `from_env(env)` reads instead of os.environ, while it builds its settings (None: os.environ)
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("xrayfm_settings_environ", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' own environment source, over a mapping instead of ``os.environ``: both are read
    by the same rules (case-sensitive names, blank values unset, no JSON decoding of the lists)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name: value for name, value in self._environ.items() if value != ""}


class StackSettings(BaseSettings):
    """What every service's settings share: the ``XRAYFM_`` variables, frozen, strict about bad values (also
    the base of the local launcher's own settings, xrayfm_local)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        case_sensitive=True,  # XRAYFM_QUEUE is a variable; a field named `queue` must not read it
        env_ignore_empty=True,
        frozen=True,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """Values are stripped; a blank one counts as unset."""
        if not isinstance(data, Mapping):
            return data
        return {
            key: value.strip() if isinstance(value, str) else value
            for key, value in data.items()
            if not (isinstance(value, str) and not value.strip())
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment (or the mapping `from_env` was given); no .env file."""
        environ = _ENVIRON.get()
        return (init_settings, env_settings if environ is None else _MappingEnvSource(settings_cls, environ))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """The settings from ``os.environ`` (None) or from `env` alone; a bad value raises
        :class:`XrayfmError` naming its variable and what it allows. Nested settings (the gateway's queue)
        read the same."""
        token = _ENVIRON.set(env)
        try:
            nested: dict[str, Any] = {  # field -> its settings (each of its own class, hence Any)
                name: field.annotation.from_env(env)
                for name, field in cls.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, StackSettings)
            }
            return cls(**nested)
        except ValidationError as exc:
            raise XrayfmError(cls._explain(exc)) from None
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def variables(cls) -> list[str]:
        """Every variable these settings read (nested settings' included)."""
        names: list[str] = []
        for field in cls.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, StackSettings):
                names += field.annotation.variables()
            elif isinstance(field.validation_alias, AliasChoices):
                names += [str(choice) for choice in field.validation_alias.choices]
            elif isinstance(field.validation_alias, str):
                names.append(field.validation_alias)
        return names

    @classmethod
    def _variable(cls, key: str) -> str:
        """The variable behind a validation error's location (an alias, or a field name)."""
        field = cls.model_fields.get(key)
        if field is None:
            return key
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return alias if isinstance(alias, str) else key

    @classmethod
    def _explain(cls, exc: ValidationError) -> str:
        """pydantic's errors as ``XRAYFM_X must be ..., got '...'`` (keys and passwords never echoed)."""
        said = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if not error["loc"]:  # a check across variables: its message names them
                said.append(message)
                continue
            name = cls._variable(str(error["loc"][0]))
            phrase = _PHRASES.get(error["type"])
            what = phrase(error.get("ctx", {})) if phrase else message
            secret = "KEY" in name or "PASSWORD" in name
            said.append(f"{name} {what}" + ("" if secret else f", got {error.get('input')!r}"))
        return "; ".join(said)


# -- the services' settings -------------------------------------------------------------------------------


class QueueSettings(StackSettings):
    """What the gateway and the inference workers must agree on: the Redis URL, the queue, expiries and
    timeouts."""

    redis_url: str = _var("REDIS_URL", default=DEFAULT_REDIS_URL)  # broker and result backend
    queue: str = _var("QUEUE", default="xrayfm-inference")  # Celery queue; prefix of the stack's own keys
    # XRAYFM_RESULT_EXPIRES: results (and job records) vanish from Redis after this
    result_expires_s: int = _var("RESULT_EXPIRES", default=600, ge=1)
    # XRAYFM_TASK_TIME_LIMIT: a request still unanswered by the worker after this fails clearly
    task_time_limit_s: float = _var("TASK_TIME_LIMIT", default=30.0, ge=0.1)
    # XRAYFM_VISIBILITY_TIMEOUT: an unacknowledged message (its worker died) is redelivered after this
    visibility_timeout_s: int = _var("VISIBILITY_TIMEOUT", default=60, ge=1)
    heartbeat_s: float = _var("HEARTBEAT_S", default=2.0, ge=0.1)  # workers announce themselves this often

    @model_validator(mode="after")
    def _redelivery_after_the_time_limit(self) -> Self:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"XRAYFM_VISIBILITY_TIMEOUT ({self.visibility_timeout_s} s) must exceed "
                f"XRAYFM_TASK_TIME_LIMIT ({self.task_time_limit_s} s), "
                "or requests still running get redelivered"
            )
        return self

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
        """A worker whose last heartbeat is older than this is considered gone (3 missed beats)."""
        return 3.0 * self.heartbeat_s


class InferenceSettings(StackSettings):
    """The inference worker's settings (see services/README.md for each variable)."""

    queue: QueueSettings = Field(default_factory=QueueSettings)
    model_path: Path | None = _var("MODEL_PATH", default=None)  # a checkpoint folder; wins over the store
    model_store: Path = _var("MODEL_STORE", default=DEFAULT_STORE)  # layout in xrayfm_stack.store
    device: str = _var("DEVICE", default="auto")  # auto (cuda when present), cpu, cuda, cuda:1...
    # XRAYFM_BATCH_MAX: the most images per model batch; 1 disables batching; "auto" (None here): the worker
    # measures its model at load and picks a size (xrayfm.inference.batching.auto_batch_max)
    batch_max: Annotated[int | None, BeforeValidator(_batch_max)] = _var("BATCH_MAX", default=None)
    batch_tune_s: float = _var("BATCH_TUNE_S", default=10.0, ge=0)  # the time that measurement may take
    batch_wait_ms: float = _var("BATCH_WAIT_MS", default=5.0, ge=0)  # how long a batch waits for company
    # XRAYFM_WORKER_METRICS_PORT: Prometheus endpoint; 0 = off
    metrics_port: int = _var("WORKER_METRICS_PORT", default=9101, ge=0)
    metrics_addr: str = _var("WORKER_METRICS_ADDR", default="0.0.0.0")  # where that endpoint listens
    torch_threads: int = _var("TORCH_THREADS", default=0, ge=0)  # 0 = torch's default
    # XRAYFM_HEATMAP_SIDE: the heatmap PNG's long side at most (the image's aspect ratio); 0 = the size of
    # the image the worker got. A map of 14x14 to 28x28 patches loses nothing at 256 px, and a smaller PNG
    # is faster to encode and to carry.
    heatmap_side: int = _var("HEATMAP_SIDE", default=256, ge=0)
    explain_method: ExplainMethod = _var("EXPLAIN_METHOD", default="rollout")  # default heatmap method
    model_poll_s: float = _var("MODEL_POLL_S", default=2.0, ge=0)  # looks at serving.json; 0 = off
    # XRAYFM_RUNTIME: torch or onnxruntime (exported once per checkpoint, cached)
    runtime: Annotated[Runtime, Choice] = _var("RUNTIME", default="torch")
    # XRAYFM_QUANTIZE: none, int8 (dynamic int8 weights; onnxruntime only) or auto (int8 when the version's
    # verdict allows it: it lost at most 0.005 AUROC on its validation images; else fp32)
    quantize: Annotated[Quantize, Choice] = _var("QUANTIZE", default="none")
    runtime_cache: Path | None = _var(
        "RUNTIME_CACHE", default=None
    )  # ONNX exports; None = ~/.cache/xrayfm/onnx

    @model_validator(mode="after")
    def _int8_needs_onnxruntime(self) -> Self:
        if self.quantize == "int8" and self.runtime == "torch":
            raise ValueError(f"XRAYFM_QUANTIZE={self.quantize} needs XRAYFM_RUNTIME=onnxruntime")
        return self


class TrainingSettings(StackSettings):
    """What the gateway and the training worker agree on, and the worker's own folders."""

    # XRAYFM_TRAINING_REDIS_URL (else XRAYFM_REDIS_URL): broker and job records of the training side. It
    # may be a Redis of its own that keeps its data on disk (AOF), while the inference Redis keeps none.
    redis_url: str = Field(
        DEFAULT_REDIS_URL, validation_alias=AliasChoices(f"{PREFIX}TRAINING_REDIS_URL", f"{PREFIX}REDIS_URL")
    )
    queue: str = _var("TRAINING_QUEUE", default="xrayfm-training")  # Celery queue; prefix of the job keys
    model_store: Path = _var("MODEL_STORE", default=DEFAULT_STORE)  # where finished jobs publish
    runs_dir: Path = _var("TRAINING_RUNS", default=Path("runs/training"))  # one run folder per job
    # XRAYFM_TRAINING_VISIBILITY_TIMEOUT: an unacknowledged job message is redelivered after this; the
    # per-job lock (not this timeout) is what keeps a redelivered job from running twice at once.
    visibility_timeout_s: int = _var("TRAINING_VISIBILITY_TIMEOUT", default=6 * 3600, ge=1)
    # XRAYFM_TRAINING_LOCK_TTL: a job's lock lapses this long after its worker died
    lock_ttl_s: float = _var("TRAINING_LOCK_TTL", default=30.0, ge=1.0)
    # XRAYFM_TRAINING_MAX_ATTEMPTS: a job whose worker died this many times fails (e.g. it runs out of memory)
    max_attempts: int = _var("TRAINING_MAX_ATTEMPTS", default=3, ge=1)
    torch_threads: int = _var("TORCH_THREADS", default=0, ge=0)  # 0 = torch's default
    # XRAYFM_BOOTSTRAP: first start with an empty store: shipped (install and serve the shipped real-data
    # model, no training), demo (train one on synthetic phantoms), quick (a tiny demo, for tests), off
    bootstrap: Annotated[Bootstrap, Choice] = _var("BOOTSTRAP", default="shipped")
    # XRAYFM_BOOTSTRAP_MODEL: the shipped model (xrayfm/<name>) that `shipped` installs
    bootstrap_model: str = _var("BOOTSTRAP_MODEL", default="xrayfm/cxr-vit-tiny-mae-pneumonia-lora")
    # XRAYFM_DATA_DIRS: the data folders; publishing the shipped model looks there for the dataset it was
    # validated on, to measure its int8 verdict (xrayfm.inference.graphs)
    data_dirs: Paths = _var("DATA_DIRS", default=(DEFAULT_DATA_DIR,))


class GatewaySettings(StackSettings):
    """What the gateway accepts and how long it waits."""

    queue: QueueSettings = Field(default_factory=QueueSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    api_keys: Keys = _var("API_KEYS", default=frozenset(), repr=False)  # comma-separated; empty = auth off
    # XRAYFM_MAX_UPLOAD_MB (per file; the field is in bytes, as are the other *_bytes below)
    max_upload_bytes: Annotated[int, _scaled(MB, 0.001)] = _var("MAX_UPLOAD_MB", default=64 * MB, ge=1)
    # XRAYFM_MAX_STUDY_IMAGES: files per /predict/study (MURA studies have <= 11)
    max_study_images: int = _var("MAX_STUDY_IMAGES", default=12, ge=1)
    max_pixels: int = _var(
        "MAX_PIXELS", default=60_000_000, ge=1
    )  # larger images are refused before decoding
    max_image_side: int = _var("MAX_IMAGE_SIDE", default=20_000, ge=1)  # absurd dimensions are refused
    min_image_side: int = _var("MIN_IMAGE_SIDE", default=8, ge=1)
    # XRAYFM_TRANSPORT_SIDE: longest side of the pixels sent to the worker (which refuses more than MAX_SIDE)
    transport_side: int = _var("TRANSPORT_SIDE", default=512, ge=16, le=MAX_SIDE)
    # XRAYFM_PREDICT_TIMEOUT: /predict waits this long, then 504 + job id
    predict_timeout_s: float = _var("PREDICT_TIMEOUT", default=60.0, ge=0.1)
    explain_method: ExplainMethod = _var("EXPLAIN_METHOD", default="rollout")  # the default heatmap method
    # XRAYFM_DECODE_CONCURRENCY: decoder processes (uploads decoded at once)
    decode_concurrency: int = _var("DECODE_CONCURRENCY", default=4, ge=1)
    # XRAYFM_DECODE_TIMEOUT: a decode taking longer is abandoned (422)
    decode_timeout_s: float = _var("DECODE_TIMEOUT", default=15.0, ge=0.01)
    # XRAYFM_DECODE_MEMORY_MB: address-space cap of each decoder process
    decode_memory_mb: int = _var("DECODE_MEMORY_MB", default=1024, ge=0)
    # XRAYFM_MAX_STUDY_PIXELS: pixels of a study's images in all
    max_study_pixels: int = _var("MAX_STUDY_PIXELS", default=240_000_000, ge=1)
    # XRAYFM_MAX_STUDY_MB: a /predict/study upload in all
    max_study_bytes: Annotated[int, _scaled(MB, 0.001)] = _var("MAX_STUDY_MB", default=256 * MB, ge=1)
    # XRAYFM_UPLOAD_BUFFER_MB: uploads held at once (per process)
    upload_buffer_bytes: Annotated[int, _scaled(MB, 1)] = _var("UPLOAD_BUFFER_MB", default=512 * MB, ge=1)
    # XRAYFM_GATEWAY_WORKERS: gateway processes sharing the port (xrayfm_gateway.serve)
    workers: int = _var("GATEWAY_WORKERS", default=1, ge=1)
    # XRAYFM_MAX_JSON_KB: any request body but an upload (413 above)
    max_json_bytes: Annotated[int, _scaled(1024, 1, int)] = _var("MAX_JSON_KB", default=256 * 1024, ge=1)
    admin_keys: Keys = _var(
        "ADMIN_KEYS", default=frozenset(), repr=False
    )  # training and model-store endpoints
    model_store: Path = _var("MODEL_STORE", default=DEFAULT_STORE)  # listed, promoted, rolled back
    # XRAYFM_INSECURE_NO_AUTH=1: with no admin key, leave the training and model endpoints open (local
    # development only; `make up` sets it). Unset, they answer 403 until XRAYFM_ADMIN_KEYS is set.
    insecure_no_auth: Flag = _var("INSECURE_NO_AUTH", default=False)
    # XRAYFM_DATA_DIRS (':' or ','-separated): the folders training jobs may read; a spec's dataset roots,
    # caches and foundations must lie under one of them (or be store: references).
    data_dirs: Paths = _var("DATA_DIRS", default=(DEFAULT_DATA_DIR,))
    feedback_dir: Path = _var(
        "FEEDBACK_DIR", default=Path("runs/feedback")
    )  # staff feedback (xrayfm.feedback)
    # XRAYFM_FEEDBACK_KEEP_IMAGES=1: keep the (transport-sized) image of each answer given feedback, so that
    # the feedback becomes a training set. Off by default: no uploaded image is written anywhere.
    feedback_keep_images: Flag = _var("FEEDBACK_KEEP_IMAGES", default=False)
    # XRAYFM_FEEDBACK_RETENTION_DAYS: kept images are deleted after this
    feedback_retention_days: float = _var("FEEDBACK_RETENTION_DAYS", default=30.0, ge=0.0)
    # XRAYFM_DOMAIN_POLICY: an image outside the served version's domain is refused (422 out_of_domain),
    # answered with a warning (flag), or not checked (off)
    domain_policy: Annotated[DomainPolicy, Choice] = _var("DOMAIN_POLICY", default="refuse")
    # XRAYFM_DRIFT_WINDOW: answers per version in the drift gauges' rolling window
    drift_window: int = _var("DRIFT_WINDOW", default=500, ge=10)
    # XRAYFM_AUDIT_LOG: the audit trail (xrayfm.audit), one hash-chained line per admin action and prediction
    audit_log: Path = _var("AUDIT_LOG", default=Path("runs/audit/audit.jsonl"))
    # XRAYFM_ROUTER_PREFIX: the PACS router's Redis key prefix; GET /studies reads its list of studies there
    router_prefix: str = _var("ROUTER_PREFIX", default="xrayfm:router")

    @property
    def auth_enabled(self) -> bool:
        """True when at least one API key is configured."""
        return bool(self.api_keys)


class RouterSettings(StackSettings):
    """The PACS router (xrayfm_router): the Orthanc it follows, the gateway it asks, where it keeps its
    place."""

    orthanc_url: Url = _var(
        "ORTHANC_URL", default="http://127.0.0.1:8042"
    )  # REST root (DICOMweb: /dicom-web)
    orthanc_user: str = _var("ORTHANC_USER", default="xrayfm")
    # XRAYFM_ORTHANC_PASSWORD, or the file XRAYFM_ORTHANC_PASSWORD_FILE names (compose mounts it as a secret)
    orthanc_password: str | None = _var("ORTHANC_PASSWORD", default=None, repr=False)
    orthanc_password_file: Path | None = _var("ORTHANC_PASSWORD_FILE", default=None, repr=False)
    gateway_url: Url = _var("GATEWAY_URL", default="http://127.0.0.1:8000")
    api_key: str | None = _var(
        "ROUTER_API_KEY", default=None, repr=False
    )  # sent to the gateway (one of its API keys)
    # XRAYFM_ROUTER_REDIS_URL, else XRAYFM_TRAINING_REDIS_URL (kept on disk), else XRAYFM_REDIS_URL: the
    # position in Orthanc's changes feed and the studies answered, so that a restart goes on where it was
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        validation_alias=AliasChoices(
            f"{PREFIX}ROUTER_REDIS_URL", f"{PREFIX}TRAINING_REDIS_URL", f"{PREFIX}REDIS_URL"
        ),
    )
    prefix: str = _var("ROUTER_PREFIX", default="xrayfm:router")  # of its Redis keys
    poll_s: float = _var("ROUTER_POLL_S", default=2.0, ge=0.05)  # how often an idle router asks for changes
    # XRAYFM_ROUTER_BACKFILL=1: a first start answers the studies already stored
    backfill: Flag = _var("ROUTER_BACKFILL", default=False)
    # XRAYFM_ROUTER_REMEMBER_DAYS: how long an answered study is remembered
    remember_days: float = _var("ROUTER_REMEMBER_DAYS", default=90.0, ge=0.001)
    timeout_s: float = _var("ROUTER_TIMEOUT", default=120.0, ge=1)  # one HTTP call to Orthanc or the gateway
    audit_log: Path = _var("AUDIT_LOG", default=Path("runs/audit/audit.jsonl"))  # study_result records

    @model_validator(mode="before")
    @classmethod
    def _password_from_file(cls, data: Any) -> Any:
        """No password given: read it from the file ``XRAYFM_ORTHANC_PASSWORD_FILE`` names."""
        if not isinstance(data, Mapping):
            return data
        given = [data.get(key) for key in (f"{PREFIX}ORTHANC_PASSWORD", "orthanc_password")]
        path = data.get(f"{PREFIX}ORTHANC_PASSWORD_FILE") or data.get("orthanc_password_file")
        if any(isinstance(v, str) and v.strip() for v in given) or not str(path or "").strip():
            return data
        try:
            password = Path(str(path).strip()).read_text().strip()
        except OSError as exc:
            raise ValueError(f"XRAYFM_ORTHANC_PASSWORD_FILE={path} cannot be read: {exc.strerror}") from None
        return {**data, "orthanc_password": password}


class FrontendSettings(StackSettings):
    """Where the gateway is and how to call it."""

    gateway_url: Url = _var("GATEWAY_URL", default="http://127.0.0.1:8000")
    api_key: str | None = _var("FRONTEND_API_KEY", default=None, repr=False)  # sent with predictions
    timeout_s: float = _var("FRONTEND_TIMEOUT", default=90.0, ge=0.1)  # seconds a prediction may take
    admin_key: str | None = _var(
        "FRONTEND_ADMIN_KEY", default=None, repr=False
    )  # for the training and model pages
    # XRAYFM_FRONTEND_REFRESH_S: training page refresh while a job is active; 0 (or less) = off
    refresh_s: Annotated[float, AfterValidator(lambda v: max(v, 0.0))] = _var(
        "FRONTEND_REFRESH_S", default=3.0
    )
    # XRAYFM_PACS_VIEWER_URL: Orthanc Explorer's root (the Studies page links each study to it); None: none
    pacs_viewer_url: OptionalUrl = _var("PACS_VIEWER_URL", default=None)
