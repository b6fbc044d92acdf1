"""Training configurations: pydantic dataclasses that round-trip through JSON (a worker's job spec is JSON).

Every field is a ``pydantic.Field`` carrying its help text (``description``), when it is a number its
allowed range (``ge``/``gt`` and ``le``/``lt``), and when it takes one of a few values a ``Literal[...]``
type (for a list, each item must be one of them); single-field rules (a timm name, the shape of a pool, a
search space, sources) are field validators. The CLI builds its options from the fields
(:func:`settings_of`), pydantic checks every value (building a config, :meth:`JsonConfig.from_dict`, a job
spec's config), and :meth:`JsonConfig.validate` adds the rules that relate settings to each other. So the
library, the CLI, a JSON job spec and the gateway's OpenAPI schema always agree on names, defaults,
meaning and limits. No setting may hold NaN or an infinity, also inside lists and objects
(``model_kwargs``, ``pool``, ``space``). Every refusal is an :class:`~xrayfm.errors.XrayfmError` naming the
settings and what they allow.

They are pydantic *dataclasses*, so ``dataclasses.replace``/``asdict``/``fields`` keep working and every
instance, however built, holds valid values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from xrayfm.data import DATASET_KINDS, split_source
from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.registry import is_registry_name, list_pretrained

# The settings that take one of a few values, as types (the constants list their values).
Metric = Literal["mean_auroc", "val_loss"]
Loss = Literal["bce", "focal"]
Precision = Literal["auto", "fp32", "bf16"]
Method = Literal["lora", "full", "linear", "scratch"]  # one adaptation method (METHODS)
MethodChoice = Literal[Method, "auto"]  # what --method takes: auto chooses among lora, full and linear
Objective = Literal["supervised", "mae"]
Verify = Literal["stat", "size", "exists", "none"]
ResizeMode = Literal["pad", "crop", "stretch"]
SubsampleBy = Literal["study_id", "patient_id"]
Weights = Literal["best", "last"]
Pruner = Literal["median", "none"]
CalibrationMethod = Literal[
    "auto", "temperature", "platt", "isotonic"
]  # xrayfm.evaluate.calibration's + auto
DatasetKind = Literal[DATASET_KINDS]  # type: ignore[valid-type]
METRICS: tuple[str, ...] = typing.get_args(Metric)
LOSSES: tuple[str, ...] = typing.get_args(Loss)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
METHODS: tuple[str, ...] = typing.get_args(Method)
# Each method's peak learning rate at short budgets (fixed before any result was seen, never tuned on a
# reported split; docs/foundation.md): what ``--method auto`` gives each candidate, ``xrayfm experiment``'s
# default, and what scripts/transfer_experiment.py uses.
METHOD_LR: dict[str, float] = {"lora": 2e-3, "linear": 2e-3, "scratch": 5e-4, "full": 1e-4}
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
PRUNERS: tuple[str, ...] = typing.get_args(Pruner)
CALIBRATION_METHODS: tuple[str, ...] = typing.get_args(CalibrationMethod)
OPERATING_RULES = ("youden", "sensitivity>=S", "specificity>=T")  # as xrayfm.evaluate.metrics names them
BOUND_KEYS = ("ge", "gt", "le", "lt")  # as pydantic's Field names them
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
STEPS_MAX = 100_000_000  # optimizer steps: max_steps, save_every, log_every
BATCH_MAX = 65_536
WORKERS_MAX = 256
BOOTSTRAP_MAX = 100_000
# A timm architecture name, optionally with a pretrained tag (vit_base_patch16_224.augreg_in21k): never a
# hub reference (hf-hub:org/name, timm/name), which timm would download.
TIMM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
PROBLEM = "config_problem"  # the error type of this module's validators: their message names the setting

# Numbers, strings and flags are strict types (a JSON "224" is not a number, 1 is not true); objects are
# searched for NaN and infinities by JsonConfig's validator.
JsonObject = dict[str, Any]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text and range (mutable defaults are copied per instance)."""
    if isinstance(default, list | dict):
        return Field(default_factory=lambda d=default: type(d)(d), description=help, **kw)
    return Field(default, description=help, **kw)


def problem(text: str) -> PydanticCustomError:
    """A validator's refusal, worded for people (it names the setting and what it allows)."""
    return PydanticCustomError(PROBLEM, "{problem}", {"problem": text})


# -- what a config's fields are, for the CLI, errors and search spaces ----------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of a config: plain type (int, float, str, bool, list[...], dict[...]), default, help,
    choices (of the value, or of each item of a list) and range."""

    name: str
    type: Any
    annotation: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    bounds: dict[str, float]

    @property
    def optional(self) -> bool:
        """Whether the setting may be left unset (None)."""
        return self.default is None


def _strip(hint: Any) -> Any:
    """`hint` without ``None``, ``Annotated`` and ``Literal`` (a Literal's type is its values' type)."""
    if typing.get_origin(hint) is Annotated:
        return _strip(typing.get_args(hint)[0])
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [_strip(a) for a in typing.get_args(hint) if a is not type(None)]
        return members[0] if len(members) == 1 else hint
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return list[_strip(item)]
    return hint


def _choices(hint: Any) -> tuple[Any, ...] | None:
    """The values a Literal allows, found through Optional, Annotated and list; None when any goes."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint) if typing.get_origin(hint) is not dict else ():
        if arg is not type(None) and (found := _choices(arg)) is not None:
            return found
    return None


def _type_name(hint: Any) -> str:
    """'int', 'str | None', 'list[str]': an annotation as a person writes it."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "None"
    if origin is Annotated:
        return _type_name(typing.get_args(hint)[0])
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return type(typing.get_args(hint)[0]).__name__
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(hint))}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


@functools.cache
def settings_of(cls: type) -> dict[str, Setting]:
    """Every field of a config class as a :class:`Setting`, in declaration order."""
    out = {}
    for name, info in cls.__pydantic_fields__.items():
        hint = info.annotation
        default = info.default_factory() if info.default_factory is not None else info.default
        bounds = {k: getattr(m, k) for m in info.metadata for k in BOUND_KEYS if hasattr(m, k)}
        out[name] = Setting(name, _strip(hint), hint, default, info.description or "", _choices(hint), bounds)
    return out


def field_type(cls: type, name: str) -> Any:
    """The plain type of a config field, without ``None`` (for CLI parsing)."""
    return settings_of(cls)[name].type


def bounds_text(setting: Setting) -> str | None:
    """A setting's allowed range in interval notation (``[1, 10000]``, ``(0, 10]``); None when it has none."""
    b = setting.bounds
    if not b:
        return None
    low = f"[{b['ge']}" if "ge" in b else f"({b.get('gt', '-inf')}"
    high = f"{b['le']}]" if "le" in b else f"{b.get('lt', 'inf')})"
    return f"{low}, {high}"


def choices_text(setting: Setting) -> str | None:
    """A setting's allowed values as an error names them (``pad, crop, stretch``); None when any goes."""
    return None if setting.choices is None else ", ".join(str(c) for c in setting.choices)


def _in_bounds(value: float, bounds: typing.Mapping[str, float]) -> bool:
    """Whether a number is finite and within ``ge``/``gt``/``le``/``lt`` limits."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    checks = {"ge": value.__ge__, "gt": value.__gt__, "le": value.__le__, "lt": value.__lt__}
    return all(checks[key](limit) for key, limit in bounds.items())


def _finite(value: Any) -> bool:
    """Whether a JSON-like value holds no NaN or infinity, lists and objects searched through (iteratively:
    nesting cannot overflow the stack)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return True


def _shown(value: Any) -> str:
    """A number as an error names it; a long integer by its number of digits only (never echoed in full)."""
    if isinstance(value, int) and abs(value) >= 10**15:
        return f"<a {int(math.log10(abs(value))) + 1}-digit number>"
    return str(value)


# -- pydantic's errors in this module's words -----------------------------------------------------------------
TYPE_ERRORS = ("unexpected_keyword_argument", "extra_forbidden", "missing")


def explain(cls: type, errors: list[dict[str, Any]], data: typing.Mapping[str, Any]) -> str:
    """pydantic's validation errors of a `cls` config as one message naming each setting and what it
    allows (`data`: the settings given, to name a wrong-typed value's type); error locations are relative
    to the config."""
    settings = settings_of(cls)
    unknown, mistyped, problems = [], {}, {}  # problems by setting, in order
    off_choices: dict[str, list[Any]] = {}
    for error in errors:
        loc = error.get("loc") or ("",)
        name, kind = str(loc[0]), error["type"]
        setting = settings.get(name)
        if kind in TYPE_ERRORS[:2] or setting is None:
            unknown.append(name)
        elif kind == PROBLEM:
            problems.setdefault(name, str(error["ctx"]["problem"]))
        elif kind == "literal_error":
            off_choices.setdefault(name, []).append(error.get("input"))
            allowed = choices_text(setting)
            shown = ", ".join(repr(item)[:80] for item in off_choices[name][:5])
            shown += ", ..." if len(off_choices[name]) > 5 else ""
            problems[name] = f"{name} {shown} (choose one of {allowed})"
        elif (kind.startswith(("greater_than", "less_than")) or kind == "finite_number") and len(loc) == 1:
            limits = bounds_text(setting)
            if limits is None:
                problems[name] = f"{name}: only finite numbers are allowed (no nan or infinity)"
            else:
                problems[name] = f"{name}={_shown(error.get('input'))} (must lie in {limits})"
        else:
            given = type(data.get(name, error.get("input"))).__name__
            mistyped[name] = f"{name} ({given}, expected {_type_name(setting.annotation)})"
    if unknown:
        return f"unknown {cls.__name__} settings: {list_offenders(sorted(set(unknown)))}"
    if mistyped:
        return f"wrong type of {cls.__name__} settings: {list_offenders(mistyped.values())}"
    return f"invalid {cls.__name__}: " + "; ".join(problems.values())


def config_class(cls: type) -> type:
    """Make `cls` a config: a pydantic dataclass (unknown settings refused, no NaN or infinity) whose
    constructor raises :class:`XrayfmError` naming the settings at fault."""
    cls = dataclass(cls, config=ConfigDict(extra="forbid", allow_inf_nan=False))
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise XrayfmError(explain(cls, exc.errors(include_url=False), kwargs)) from None

    cls.__init__ = __init__
    return cls


@config_class
class JsonConfig:
    """Round-trips a config through JSON; unknown keys and impossible values are errors."""

    # -- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of the config; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict (e.g. a JSON job spec) and :meth:`validate` it; unknown keys are an error, not
        silently ignored."""
        if not isinstance(data, dict):
            raise XrayfmError(f"{cls.__name__} settings must be a JSON object")
        try:
            config = cls.__pydantic_validator__.validate_python(data)
        except ValidationError as exc:
            raise XrayfmError(explain(cls, exc.errors(include_url=False), data)) from None
        config.validate()
        return config

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Self:
        """Build from a JSON file path or JSON text."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise XrayfmError(f"config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise XrayfmError("config JSON must be an object")
        return cls.from_dict(data)

    @model_validator(mode="before")
    @classmethod
    def _known_and_not_empty(cls, data: Any) -> Any:
        """Unknown settings are refused by name; so is an optional setting given as "" in a dict (JSON):
        that is a mistake, not "unset" (an empty path means the working folder)."""
        given = data.kwargs or {} if isinstance(data, ArgsKwargs) else data
        if not isinstance(given, dict):
            return data
        unknown = sorted(str(key) for key in set(given) - set(cls.__pydantic_fields__))
        if unknown:
            raise XrayfmError(f"unknown {cls.__name__} settings: {list_offenders(unknown)}")
        settings = settings_of(cls)
        empty = sorted(k for k, v in given.items() if v == "" and settings[k].optional)
        if empty and not isinstance(data, ArgsKwargs):
            raise XrayfmError(
                f"empty {cls.__name__} settings: {list_offenders(empty)} (leave them out instead)"
            )
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _only_finite(cls, value: Any, info: ValidationInfo) -> Any:
        """No NaN or infinity inside a list or object either (numbers themselves: ``allow_inf_nan``)."""
        if isinstance(value, dict | list) and not _finite(value):
            raise problem(f"{info.field_name}: only finite numbers are allowed (no nan or infinity)")
        return value

    def validate(self) -> None:
        """Raise XrayfmError when a setting holds what its field does not allow (e.g. after an assignment);
        subclasses call this first, then check how their settings relate to each other."""
        type(self).from_values(dataclasses.asdict(self))

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Self:
        """Build from values already in Python form, checking each field only (not :meth:`validate`)."""
        try:
            return cls.__pydantic_validator__.validate_python(ArgsKwargs((), values))
        except ValidationError as exc:
            raise XrayfmError(explain(cls, exc.errors(include_url=False), values)) from None

    def _raise(self, problems: list[str]) -> None:
        if problems:
            raise XrayfmError(f"invalid {type(self).__name__}: " + "; ".join(problems))


@config_class
class TrainConfig(JsonConfig):
    """Settings shared by pre-training and adaptation: data, model, optimisation, system."""

    # One training run (not a dataclass field): --folds then needs --fold. CVConfig runs every fold.
    one_run: typing.ClassVar[bool] = True

    out: StrictStr = _f(
        "runs/run", "run folder: best/, last/, log.csv, metrics.csv, tensorboard/, summary.json"
    )
    # -- data
    kind: DatasetKind | None = _f(None, "dataset layout; omit to train from a prepared --cache")
    root: StrictStr | None = _f(None, "dataset root (or label CSV for chexpert/csv)")
    split: StrictStr = _f("train", "training split of the dataset")
    val_split: StrictStr | None = _f(
        None, "separate validation split (e.g. valid); default: a patient-level split of the training data"
    )
    cache: StrictStr | None = _f(
        None,
        "training cache folder: used as is, or prepared there from --kind/--root (default OUT/cache/SPLIT)",
    )
    val_cache: StrictStr | None = _f(None, "validation cache folder (same rules as --cache)")
    size: StrictInt | None = _f(224, "image side in pixels of the cache and the model input", ge=16, le=4096)
    resize_mode: ResizeMode = _f("pad", "how images are fitted to a square when caching")
    policy: StrictStr | None = _f(
        None, "uncertainty/blank policy, e.g. u-ones or 'u-zeros;Edema=u-ones;blank=mask'"
    )
    labels: list[StrictStr] | None = _f(
        None, "train on these labels only (comma-separated, matched ignoring case); default all"
    )
    body_parts: list[StrictStr] | None = _f(
        None, "mura: keep these body parts (comma-separated, e.g. XR_HUMERUS)"
    )
    frontal_only: StrictBool = _f(False, "chexpert: frontal views only")
    val_fraction: StrictFloat = _f(
        0.1, "share of patients held out for validation when there is no validation split", ge=0, lt=1
    )
    split_seed: StrictInt = _f(
        0, "seed of that patient-level validation split (kept apart from --seed)", ge=0, le=SEED_MAX
    )
    folds: StrictInt | None = _f(
        None,
        "validate on one fold of a K-fold split of the training data grouped by patient (stratified by the "
        "label when there is one binary label), seeded by --split-seed; needs --fold",
        ge=2,
        le=100,
    )
    fold: StrictInt | None = _f(
        None, "the validation fold (0 to folds-1); the other folds train", ge=0, le=99
    )
    verify: Verify = _f("stat", "cache staleness check")
    # -- model
    model: StrictStr = _f(
        "vit_base_patch16_224",
        "timm architecture name (no hub reference): a ViT (vit_*) or a CNN (convnext_*, resnet*, densenet*; "
        "explained with Grad-CAM)",
    )
    model_kwargs: JsonObject = _f({}, "extra timm model arguments as JSON, e.g. '{\"depth\": 4}'")
    drop_path_rate: StrictFloat = _f(0.1, "stochastic depth rate", ge=0, lt=1)
    channels: StrictInt = _f(3, "input channels (the grey image is repeated)", ge=1, le=16)
    # -- optimisation
    epochs: StrictInt = _f(10, "number of epochs", ge=1, le=10_000)
    max_steps: StrictInt | None = _f(
        None, "stop after this many optimizer steps in total (a budget)", ge=1, le=STEPS_MAX
    )
    batch_size: StrictInt = _f(
        32, "images per process and step (global batch = this x processes)", ge=1, le=BATCH_MAX
    )
    lr: StrictFloat = _f(3e-4, "peak learning rate (AdamW)", gt=0, le=10)
    min_lr_ratio: StrictFloat = _f(
        0.01, "final learning rate as a fraction of the peak (cosine decay)", ge=0, le=1
    )
    weight_decay: StrictFloat = _f(
        0.05, "AdamW weight decay (not applied to biases, norms, embeddings)", ge=0, le=10
    )
    warmup_fraction: StrictFloat = _f(0.05, "share of the total steps spent in linear warm-up", ge=0, lt=1)
    grad_clip: StrictFloat | None = _f(
        1.0, "clip the gradient norm to this (0: no clipping)", ge=0, le=10_000
    )
    loss: Loss = _f("bce", "bce (with per-label pos_weight) or focal")
    focal_gamma: StrictFloat = _f(2.0, "focal loss gamma", ge=0, le=10)
    pos_weight: StrictBool = _f(
        True, "weight positives by negatives/positives per label (from training labels)"
    )
    augment: StrictBool = _f(True, "mild radiograph augmentation (crop, rotation, brightness/contrast)")
    hflip: StrictBool = _f(False, "also flip left-right (off by default: sides matter on radiographs)")
    # -- validation, checkpoints
    metric: Metric = _f("mean_auroc", "validation metric that picks the best checkpoint")
    early_stopping: StrictInt | None = _f(
        None, "stop after this many epochs without improvement of --metric", ge=1, le=10_000
    )
    save_every: StrictInt = _f(
        0, "also save the resumable training state every N steps (0: at epoch ends only)", ge=0, le=STEPS_MAX
    )
    resume: StrictBool = _f(False, "continue from OUT/last/ (exactly where the last saved state left off)")
    eval_batch_size: StrictInt | None = _f(
        None, "validation batch size (default: 2 x batch size)", ge=1, le=BATCH_MAX
    )
    # -- system
    seed: StrictInt = _f(
        0, "seed of the model init, data order, augmentation and the validation split", ge=0, le=SEED_MAX
    )
    device: StrictStr = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: Precision = _f("auto", "auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: StrictBool = _f(False, "torch.compile the model")
    num_workers: StrictInt = _f(0, "DataLoader worker processes", ge=0, le=WORKERS_MAX)
    log_every: StrictInt = _f(10, "write a log row every N steps", ge=1, le=STEPS_MAX)
    tensorboard: StrictBool = _f(True, "write TensorBoard events under OUT/tensorboard")
    progress_bar: StrictBool = _f(True, "show tqdm progress bars")

    @field_validator("model")
    @classmethod
    def _timm_name(cls, model: str) -> str:
        if not TIMM_NAME.fullmatch(model):
            raise problem(
                f"model {model[:80]!r} (a timm architecture name: letters, digits, '_', '.', '-'; "
                "no hub reference such as hf-hub:ORG/NAME)"
            )
        return model

    def validate(self) -> None:
        """Raise XrayfmError for settings that cannot work (before any data is read)."""
        super().validate()
        problems = []
        if self.kind is None and self.cache is None and not getattr(self, "pool", None):
            problems.append("no data: give --kind and --root, or a prepared --cache")
        if self.kind is not None and self.root is None:
            problems.append(f"--kind {self.kind} needs --root")
        problems += self._fold_problems()
        self._raise(problems)

    def _fold_problems(self) -> list[str]:
        if self.folds is None and self.fold is None:
            return []
        if self.folds is None:
            return [f"folds={self.folds} (k-fold validation needs --folds >= 2)"]
        problems = []
        if self.fold is not None and not 0 <= self.fold < self.folds:
            problems.append(f"fold={self.fold} (must be in 0..{self.folds - 1})")
        if self.fold is None and self.one_run:
            problems.append("--folds needs --fold (the validation fold); `xrayfm cv` runs every fold")
        if self.val_split is not None or self.val_cache is not None:
            problems.append("--folds validates on held-out folds of --split: drop --val-split/--val-cache")
        return problems


@config_class
class PretrainConfig(TrainConfig):
    """Pre-training a foundation model on multi-label chest radiographs."""

    pretrained: StrictStr | None = _f(
        None, "initial weights: a local .safetensors/.pth file, or 'timm' for timm's own (no download here)"
    )
    objective: Objective = _f(
        "supervised",
        "supervised (multi-label BCE/focal on the labels) or mae (masked autoencoder on unlabelled images: "
        "labels ignored, best/ = the encoder with the lowest validation reconstruction loss)",
    )
    pool: JsonObject = _f(
        {},
        'mae: unlabelled corpus as JSON {"sources": [{"kind", "root", "split"} or {"cache"}, ...], '
        '"exclude": [{"kind", "root", "split"}, ...]}; patients of excluded splits never enter; a source\'s '
        '"weight" (all or none) is its share of the training draws, e.g. to keep one large source from '
        "dominating (default: the one --kind/--root/--split or --cache; each image drawn once an epoch)",
    )
    mask_ratio: StrictFloat = _f(0.75, "mae: share of the patches hidden from the encoder", gt=0, lt=1)
    decoder_dim: StrictInt = _f(128, "mae: width of the (discarded) decoder", ge=1, le=8192)
    decoder_depth: StrictInt = _f(2, "mae: transformer blocks of the decoder", ge=1, le=64)
    decoder_heads: StrictInt = _f(4, "mae: attention heads of the decoder", ge=1, le=64)
    norm_pix_loss: StrictBool = _f(True, "mae: normalise each target patch to mean 0, variance 1")

    @field_validator("pool")
    @classmethod
    def _pool_shape(cls, pool: dict[str, Any]) -> dict[str, Any]:
        problems = _pool_problems(pool)
        if problems:
            raise problem("; ".join(problems))
        return pool

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.size is None:
            problems.append("size: an image side in pixels is needed")
        if self.objective == "mae":
            if self.folds is not None or self.fold is not None:
                problems.append("mae validates on a patient-level split of its pool: drop --folds/--fold")
            if self.val_split is not None or self.val_cache is not None:
                problems.append(
                    "mae validates on a patient-level split of its pool: drop --val-split/--val-cache"
                )
            if self.pool and (self.kind is not None or self.cache is not None):
                problems.append("give either a --pool or one dataset (--kind/--root or --cache), not both")
        elif self.pool:
            problems.append("--pool is for --objective mae (supervised training needs labels)")
        self._raise(problems)


@config_class
class AdaptConfig(TrainConfig):
    """Adapting a foundation checkpoint to a new task (LoRA, full fine-tuning, linear probe or scratch)."""

    foundation: StrictStr | None = _f(None, "foundation checkpoint folder (e.g. a pre-training run's best/)")
    method: MethodChoice = _f(
        "lora",
        "lora, full (all weights), linear (head only, frozen backbone), scratch, or auto: train lora, full "
        "and linear at the same budget, each at its own learning rate (--lr is not used), on a patient "
        "split of the training data (--val-fraction, --split-seed), then retrain the best as the run (lora "
        "when that split cannot tell the best one's lead over it from noise)",
    )
    lora_rank: StrictInt = _f(8, "LoRA rank", ge=1, le=1024)
    lora_alpha: StrictInt = _f(16, "LoRA alpha (scale = alpha / rank)", ge=1, le=4096)
    lora_dropout: StrictFloat = _f(0.1, "dropout on the LoRA branch", ge=0, lt=1)
    lora_targets: list[StrictStr] = _f(
        ["qkv"],
        "layers that get LoRA (comma-separated): ViT qkv, proj, fc1, fc2; ConvNeXt fc1, fc2; ResNet conv1, "
        "conv2, conv3; DenseNet conv1, conv2. The default qkv means each CNN family's default "
        "(ConvNeXt fc1,fc2; ResNet/DenseNet all block convs)",
    )
    label_fraction: StrictFloat | None = _f(
        None, "keep this share of training studies (seeded), e.g. 0.1", gt=0, le=1
    )
    max_studies: StrictInt | None = _f(
        None, "keep at most this many training studies (seeded)", ge=1, le=100_000_000
    )
    subsample_by: SubsampleBy = _f("study_id", "group that label subsampling keeps whole")
    merge: StrictBool = _f(False, "lora: also save a merged full model under OUT/merged/")
    report_on: Weights = _f("best", "weights the final report evaluates: best (by --metric) or last")
    n_bootstrap: StrictInt = _f(
        1000, "bootstrap resamples for the confidence intervals of the final report", ge=0, le=BOOTSTRAP_MAX
    )
    # Different defaults for adaptation: size/model come from the foundation, shorter schedule.
    size: StrictInt | None = _f(None, "image side (default: the foundation's)", ge=16, le=4096)
    epochs: StrictInt = _f(5, "number of epochs", ge=1, le=10_000)
    lr: StrictFloat | None = _f(
        None,
        "peak learning rate (AdamW); default: the method's own ("
        + ", ".join(f"{method} {lr:g}" for method, lr in METHOD_LR.items())
        + ")",
        gt=0,
        le=10,
    )
    drop_path_rate: StrictFloat = _f(0.0, "stochastic depth rate", ge=0, lt=1)

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.foundation is None:
            problems.append(
                "--foundation checkpoint is required (also for scratch: it fixes the architecture)"
            )
        elif is_registry_name(self.foundation) and self.foundation not in list_pretrained():
            problems.append(
                f"foundation {self.foundation!r} is not a shipped model (have: {', '.join(list_pretrained())})"
            )
        if self.method == "auto" and (self.folds is not None or self.fold is not None):
            problems.append(
                "--method auto chooses on a patient split of the training data: drop --folds/--fold"
            )
        if self.method == "auto" and self.val_fraction <= 0:
            problems.append("--method auto needs --val-fraction > 0 (the share of patients it chooses on)")
        self._raise(problems)

    def adapt_config(self) -> AdaptConfig:
        """The plain :class:`AdaptConfig` of these settings (drops the fields of subclasses)."""
        names = {f.name for f in dataclasses.fields(AdaptConfig)}
        return AdaptConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@config_class
class CVConfig(AdaptConfig):
    """k-fold cross-validation of an adaptation (``xrayfm cv``): one adapt run per patient-grouped fold.

    Each fold trains on the other K-1 folds of ``split`` and is validated and reported on its own held-out
    fold; the out-of-fold predictions of all folds are pooled.
    """

    one_run: typing.ClassVar[bool] = False
    folds: StrictInt | None = _f(
        5, "number of folds (K >= 2), grouped by patient, seeded by --split-seed", ge=2, le=100
    )
    report_on: Weights = _f(
        "last",
        "weights each fold reports: last (default: no checkpoint picked on the held-out fold) or best",
    )

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.folds is None:
            problems.append("folds: give the number of folds (>= 2)")
        if self.fold is not None:
            problems.append("fold: cv runs every fold; leave --fold unset")
        self._raise(problems)


# Settings a tuning search space may vary, and the kind of value each takes.
TUNABLE: dict[str, type] = {
    "lr": float,
    "weight_decay": float,
    "lora_rank": int,
    "lora_alpha": int,
    "lora_dropout": float,
    "lora_targets": list,
    "epochs": int,
    "batch_size": int,
    "warmup_fraction": float,
    "drop_path_rate": float,
    "focal_gamma": float,
    "loss": str,
    "method": str,
}


@config_class
class TuneConfig(AdaptConfig):
    """Hyper-parameter search over adaptation settings with Optuna (``xrayfm tune``).

    Every trial is one adapt run under ``OUT/trials/trial-NNNN``, validated on a patient-level split of
    ``split`` (``val_fraction``, ``split_seed``): never on a separate (reported) split.
    """

    method: Method = _f(
        "lora",
        "the method whose settings are searched: lora, full, linear or scratch (not auto, which runs three "
        "adaptations per trial: tune each method, or adapt with --method auto)",
    )
    trials: StrictInt = _f(
        20, "number of finished trials (complete or pruned) the study should hold", ge=1, le=10_000
    )
    space: JsonObject = _f(
        {},
        'search space as JSON: {NAME: {"low": L, "high": H, "log": true} or [choice, ...]} over '
        f"{', '.join(TUNABLE)}; lora_targets choices are lists or 'qkv,proj' strings "
        "(default: lr, weight_decay and, for lora, lora_rank/alpha/dropout/targets)",
    )
    tune_seed: StrictInt = _f(
        0, "seed of Optuna's TPE sampler (trials themselves use --seed)", ge=0, le=SEED_MAX
    )
    pruner: Pruner = _f(
        "median",
        "median (stop a trial whose epoch metric is below the median of earlier trials) or none",
    )
    prune_startup_trials: StrictInt = _f(
        2, "trials that always run to the end before pruning starts", ge=0, le=10_000
    )
    prune_warmup_epochs: StrictInt = _f(0, "epochs of each trial that are never pruned", ge=0, le=10_000)

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.val_split is not None or self.val_cache is not None:
            problems.append(
                "tune validates on a patient-level split of --split (--val-fraction, --split-seed), never "
                "on a separate split that may be the one you report: drop --val-split/--val-cache"
            )
        if self.folds is not None or self.fold is not None:
            problems.append("tune does not run folds: drop --folds/--fold")
        self._raise(problems)

    @field_validator("space")
    @classmethod
    def _space_values(cls, space: dict[str, Any]) -> dict[str, Any]:
        """Only tunable settings, and values of the search space within what their setting allows: numbers
        (a range's low/high, numeric choices) within its range, choices among its own."""
        unknown = sorted(set(space) - set(TUNABLE))
        if unknown:
            raise problem(f"space: cannot tune {list_offenders(unknown)} (tunable: {', '.join(TUNABLE)})")
        problems = []
        for name, spec in space.items():
            setting = settings_of(cls)[name]
            limits, allowed = bounds_text(setting), choices_text(setting)
            values = [spec.get("low"), spec.get("high")] if isinstance(spec, dict) else spec
            values = values if isinstance(values, list) else []
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if limits and not all(_in_bounds(v, setting.bounds) for v in numbers):
                problems.append(f"space: {name} must lie in {limits}")
            if allowed and any(v not in setting.choices for v in values if v is not None):
                problems.append(f"space: {name} choices must be among {allowed}")
        if problems:
            raise problem("; ".join(problems))
        return space


@config_class
class EvaluateConfig(JsonConfig):
    """Evaluating a checkpoint on a dataset split (``xrayfm evaluate``; an ``evaluate`` job of the stack)."""

    model: StrictStr = _f("", "checkpoint folder (full or adapted), or store:<name>/<version> in the stack")
    kind: DatasetKind | None = _f(None, "dataset layout (or give a --cache instead)")
    root: StrictStr | None = _f(None, "dataset root (or label CSV for chexpert/csv)")
    split: StrictStr = _f("valid", "split to evaluate")
    cache: StrictStr | None = _f(None, "a prepared cache folder instead of kind/root")
    body_parts: list[StrictStr] | None = _f(None, "mura: keep these body parts")
    frontal_only: StrictBool = _f(False, "chexpert: frontal views only")
    policy: StrictStr | None = _f(None, "uncertainty policy (default: the checkpoint's)")
    batch_size: StrictInt = _f(64, "images per batch", ge=1, le=BATCH_MAX)
    n_bootstrap: StrictInt = _f(
        1000, "bootstrap resamples for the confidence intervals", ge=0, le=BOOTSTRAP_MAX
    )
    seed: StrictInt = _f(0, "seed of the bootstrap", ge=0, le=SEED_MAX)
    device: StrictStr = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    verify: Verify = _f("stat", "cache staleness check")
    num_workers: StrictInt = _f(0, "DataLoader worker processes", ge=0, le=WORKERS_MAX)
    progress_bar: StrictBool = _f(True, "show tqdm progress bars")

    def validate(self) -> None:
        super().validate()
        problems = []
        if not self.model:
            problems.append("model: the checkpoint to evaluate is required")
        if self.kind is None and self.cache is None:
            problems.append("no data: give kind and root, or a prepared cache")
        if self.kind is not None and self.root is None:
            problems.append(f"kind {self.kind} needs root")
        self._raise(problems)


def parse_operating_rule(rule: str) -> tuple[str, float | None]:
    """``youden`` -> ("youden", None); ``sensitivity>=0.95`` -> ("sensitivity", 0.95); the same for
    specificity. XrayfmError for anything else (a level must lie in (0, 1])."""
    if rule == "youden":
        return "youden", None
    name, sep, level = rule.partition(">=")
    try:
        value = float(level)
    except ValueError:
        value = math.nan
    if not sep or name not in ("sensitivity", "specificity") or not 0.0 < value <= 1.0:
        raise XrayfmError(f"rule {rule!r}: use youden, sensitivity>=S or specificity>=T with S, T in (0, 1]")
    return name, value


@config_class
class CalibrateConfig(JsonConfig):
    """Calibrating a binary model to a site (``xrayfm calibrate``; a ``calibrate`` job of the stack)."""

    model: StrictStr = _f("", "checkpoint folder, shipped model name (xrayfm/...), or store:<name>/<version>")
    data: list[StrictStr] = _f(
        [], "the site's labelled images, each KIND:ROOT[:SPLIT] (e.g. folder:/data/site)"
    )
    eval_data: list[StrictStr] | None = _f(
        None, "separate evaluation sets (KIND:ROOT[:SPLIT]); default: eval_fraction of data's patients"
    )
    eval_fraction: StrictFloat = _f(
        0.3, "share of the site's patients kept out of the fit, for evaluation", gt=0, lt=1
    )
    label: StrictStr | None = _f(
        None, "the dataset class that is the model's positive label (default: the model's label name)"
    )
    method: CalibrationMethod = _f("auto", "calibration map")
    rule: StrictStr = _f("youden", "operating point: youden, sensitivity>=S or specificity>=T")
    seed: StrictInt = _f(
        0, "seed of the patient split, the method's cross-validation and the bootstraps", ge=0, le=SEED_MAX
    )
    n_bootstrap: StrictInt = _f(
        1000, "bootstrap resamples for the confidence intervals", ge=0, le=BOOTSTRAP_MAX
    )
    batch_size: StrictInt = _f(64, "images per forward pass", ge=1, le=BATCH_MAX)
    device: StrictStr = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    out: StrictStr | None = _f(None, "folder of the calibrated checkpoint (a job's worker sets it)")
    progress_bar: StrictBool = _f(True, "show tqdm progress bars")

    @field_validator("data", "eval_data")
    @classmethod
    def _sources(cls, specs: list[str] | None, info: ValidationInfo) -> list[str] | None:
        problems = []
        for i, spec in enumerate(specs or []):
            try:
                split_source(spec)
            except XrayfmError as exc:
                problems.append(f"{info.field_name}[{i}] {exc}")
        if problems:
            raise problem("; ".join(problems))
        return specs

    @field_validator("rule")
    @classmethod
    def _rule(cls, rule: str) -> str:
        try:
            parse_operating_rule(rule)
        except XrayfmError as exc:
            raise problem(str(exc)) from None
        return rule

    @field_validator("label")
    @classmethod
    def _label(cls, label: str | None) -> str | None:
        if label is not None and not label.strip():
            raise problem("label: must name a class (or be left out)")
        return label

    def validate(self) -> None:
        super().validate()
        problems = []
        if not self.model:
            problems.append("model: the checkpoint to calibrate is required")
        if not self.data:
            problems.append("data: at least one KIND:ROOT[:SPLIT] of labelled site images is required")
        if self.eval_data is not None and not self.eval_data:
            problems.append("eval_data: give at least one set, or leave it out")
        self._raise(problems)


POOL_KEYS = {"sources", "exclude"}


def _pool_problems(pool: dict[str, Any]) -> list[str]:
    """What is wrong with the structure of a ``pool`` setting (sources are read when training starts)."""
    if not pool:
        return []
    problems = [f"pool: unknown keys {sorted(set(pool) - POOL_KEYS)}"] if set(pool) - POOL_KEYS else []
    sources = pool.get("sources")
    if not isinstance(sources, list) or not sources:
        problems.append('pool: "sources" must be a non-empty list')
        sources = []
    exclude = pool.get("exclude", [])
    if not isinstance(exclude, list):
        problems.append('pool: "exclude" must be a list')
        exclude = []
    for what, items in (("source", sources), ("exclude", exclude)):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                problems.append(f"pool {what} {i}: not an object")
            elif what == "source" and not (item.get("cache") or (item.get("kind") and item.get("root"))):
                problems.append(f"pool source {i}: needs kind and root, or a cache")
            elif what == "exclude" and not (item.get("kind") and item.get("root")):
                problems.append(f"pool exclude {i}: needs kind and root (and a split)")
    weights = [item.get("weight") for item in sources if isinstance(item, dict)]
    for i, w in enumerate(weights):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < math.inf):
            problems.append(f"pool source {i}: weight {w!r} must be a positive number")
    if any(w is not None for w in weights) and any(w is None for w in weights):
        problems.append("pool: give every source a weight, or none (each image then counts once)")
    return problems


__all__ = [
    "AdaptConfig",
    "CALIBRATION_METHODS",
    "CVConfig",
    "CalibrateConfig",
    "EvaluateConfig",
    "JsonConfig",
    "LOSSES",
    "METHODS",
    "METHOD_LR",
    "METRICS",
    "OBJECTIVES",
    "OPERATING_RULES",
    "PRUNERS",
    "PretrainConfig",
    "TUNABLE",
    "TrainConfig",
    "TuneConfig",
    "Setting",
    "bounds_text",
    "choices_text",
    "config_class",
    "explain",
    "field_type",
    "parse_operating_rule",
    "settings_of",
    "split_source",
]
