"""The JSON job spec, checked before a job is queued (the gateway and the worker use the same check).

    {"kind": "pretrain" | "adapt", "name": "chest-fm", "config": {...PretrainConfig / AdaptConfig fields...}}

The worker owns ``out`` (the job's run folder) and ``resume``, so a spec may not set them. An adapt
job's ``foundation`` may name a store version as ``"store:<name>/<version>"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.train.config import AdaptConfig, PretrainConfig, TrainConfig
from xrayfm_inference.store import version_dir

CONFIGS: dict[str, type[TrainConfig]] = {"pretrain": PretrainConfig, "adapt": AdaptConfig}
RESERVED = ("out", "resume")
STORE_PREFIX = "store:"


def resolve_foundation(foundation: str, store: Path) -> str:
    """``store:<name>/<version>`` -> that version's folder (which must exist); other values unchanged."""
    if not foundation.startswith(STORE_PREFIX):
        return foundation
    ref = foundation[len(STORE_PREFIX) :]
    name, _, version = ref.partition("/")
    folder = version_dir(store, name, version)
    if not folder.is_dir():
        raise XrayfmError(f"foundation {foundation!r}: no version {ref} in the model store")
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
    name = spec.get("name", f"{kind}-model")
    version_dir(Path("."), name, "1")  # checks the model name (letters, digits, '.', '_', '-')
    config = spec.get("config")
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
        resolve_foundation(parsed.foundation, store)
    return {"kind": kind, "name": name, "config": parsed.to_dict()}
