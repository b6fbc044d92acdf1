"""The JSON job spec (:class:`xrayfm_stack.protocol.JobSpec`), checked before a job is queued: the gateway
and the training worker use this same check, built on the library's pydantic configs; and the registry of
job kinds (:func:`register_job_kind`): per kind, its config class, the fields that name files, store
versions or sources, whether it publishes a version, and its runner (which the training worker registers).
A spec as submitted is :data:`JobSpecBody`, a pydantic union of the kinds' job models told apart by
``kind``: the gateway's OpenAPI document shows it.

    {"kind": "pretrain" | "adapt" | "tune", "name": "chest-fm", "config": {...PretrainConfig / AdaptConfig fields...}}
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

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, create_model

from xrayfm.errors import XrayfmError
from xrayfm.registry import is_registry_name, pretrained_dir, store_ref
from xrayfm.train.config import (
    AdaptConfig,
    CalibrateConfig,
    EvaluateConfig,
    JsonConfig,
    PretrainConfig,
    TuneConfig,
    explain,
    settings_of,
    split_source,
)
from xrayfm_stack.protocol import JobKind, JobSpec
from xrayfm_stack.store import version_dir

RESERVED = ("out", "resume")
FILE_ARGUMENT = ("path", "file", "dir", "url", "pretrained", "cfg")  # timm arguments that could name a file
MAX_DEPTH = 16  # nesting of a spec's JSON: configs are a few levels deep; deeper ones are refused unread
TRAINING_PATHS = ("root", "cache", "val_cache")  # the data of pretrain, adapt and tune


# -- the job kinds: one registry says what each kind is ---------------------------------------------------
@dataclasses.dataclass
class JobKindSpec:
    """What a job kind is: the config class of its spec, the config fields that name files (confined to
    the data folders), those that may name a store version (``store:<name>/<version>``) or a shipped model,
    those that list ``KIND:ROOT[:SPLIT]`` sources, whether it publishes a store version, its audit action,
    and its runner (registered by the training worker: the gateway never imports one)."""

    kind: JobKind
    config: type[JsonConfig]
    path_fields: tuple[str, ...]
    publishes: bool
    store_fields: tuple[str, ...] = ()
    source_fields: tuple[str, ...] = ()
    audit_action: str = "train_submit"
    runner: Callable[..., dict[str, Any]] | None = dataclasses.field(default=None, repr=False)

    @property
    def names_after_model(self) -> str | None:
        """The store field whose model names the job when its spec gives no name: a checkpoint ``model``
        (evaluate, calibrate); None for kinds named ``<kind>-model``."""
        return "model" if "model" in self.store_fields else None


KINDS: dict[str, JobKindSpec] = {}


def register_job_kind(
    kind: JobKind,
    config: type[JsonConfig],
    *,
    path_fields: Sequence[str],
    publishes: bool,
    store_fields: Sequence[str] = (),
    source_fields: Sequence[str] = (),
    audit_action: str = "train_submit",
) -> JobKindSpec:
    """Add a job kind (see :class:`JobKindSpec`); every field named must be one of its config's."""
    # mypy takes a class held in a variable for unhashable (type[X] against Hashable): it is hashable
    names = set(settings_of(config))  # type: ignore[arg-type]
    unknown = sorted((set(path_fields) | set(store_fields) | set(source_fields)) - names)
    if kind in KINDS or unknown:
        raise ValueError(f"job kind {kind!r}: already registered, or unknown fields {unknown}")
    spec = JobKindSpec(kind, config, tuple(path_fields), publishes, tuple(store_fields),
                       tuple(source_fields), audit_action)  # fmt: skip
    KINDS[kind] = spec
    return spec


def register_runner(kind: str, runner: Callable[..., dict[str, Any]]) -> None:
    """Set the function that runs jobs of `kind` (the training worker's, called with its job context)."""
    job_kind(kind).runner = runner


def job_kind(kind: Any) -> JobKindSpec:
    """The registered kind; XrayfmError naming the kinds there are otherwise."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise XrayfmError(f"job kind {kind!r}: choose one of {sorted(KINDS)}")
    return KINDS[kind]


register_job_kind("pretrain", PretrainConfig, path_fields=(*TRAINING_PATHS, "pretrained"), publishes=True)
register_job_kind("adapt", AdaptConfig, path_fields=(*TRAINING_PATHS, "foundation"), publishes=True,
                  store_fields=("foundation",))  # fmt: skip
register_job_kind("evaluate", EvaluateConfig, path_fields=("root", "cache", "model"), publishes=False,
                  store_fields=("model",))  # fmt: skip
register_job_kind("tune", TuneConfig, path_fields=(*TRAINING_PATHS, "foundation"), publishes=True,
                  store_fields=("foundation",))  # fmt: skip
register_job_kind("calibrate", CalibrateConfig, path_fields=("model",), publishes=True,
                  store_fields=("model",), source_fields=("data", "eval_data"), audit_action="calibrate")  # fmt: skip

# Job kind -> the config class of its spec (a view of the registry).
CONFIGS: dict[str, type[JsonConfig]] = {kind: spec.config for kind, spec in KINDS.items()}


def _job_model(spec: JobKindSpec) -> type:
    """The pydantic model of one kind's job spec: ``{"kind": <kind>, "name": ..., "config": {...}}``."""
    kind_type: Any = Literal[spec.kind]  # built at run time: a type to pydantic, a value to mypy
    return create_model(
        f"{spec.config.__name__.removesuffix('Config')}Job",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"A {spec.kind} job: its config is {spec.config.__name__}'s settings.",
        kind=(kind_type, Field(description="the job kind")),
        name=(str | None, Field(None, description="the model name it publishes as (default: one per kind)")),
        config=(
            spec.config,
            Field(description=f"{spec.config.__name__}: {spec.config.__doc__ or ''}".strip()),
        ),
    )


# A job spec as submitted: a union of the kinds' job models, told apart by "kind" (the gateway's request
# body: its OpenAPI schema shows each kind's config with its types, choices, ranges and help).
JOB_MODELS = tuple(_job_model(spec) for spec in KINDS.values())
JobSpecBody: Any = Annotated[functools.reduce(operator.or_, JOB_MODELS), Field(discriminator="kind")]
JOB_SPEC: TypeAdapter[Any] = TypeAdapter(JobSpecBody)


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


def _default_name(kind: JobKindSpec, config: Any) -> str:
    """The model name a spec without one publishes as: for kinds named after their checkpoint (evaluate,
    calibrate), its store version's name, or the shipped model's when the kind publishes; else
    ``<kind>-model``."""
    field = kind.names_after_model
    model = str(config.get(field, "")) if field and isinstance(config, dict) else ""
    ref = store_ref(model)
    if ref is not None:
        return ref[0]
    if kind.publishes and is_registry_name(model):
        return model.rpartition("/")[2]
    return f"{kind.kind}-model"


def _confine_config(kind: JobKindSpec, config: JsonConfig, data_dirs: Sequence[Path]) -> dict[str, Any]:
    """The config's paths, resolved and checked (the job then opens exactly what was checked)."""
    resolved: dict[str, str | list[str]] = {}
    for field in kind.path_fields:
        value = getattr(config, field)
        if not value:
            continue
        if field in kind.store_fields and store_ref(str(value)) is not None:
            continue
        if field in kind.store_fields and is_registry_name(str(value)):
            pretrained_dir(str(value))  # a model shipped inside the package (xrayfm/<name>): it must exist
            continue
        resolved[field] = confine(field, str(value), data_dirs)
    for field in kind.source_fields:
        specs = getattr(config, field)
        if specs:
            resolved[field] = [_confine_source(f"{field}[{i}]", s, data_dirs) for i, s in enumerate(specs)]
    kwargs = getattr(config, "model_kwargs", None) or {}
    named_files = sorted(k for k in kwargs if any(part in str(k).lower() for part in FILE_ARGUMENT))
    if named_files:
        raise XrayfmError(
            f"model_kwargs may not set {named_files} in a job spec: weights come from the store"
        )
    return resolved


def parse_spec(spec: dict[str, Any]) -> Any:
    """A ``{"kind", "name", "config"}`` dict as its kind's job model (:data:`JobSpecBody`), its config
    validated field by field and as a whole; XrayfmError naming the settings at fault."""
    kind = job_kind(spec.get("kind"))
    try:
        job = JOB_SPEC.validate_python(spec)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        where = (kind.kind, "config")
        inside = [{**e, "loc": e["loc"][2:]} for e in errors if tuple(e["loc"][:2]) == where]
        if len(inside) < len(errors):  # not about a setting (the spec's own keys are checked before)
            said = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:3])
            raise XrayfmError(f"invalid {kind.kind} job spec: {said}") from None
        raise XrayfmError(explain(kind.config, inside, spec.get("config") or {})) from None
    job.config.validate()
    return job


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
    kind = job_kind(spec.get("kind"))
    config = spec.get("config")
    name = spec.get("name", _default_name(kind, config))
    version_dir(Path("."), name, "1")  # checks the model name (letters, digits, '.', '_', '-')
    if not isinstance(config, dict):
        raise XrayfmError("job spec 'config' must be a JSON object of training settings")
    reserved = [key for key in RESERVED if key in config]
    if reserved:
        raise XrayfmError(f"job spec config may not set {reserved}: the worker chooses the run folder")
    parsed = parse_spec({"kind": kind.kind, "name": name, "config": config}).config
    if getattr(parsed, "pretrained", None) == "timm":
        raise XrayfmError(
            "pretrained 'timm' would fetch timm's weights from the Hugging Face hub, and jobs download "
            "nothing: put the weights file under the data folders and name it"
        )
    if store is not None:
        for field in kind.store_fields:
            if getattr(parsed, field):
                resolve_store_ref(getattr(parsed, field), store)
    checked = parsed.to_dict()
    if data_dirs is not None:
        checked.update(_confine_config(kind, parsed, data_dirs))
    return JobSpec(kind=kind.kind, name=name, config=checked).model_dump()
