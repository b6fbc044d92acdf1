"""The JSON job spec (:class:`xrayfm_stack.protocol.JobSpec`), checked before a job is queued: the gateway
and the training worker use this same check, built on the library's config dataclasses.

    {"kind": "pretrain" | "adapt", "name": "chest-fm", "config": {...PretrainConfig / AdaptConfig fields...}}
    {"kind": "evaluate", "config": {"model": "store:bone-lora/1", "kind": "mura", "root": "/data/MURA-v1.1"}}
    {"kind": "calibrate", "config": {"model": "store:bone-lora/1", "data": ["folder:/data/site:train"]}}

The worker owns ``out`` (the job's run folder) and ``resume``, so a spec may not set them. An adapt
job's ``foundation`` and an evaluate job's ``model`` may name a store version as ``"store:<name>/<version>"``;
an evaluate job of a store version records its result with that version (see GET /models). A calibrate
job's ``model`` may too; its result is published as the next version of that model's name (by default).

Confinement: given the data folders a stack may read (``XRAYFM_DATA_DIRS``), every path a spec names
(dataset roots, caches, foundations, models, initial weights) must lie under one of them once symlinks and
``..`` are resolved, or be a ``store:`` reference or the name of a model shipped in the package
(``xrayfm/<name>``); so must the root of every ``KIND:ROOT[:SPLIT]`` in a calibrate job's ``data`` and
``eval_data``; timm arguments that name files are refused. So a spec
cannot make the worker read, or report on, any other file of its container.

Nothing is downloaded at run time: a training config's ``model`` is a timm architecture name, never a hub
reference (checked by the config itself), and ``"pretrained": "timm"`` (timm's own weights, fetched from
the Hugging Face hub) is refused: initial weights are a file under the data folders. Every number lies in
its field's documented range and is finite, and every setting with choices (``kind``, ``resize_mode``,
``verify``, ``method``...) holds one of them (the config classes check both, naming the setting and what
it allows).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.registry import is_registry_name, pretrained_dir, store_ref
from xrayfm.train.config import (
    AdaptConfig,
    CalibrateConfig,
    EvaluateConfig,
    JsonConfig,
    PretrainConfig,
    TuneConfig,
    split_source,
)
from xrayfm_stack.protocol import JobSpec
from xrayfm_stack.store import version_dir

# Job kind -> the config class of its spec, by name: every kind of JOB_KINDS has one, and nothing else.
CONFIGS: dict[str, type[JsonConfig]] = {
    "pretrain": PretrainConfig,
    "adapt": AdaptConfig,
    "evaluate": EvaluateConfig,
    "tune": TuneConfig,
    "calibrate": CalibrateConfig,
}
RESERVED = ("out", "resume")
PATH_FIELDS = (
    "root",
    "cache",
    "val_cache",
    "pretrained",
    "foundation",
    "model",
)  # model: evaluate's and calibrate's checkpoint
CHECKPOINT_MODEL = ("evaluate", "calibrate")  # kinds whose `model` is a checkpoint, not a timm name
SOURCE_FIELDS = ("data", "eval_data")  # lists of KIND:ROOT[:SPLIT] (calibrate)
STORE_FIELDS = ("foundation", "model")  # may be store:<name>/<version>
FILE_ARGUMENT = ("path", "file", "dir", "url", "pretrained", "cfg")  # timm arguments that could name a file
MAX_DEPTH = 16  # nesting of a spec's JSON: configs are a few levels deep; deeper ones are refused unread


def check_plain(spec: Any) -> None:
    """Refuse a spec nested deeper than ``MAX_DEPTH`` or holding a NUL character (no path or name has one),
    naming the field. Iterative: a hostile nesting cannot overflow the stack here."""
    todo: list[tuple[str, Any, int]] = [("", spec, 0)]
    while todo:
        where, value, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise XrayfmError(f"the job spec is nested deeper than {MAX_DEPTH} levels (at {where})")
        if isinstance(value, str) and "\x00" in value:
            raise XrayfmError(f"{where} holds a NUL character: no path or name has one")
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in str(key):
                    raise XrayfmError(f"a key in {where or 'the spec'} holds a NUL character")
                todo.append((f"{where}.{str(key)[:40]}".lstrip("."), item, depth + 1))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item, depth + 1) for i, item in enumerate(value))


def resolve_store_ref(value: str, store: Path) -> str:
    """``store:<name>/<version>`` -> that version's folder (which must exist); other values unchanged."""
    ref = store_ref(value)
    if ref is None:
        return value
    folder = version_dir(store, *ref)
    if not folder.is_dir():
        raise XrayfmError(f"{value!r}: no version {'/'.join(ref)} in the model store")
    return str(folder.resolve())


def confine(field: str, value: str, data_dirs: Sequence[Path]) -> str:
    """The path resolved (symlinks and ``..``); refused, naming the allowed folders, when it lies outside
    `data_dirs`."""
    target = Path(value).resolve()
    for folder in data_dirs:
        root = Path(folder).resolve()
        if target == root or root in target.parents:
            return str(target)
    allowed = ", ".join(str(d) for d in data_dirs) or "none configured"
    raise XrayfmError(
        f"{field} {value!r} is outside the data folders this stack may read ({allowed}): put the data "
        "there, or add its folder to XRAYFM_DATA_DIRS"
    )


def _confine_source(field: str, spec: str, data_dirs: Sequence[Path]) -> str:
    """A ``KIND:ROOT[:SPLIT]`` with its root resolved and confined (see :func:`confine`)."""
    kind, root, split = split_source(spec)
    resolved = confine(field, root, data_dirs)
    return f"{kind}:{resolved}" + (f":{split}" if split else "")


def _default_name(kind: str, config: Any) -> str:
    """The model name a spec without one publishes as: an evaluate or calibrate job's model's own name
    (a store version's, a shipped model's); else ``<kind>-model``."""
    model = str(config.get("model", "")) if isinstance(config, dict) and kind in CHECKPOINT_MODEL else ""
    ref = store_ref(model)
    if ref is not None:
        return ref[0]
    if kind == "calibrate" and is_registry_name(model):
        return model.rpartition("/")[2]
    return f"{kind}-model"


def _confine_config(kind: str, config: JsonConfig, data_dirs: Sequence[Path]) -> dict[str, Any]:
    """The config's paths, resolved and checked (the job then opens exactly what was checked)."""
    resolved = {}
    for field in PATH_FIELDS:
        if field == "model" and kind not in CHECKPOINT_MODEL:
            continue  # a timm model name in training configs; evaluate's and calibrate's is a checkpoint
        value = getattr(config, field, None)
        if not value:
            continue
        if field in STORE_FIELDS and store_ref(str(value)) is not None:
            continue
        if field in STORE_FIELDS and is_registry_name(str(value)):
            pretrained_dir(str(value))  # a model shipped inside the package (xrayfm/<name>): it must exist
            continue
        resolved[field] = confine(field, str(value), data_dirs)
    for field in SOURCE_FIELDS:
        specs = getattr(config, field, None)
        if specs:
            resolved[field] = [_confine_source(f"{field}[{i}]", s, data_dirs) for i, s in enumerate(specs)]
    kwargs = getattr(config, "model_kwargs", None) or {}
    named_files = sorted(k for k in kwargs if any(part in str(k).lower() for part in FILE_ARGUMENT))
    if named_files:
        raise XrayfmError(
            f"model_kwargs may not set {named_files} in a job spec: weights come from the store"
        )
    return resolved


def validate_spec(
    spec: Any, store: Path | None = None, data_dirs: Sequence[Path] | None = None
) -> dict[str, Any]:
    """Check a job spec; returns it normalised (config with every field). Raises XrayfmError saying why.

    With `store`, a ``store:`` foundation or model must exist there. With `data_dirs` (the gateway always
    passes them), the spec's paths are confined to those folders (see the module's docstring)."""
    if not isinstance(spec, dict):
        raise XrayfmError("a job spec is a JSON object: {'kind', 'name', 'config'}")
    check_plain(spec)
    unknown = sorted(set(spec) - {"kind", "name", "config"})
    if unknown:
        raise XrayfmError(f"unknown job spec keys {unknown} (allowed: kind, name, config)")
    kind = spec.get("kind")
    if kind not in CONFIGS:
        raise XrayfmError(f"job kind {kind!r}: choose one of {sorted(CONFIGS)}")
    config = spec.get("config")
    name = spec.get("name", _default_name(kind, config))
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
    if getattr(parsed, "pretrained", None) == "timm":
        raise XrayfmError(
            "pretrained 'timm' would fetch timm's weights from the Hugging Face hub, and jobs download "
            "nothing: put the weights file under the data folders and name it"
        )
    if store is not None and isinstance(parsed, AdaptConfig) and parsed.foundation:
        resolve_store_ref(parsed.foundation, store)
    if store is not None and isinstance(parsed, EvaluateConfig | CalibrateConfig):
        resolve_store_ref(parsed.model, store)
    checked = parsed.to_dict()
    if data_dirs is not None:
        checked.update(_confine_config(kind, parsed, data_dirs))
    return JobSpec(kind=kind, name=name, config=checked).model_dump()
