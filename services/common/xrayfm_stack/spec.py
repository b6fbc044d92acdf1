"""The JSON job spec (:class:`xrayfm_stack.protocol.JobSpec`), checked before a job is queued: the gateway
and the training worker use this same check, built on the library's config dataclasses.

    {"kind": "pretrain" | "adapt", "name": "chest-fm", "config": {...PretrainConfig / AdaptConfig fields...}}
    {"kind": "evaluate", "config": {"model": "store:bone-lora/1", "kind": "mura", "root": "/data/MURA-v1.1"}}

The worker owns ``out`` (the job's run folder) and ``resume``, so a spec may not set them. An adapt
job's ``foundation`` and an evaluate job's ``model`` may name a store version as ``"store:<name>/<version>"``;
an evaluate job of a store version records its result with that version (see GET /models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.train.config import AdaptConfig, EvaluateConfig, JsonConfig, PretrainConfig
from xrayfm_stack.protocol import JOB_KINDS, JobSpec
from xrayfm_stack.store import version_dir

CONFIGS: dict[str, type[JsonConfig]] = dict(
    zip(JOB_KINDS, (PretrainConfig, AdaptConfig, EvaluateConfig), strict=True)
)
RESERVED = ("out", "resume")
STORE_PREFIX = "store:"


def store_ref(value: str) -> tuple[str, str] | None:
    """``store:<name>/<version>`` -> (name, version); None for any other value (a folder path)."""
    if not value.startswith(STORE_PREFIX):
        return None
    name, _, version = value[len(STORE_PREFIX) :].partition("/")
    return name, version


def resolve_store_ref(value: str, store: Path) -> str:
    """``store:<name>/<version>`` -> that version's folder (which must exist); other values unchanged."""
    ref = store_ref(value)
    if ref is None:
        return value
    folder = version_dir(store, *ref)
    if not folder.is_dir():
        raise XrayfmError(f"{value!r}: no version {'/'.join(ref)} in the model store")
    return str(folder.resolve())


def validate_spec(spec: Any, store: Path | None = None) -> dict[str, Any]:
    """Check a job spec; returns it normalised (config with every field). Raises XrayfmError saying why.

    With `store`, a ``store:`` foundation must exist there."""
    if not isinstance(spec, dict):
        raise XrayfmError("a job spec is a JSON object: {'kind', 'name', 'config'}")
    unknown = sorted(set(spec) - {"kind", "name", "config"})
    if unknown:
        raise XrayfmError(f"unknown job spec keys {unknown} (allowed: kind, name, config)")
    kind = spec.get("kind")
    if kind not in CONFIGS:
        raise XrayfmError(f"job kind {kind!r}: choose one of {sorted(CONFIGS)}")
    config = spec.get("config")
    default_name = f"{kind}-model"
    if kind == "evaluate" and isinstance(config, dict):  # named after the model it evaluates
        default_name = (store_ref(str(config.get("model", ""))) or (default_name,))[0]
    name = spec.get("name", default_name)
    version_dir(Path("."), name, "1")  # checks the model name (letters, digits, '.', '_', '-')
    if not isinstance(config, dict):
        raise XrayfmError("job spec 'config' must be a JSON object of training settings")
    reserved = [key for key in RESERVED if key in config]
    if reserved:
        raise XrayfmError(f"job spec config may not set {reserved}: the worker chooses the run folder")
    try:
        parsed = CONFIGS[kind].from_dict(config)
    except TypeError as exc:  # e.g. a wrong value type that the dataclass constructor refuses
        raise XrayfmError(f"invalid {kind} config: {exc}") from None
    if store is not None and isinstance(parsed, AdaptConfig) and parsed.foundation:
        resolve_store_ref(parsed.foundation, store)
    if store is not None and isinstance(parsed, EvaluateConfig):
        resolve_store_ref(parsed.model, store)
    return JobSpec(kind=kind, name=name, config=parsed.to_dict()).model_dump()
