"""Training configurations: plain dataclasses that round-trip through JSON (a worker's job spec is JSON).

Every field carries its help text in ``metadata["help"]``; when it is a number, its allowed range in
``metadata`` as ``ge``/``gt`` and ``le``/``lt`` (as pydantic's ``Field`` names them); and when it takes one
of a few values, those in ``metadata["choices"]`` (for a list, each item must be one of them). The CLI
builds its options from them and :meth:`JsonConfig.validate` checks them, so the library, the CLI and a
JSON job spec always agree on names, defaults, meaning and limits. No setting may hold NaN or an infinity,
also inside lists and objects (``model_kwargs``, ``pool``, ``space``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from xrayfm.data import DATASET_KINDS, split_source
from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.registry import is_registry_name, list_pretrained

METRICS = ("mean_auroc", "val_loss")
LOSSES = ("bce", "focal")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("lora", "full", "linear", "scratch")
OBJECTIVES = ("supervised", "mae")
BOUNDS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}  # metadata keys
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
STEPS_MAX = 100_000_000  # optimizer steps: max_steps, save_every, log_every
BATCH_MAX = 65_536
WORKERS_MAX = 256
BOOTSTRAP_MAX = 100_000
# A timm architecture name, optionally with a pretrained tag (vit_base_patch16_224.augreg_in21k): never a
# hub reference (hf-hub:org/name, timm/name), which timm would download.
TIMM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def bounds_text(f: dataclasses.Field) -> str | None:
    """A field's allowed range in interval notation (``[1, 10000]``, ``(0, 10]``); None when it has none."""
    meta = f.metadata
    if not any(key in meta for key in BOUNDS):
        return None
    low = f"[{meta['ge']}" if "ge" in meta else f"({meta.get('gt', '-inf')}"
    high = f"{meta['le']}]" if "le" in meta else f"{meta.get('lt', 'inf')})"
    return f"{low}, {high}"


def choices_text(f: dataclasses.Field) -> str | None:
    """A field's allowed values as an error names them (``pad, crop, stretch``); None when any value goes."""
    choices = f.metadata.get("choices")
    return None if choices is None else ", ".join(str(c) for c in choices)


def _off_choices(value: Any, choices: typing.Collection[Any]) -> list[Any]:
    """The values of a setting (itself, or each item of a list) that are not among its choices; None (an
    unset optional setting) is never one of them."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [item for item in items if item not in choices]


def _in_bounds(value: float, meta: typing.Mapping[str, Any]) -> bool:
    """Whether a number is finite and within the ``ge``/``gt``/``le``/``lt`` limits of a field's metadata."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return all(compare(value, meta[key]) for key, compare in BOUNDS.items() if key in meta)


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


def _shown(value: float) -> str:
    """A number as an error names it; a long integer by its number of digits only (never echoed in full)."""
    if isinstance(value, int) and abs(value) >= 10**15:
        return f"<a {int(math.log10(abs(value))) + 1}-digit number>"
    return str(value)


class JsonConfig:
    """Round-trips a config dataclass through JSON; unknown keys and impossible values are errors."""

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
        """Build from a dict (e.g. a JSON job spec); unknown keys are an error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise XrayfmError(f"unknown {cls.__name__} settings: {list_offenders(unknown)}")
        # An optional setting given as "" is a mistake, not "unset": an empty path means the working folder.
        empty = sorted(
            f.name for f in dataclasses.fields(cls) if f.default is None and data.get(f.name) == ""
        )
        if empty:
            raise XrayfmError(
                f"empty {cls.__name__} settings: {list_offenders(empty)} (leave them out instead)"
            )
        hints = _type_hints(cls)
        mistyped = [
            f"{k} ({type(v).__name__}, expected {_type_name(hints[k])})"
            for k, v in data.items()
            if not _fits(v, hints[k])
        ]
        if mistyped:
            raise XrayfmError(f"wrong type of {cls.__name__} settings: {list_offenders(mistyped)}")
        config = cls(**data)
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

    def validate(self) -> None:
        """Raise XrayfmError for a number outside its field's range, a value that is not one of its field's
        choices, or NaN or an infinity anywhere, naming the fields and what they allow (subclasses call this
        first, then add their own checks)."""
        problems = []
        for f in dataclasses.fields(self):
            value, limits, allowed = getattr(self, f.name), bounds_text(f), choices_text(f)
            off = _off_choices(value, f.metadata["choices"]) if allowed is not None else []
            if off:
                shown = ", ".join(repr(item)[:80] for item in off[:5]) + (", ..." if len(off) > 5 else "")
                problems.append(f"{f.name} {shown} (choose one of {allowed})")
            elif isinstance(value, int | float) and not isinstance(value, bool) and limits is not None:
                if not _in_bounds(value, f.metadata):
                    problems.append(f"{f.name}={_shown(value)} (must lie in {limits})")
            elif not _finite(value):
                problems.append(f"{f.name}: only finite numbers are allowed (no nan or infinity)")
        if problems:
            raise XrayfmError(f"invalid {type(self).__name__}: " + "; ".join(problems))


@dataclass
class TrainConfig(JsonConfig):
    """Settings shared by pre-training and adaptation: data, model, optimisation, system."""

    # One training run (not a dataclass field): --folds then needs --fold. CVConfig runs every fold.
    one_run: typing.ClassVar[bool] = True

    out: str = _f("runs/run", "run folder: best/, last/, log.csv, metrics.csv, tensorboard/, summary.json")
    # -- data
    kind: str | None = _f(
        None, "dataset layout; omit to train from a prepared --cache", choices=DATASET_KINDS
    )
    root: str | None = _f(None, "dataset root (or label CSV for chexpert/csv)")
    split: str = _f("train", "training split of the dataset")
    val_split: str | None = _f(
        None, "separate validation split (e.g. valid); default: a patient-level split of the training data"
    )
    cache: str | None = _f(
        None,
        "training cache folder: used as is, or prepared there from --kind/--root (default OUT/cache/SPLIT)",
    )
    val_cache: str | None = _f(None, "validation cache folder (same rules as --cache)")
    size: int | None = _f(224, "image side in pixels of the cache and the model input", ge=16, le=4096)
    resize_mode: str = _f(
        "pad", "how images are fitted to a square when caching", choices=("pad", "crop", "stretch")
    )
    policy: str | None = _f(
        None, "uncertainty/blank policy, e.g. u-ones or 'u-zeros;Edema=u-ones;blank=mask'"
    )
    labels: list[str] | None = _f(
        None, "train on these labels only (comma-separated, matched ignoring case); default all"
    )
    body_parts: list[str] | None = _f(None, "mura: keep these body parts (comma-separated, e.g. XR_HUMERUS)")
    frontal_only: bool = _f(False, "chexpert: frontal views only")
    val_fraction: float = _f(
        0.1, "share of patients held out for validation when there is no validation split", ge=0, lt=1
    )
    split_seed: int = _f(
        0, "seed of that patient-level validation split (kept apart from --seed)", ge=0, le=SEED_MAX
    )
    folds: int | None = _f(
        None,
        "validate on one fold of a K-fold split of the training data grouped by patient (stratified by the "
        "label when there is one binary label), seeded by --split-seed; needs --fold",
        ge=2,
        le=100,
    )
    fold: int | None = _f(None, "the validation fold (0 to folds-1); the other folds train", ge=0, le=99)
    verify: str = _f("stat", "cache staleness check", choices=("stat", "size", "exists", "none"))
    # -- model
    model: str = _f(
        "vit_base_patch16_224",
        "timm architecture name (no hub reference): a ViT (vit_*) or a CNN (convnext_*, resnet*, densenet*; "
        "explained with Grad-CAM)",
    )
    model_kwargs: dict[str, Any] = _f({}, "extra timm model arguments as JSON, e.g. '{\"depth\": 4}'")
    drop_path_rate: float = _f(0.1, "stochastic depth rate", ge=0, lt=1)
    channels: int = _f(3, "input channels (the grey image is repeated)", ge=1, le=16)
    # -- optimisation
    epochs: int = _f(10, "number of epochs", ge=1, le=10_000)
    max_steps: int | None = _f(
        None, "stop after this many optimizer steps in total (a budget)", ge=1, le=STEPS_MAX
    )
    batch_size: int = _f(
        32, "images per process and step (global batch = this x processes)", ge=1, le=BATCH_MAX
    )
    lr: float = _f(3e-4, "peak learning rate (AdamW)", gt=0, le=10)
    min_lr_ratio: float = _f(0.01, "final learning rate as a fraction of the peak (cosine decay)", ge=0, le=1)
    weight_decay: float = _f(
        0.05, "AdamW weight decay (not applied to biases, norms, embeddings)", ge=0, le=10
    )
    warmup_fraction: float = _f(0.05, "share of the total steps spent in linear warm-up", ge=0, lt=1)
    grad_clip: float | None = _f(1.0, "clip the gradient norm to this (0: no clipping)", ge=0, le=10_000)
    loss: str = _f("bce", "bce (with per-label pos_weight) or focal", choices=LOSSES)
    focal_gamma: float = _f(2.0, "focal loss gamma", ge=0, le=10)
    pos_weight: bool = _f(True, "weight positives by negatives/positives per label (from training labels)")
    augment: bool = _f(True, "mild radiograph augmentation (crop, rotation, brightness/contrast)")
    hflip: bool = _f(False, "also flip left-right (off by default: sides matter on radiographs)")
    # -- validation, checkpoints
    metric: str = _f("mean_auroc", "validation metric that picks the best checkpoint", choices=METRICS)
    early_stopping: int | None = _f(
        None, "stop after this many epochs without improvement of --metric", ge=1, le=10_000
    )
    save_every: int = _f(
        0, "also save the resumable training state every N steps (0: at epoch ends only)", ge=0, le=STEPS_MAX
    )
    resume: bool = _f(False, "continue from OUT/last/ (exactly where the last saved state left off)")
    eval_batch_size: int | None = _f(
        None, "validation batch size (default: 2 x batch size)", ge=1, le=BATCH_MAX
    )
    # -- system
    seed: int = _f(
        0, "seed of the model init, data order, augmentation and the validation split", ge=0, le=SEED_MAX
    )
    device: str = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = _f("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    compile: bool = _f(False, "torch.compile the model")
    num_workers: int = _f(0, "DataLoader worker processes", ge=0, le=WORKERS_MAX)
    log_every: int = _f(10, "write a log row every N steps", ge=1, le=STEPS_MAX)
    tensorboard: bool = _f(True, "write TensorBoard events under OUT/tensorboard")
    progress_bar: bool = _f(True, "show tqdm progress bars")

    def validate(self) -> None:
        """Raise XrayfmError for settings that cannot work (before any data is read)."""
        super().validate()
        problems = []
        if not TIMM_NAME.fullmatch(self.model):
            problems.append(
                f"model {self.model[:80]!r} (a timm architecture name: letters, digits, '_', '.', '-'; "
                "no hub reference such as hf-hub:ORG/NAME)"
            )
        if self.kind is None and self.cache is None and not getattr(self, "pool", None):
            problems.append("no data: give --kind and --root, or a prepared --cache")
        if self.kind is not None and self.root is None:
            problems.append(f"--kind {self.kind} needs --root")
        problems += self._fold_problems()
        if problems:
            raise XrayfmError(f"invalid {type(self).__name__}: " + "; ".join(problems))

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


@dataclass
class PretrainConfig(TrainConfig):
    """Pre-training a foundation model on multi-label chest radiographs."""

    pretrained: str | None = _f(
        None, "initial weights: a local .safetensors/.pth file, or 'timm' for timm's own (no download here)"
    )
    objective: str = _f(
        "supervised",
        "supervised (multi-label BCE/focal on the labels) or mae (masked autoencoder on unlabelled images: "
        "labels ignored, best/ = the encoder with the lowest validation reconstruction loss)",
        choices=OBJECTIVES,
    )
    pool: dict[str, Any] = _f(
        {},
        'mae: unlabelled corpus as JSON {"sources": [{"kind", "root", "split"} or {"cache"}, ...], '
        '"exclude": [{"kind", "root", "split"}, ...]}; patients of excluded splits never enter '
        "(default: the one --kind/--root/--split or --cache)",
    )
    mask_ratio: float = _f(0.75, "mae: share of the patches hidden from the encoder", gt=0, lt=1)
    decoder_dim: int = _f(128, "mae: width of the (discarded) decoder", ge=1, le=8192)
    decoder_depth: int = _f(2, "mae: transformer blocks of the decoder", ge=1, le=64)
    decoder_heads: int = _f(4, "mae: attention heads of the decoder", ge=1, le=64)
    norm_pix_loss: bool = _f(True, "mae: normalise each target patch to mean 0, variance 1")

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
            problems += _pool_problems(self.pool)
            if self.pool and (self.kind is not None or self.cache is not None):
                problems.append("give either a --pool or one dataset (--kind/--root or --cache), not both")
        elif self.pool:
            problems.append("--pool is for --objective mae (supervised training needs labels)")
        if problems:
            raise XrayfmError("invalid PretrainConfig: " + "; ".join(problems))


@dataclass
class AdaptConfig(TrainConfig):
    """Adapting a foundation checkpoint to a new task (LoRA, full fine-tuning, linear probe or scratch)."""

    foundation: str | None = _f(None, "foundation checkpoint folder (e.g. a pre-training run's best/)")
    method: str = _f(
        "lora", "lora, full (all weights), linear (head only, frozen backbone) or scratch", choices=METHODS
    )
    lora_rank: int = _f(8, "LoRA rank", ge=1, le=1024)
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / rank)", ge=1, le=4096)
    lora_dropout: float = _f(0.1, "dropout on the LoRA branch", ge=0, lt=1)
    lora_targets: list[str] = _f(
        ["qkv"],
        "layers that get LoRA (comma-separated): ViT qkv, proj, fc1, fc2; ConvNeXt fc1, fc2; ResNet conv1, "
        "conv2, conv3; DenseNet conv1, conv2. The default qkv means each CNN family's default "
        "(ConvNeXt fc1,fc2; ResNet/DenseNet all block convs)",
    )
    label_fraction: float | None = _f(
        None, "keep this share of training studies (seeded), e.g. 0.1", gt=0, le=1
    )
    max_studies: int | None = _f(
        None, "keep at most this many training studies (seeded)", ge=1, le=100_000_000
    )
    subsample_by: str = _f(
        "study_id", "group that label subsampling keeps whole", choices=("study_id", "patient_id")
    )
    merge: bool = _f(False, "lora: also save a merged full model under OUT/merged/")
    report_on: str = _f(
        "best", "weights the final report evaluates: best (by --metric) or last", choices=("best", "last")
    )
    n_bootstrap: int = _f(
        1000, "bootstrap resamples for the confidence intervals of the final report", ge=0, le=BOOTSTRAP_MAX
    )
    # Different defaults for adaptation: size/model come from the foundation, shorter schedule.
    size: int | None = _f(None, "image side (default: the foundation's)", ge=16, le=4096)
    epochs: int = _f(5, "number of epochs", ge=1, le=10_000)
    lr: float = _f(1e-3, "peak learning rate (AdamW); lower it (e.g. 1e-4) for --method full", gt=0, le=10)
    drop_path_rate: float = _f(0.0, "stochastic depth rate", ge=0, lt=1)

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
        if problems:
            raise XrayfmError("invalid AdaptConfig: " + "; ".join(problems))

    def adapt_config(self) -> AdaptConfig:
        """The plain :class:`AdaptConfig` of these settings (drops the fields of subclasses)."""
        names = {f.name for f in dataclasses.fields(AdaptConfig)}
        return AdaptConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class CVConfig(AdaptConfig):
    """k-fold cross-validation of an adaptation (``xrayfm cv``): one adapt run per patient-grouped fold.

    Each fold trains on the other K-1 folds of ``split`` and is validated and reported on its own held-out
    fold; the out-of-fold predictions of all folds are pooled.
    """

    one_run: typing.ClassVar[bool] = False
    folds: int | None = _f(
        5, "number of folds (K >= 2), grouped by patient, seeded by --split-seed", ge=2, le=100
    )
    report_on: str = _f(
        "last",
        "weights each fold reports: last (default: no checkpoint picked on the held-out fold) or best",
        choices=("best", "last"),
    )

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.folds is None:
            problems.append("folds: give the number of folds (>= 2)")
        if self.fold is not None:
            problems.append("fold: cv runs every fold; leave --fold unset")
        if problems:
            raise XrayfmError("invalid CVConfig: " + "; ".join(problems))


PRUNERS = ("median", "none")
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


@dataclass
class TuneConfig(AdaptConfig):
    """Hyper-parameter search over adaptation settings with Optuna (``xrayfm tune``).

    Every trial is one adapt run under ``OUT/trials/trial-NNNN``, validated on a patient-level split of
    ``split`` (``val_fraction``, ``split_seed``): never on a separate (reported) split.
    """

    trials: int = _f(
        20, "number of finished trials (complete or pruned) the study should hold", ge=1, le=10_000
    )
    space: dict[str, Any] = _f(
        {},
        'search space as JSON: {NAME: {"low": L, "high": H, "log": true} or [choice, ...]} over '
        f"{', '.join(TUNABLE)}; lora_targets choices are lists or 'qkv,proj' strings "
        "(default: lr, weight_decay and, for lora, lora_rank/alpha/dropout/targets)",
    )
    tune_seed: int = _f(0, "seed of Optuna's TPE sampler (trials themselves use --seed)", ge=0, le=SEED_MAX)
    pruner: str = _f(
        "median",
        "median (stop a trial whose epoch metric is below the median of earlier trials) or none",
        choices=PRUNERS,
    )
    prune_startup_trials: int = _f(
        2, "trials that always run to the end before pruning starts", ge=0, le=10_000
    )
    prune_warmup_epochs: int = _f(0, "epochs of each trial that are never pruned", ge=0, le=10_000)

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
        unknown = sorted(set(self.space) - set(TUNABLE))
        if unknown:
            problems.append(f"space: cannot tune {list_offenders(unknown)} (tunable: {', '.join(TUNABLE)})")
        problems += self._space_range_problems()
        if problems:
            raise XrayfmError("invalid TuneConfig: " + "; ".join(problems))

    def _space_range_problems(self) -> list[str]:
        """Values of the search space outside what their setting allows: numbers (a range's low/high, numeric
        choices) outside its range, and choices that are not among its own."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        problems = []
        for name, spec in self.space.items():
            if name not in TUNABLE:
                continue
            limits, allowed = bounds_text(fields[name]), choices_text(fields[name])
            values = [spec.get("low"), spec.get("high")] if isinstance(spec, dict) else spec
            values = values if isinstance(values, list) else []
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if limits and not all(_in_bounds(v, fields[name].metadata) for v in numbers):
                problems.append(f"space: {name} must lie in {limits}")
            if allowed and _off_choices(values, fields[name].metadata["choices"]):
                problems.append(f"space: {name} choices must be among {allowed}")
        return problems


@dataclass
class EvaluateConfig(JsonConfig):
    """Evaluating a checkpoint on a dataset split (``xrayfm evaluate``; an ``evaluate`` job of the stack)."""

    model: str = _f("", "checkpoint folder (full or adapted), or store:<name>/<version> in the stack")
    kind: str | None = _f(None, "dataset layout (or give a --cache instead)", choices=DATASET_KINDS)
    root: str | None = _f(None, "dataset root (or label CSV for chexpert/csv)")
    split: str = _f("valid", "split to evaluate")
    cache: str | None = _f(None, "a prepared cache folder instead of kind/root")
    body_parts: list[str] | None = _f(None, "mura: keep these body parts")
    frontal_only: bool = _f(False, "chexpert: frontal views only")
    policy: str | None = _f(None, "uncertainty policy (default: the checkpoint's)")
    batch_size: int = _f(64, "images per batch", ge=1, le=BATCH_MAX)
    n_bootstrap: int = _f(1000, "bootstrap resamples for the confidence intervals", ge=0, le=BOOTSTRAP_MAX)
    seed: int = _f(0, "seed of the bootstrap", ge=0, le=SEED_MAX)
    device: str = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    verify: str = _f("stat", "cache staleness check", choices=("stat", "size", "exists", "none"))
    num_workers: int = _f(0, "DataLoader worker processes", ge=0, le=WORKERS_MAX)
    progress_bar: bool = _f(True, "show tqdm progress bars")

    def validate(self) -> None:
        super().validate()
        problems = []
        if not self.model:
            problems.append("model: the checkpoint to evaluate is required")
        if self.kind is None and self.cache is None:
            problems.append("no data: give kind and root, or a prepared cache")
        if self.kind is not None and self.root is None:
            problems.append(f"kind {self.kind} needs root")
        if problems:
            raise XrayfmError("invalid EvaluateConfig: " + "; ".join(problems))


CALIBRATION_METHODS = ("auto", "temperature", "platt", "isotonic")  # xrayfm.evaluate.calibration's + auto
OPERATING_RULES = ("youden", "sensitivity>=S", "specificity>=T")  # as xrayfm.evaluate.metrics names them


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


@dataclass
class CalibrateConfig(JsonConfig):
    """Calibrating a binary model to a site (``xrayfm calibrate``; a ``calibrate`` job of the stack)."""

    model: str = _f("", "checkpoint folder, shipped model name (xrayfm/...), or store:<name>/<version>")
    data: list[str] = _f([], "the site's labelled images, each KIND:ROOT[:SPLIT] (e.g. folder:/data/site)")
    eval_data: list[str] | None = _f(
        None, "separate evaluation sets (KIND:ROOT[:SPLIT]); default: eval_fraction of data's patients"
    )
    eval_fraction: float = _f(
        0.3, "share of the site's patients kept out of the fit, for evaluation", gt=0, lt=1
    )
    label: str | None = _f(
        None, "the dataset class that is the model's positive label (default: the model's label name)"
    )
    method: str = _f("auto", "calibration map", choices=CALIBRATION_METHODS)
    rule: str = _f("youden", "operating point: youden, sensitivity>=S or specificity>=T")
    seed: int = _f(
        0, "seed of the patient split, the method's cross-validation and the bootstraps", ge=0, le=SEED_MAX
    )
    n_bootstrap: int = _f(1000, "bootstrap resamples for the confidence intervals", ge=0, le=BOOTSTRAP_MAX)
    batch_size: int = _f(64, "images per forward pass", ge=1, le=BATCH_MAX)
    device: str = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    out: str | None = _f(None, "folder of the calibrated checkpoint (a job's worker sets it)")
    progress_bar: bool = _f(True, "show tqdm progress bars")

    def validate(self) -> None:
        super().validate()
        problems = []
        if not self.model:
            problems.append("model: the checkpoint to calibrate is required")
        if not self.data:
            problems.append("data: at least one KIND:ROOT[:SPLIT] of labelled site images is required")
        for name in ("data", "eval_data"):
            for i, spec in enumerate(getattr(self, name) or []):
                try:
                    split_source(spec)
                except XrayfmError as exc:
                    problems.append(f"{name}[{i}] {exc}")
        if self.eval_data is not None and not self.eval_data:
            problems.append("eval_data: give at least one set, or leave it out")
        try:
            parse_operating_rule(self.rule)
        except XrayfmError as exc:
            problems.append(str(exc))
        if self.label is not None and not self.label.strip():
            problems.append("label: must name a class (or be left out)")
        if problems:
            raise XrayfmError("invalid CalibrateConfig: " + "; ".join(problems))


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
    return problems


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, resolved once per class (the CLI asks for every field)."""
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    """'int', 'str | None', 'list[str]': an annotation as a person writes it."""
    plain = isinstance(hint, type) and not typing.get_origin(hint)
    return hint.__name__ if plain else str(hint).replace("typing.", "")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (str, int, float, bool, None, list, dict and
    unions of them: what the configs use); a list for a path, say, is refused before anything opens it."""
    origin = typing.get_origin(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        return any(_fits(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list or hint is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list | tuple) and all(item is Any or _fits(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # any other annotation is the dataclass's own business


def field_type(cls: type, name: str) -> Any:
    """The resolved annotation of a config field, without ``None`` (for CLI parsing)."""
    hint = _type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0] if len(args) == 1 else hint
    return hint


__all__ = [
    "AdaptConfig",
    "CALIBRATION_METHODS",
    "CVConfig",
    "CalibrateConfig",
    "EvaluateConfig",
    "JsonConfig",
    "LOSSES",
    "METHODS",
    "METRICS",
    "OBJECTIVES",
    "OPERATING_RULES",
    "PRUNERS",
    "PretrainConfig",
    "TUNABLE",
    "TrainConfig",
    "TuneConfig",
    "choices_text",
    "field_type",
    "parse_operating_rule",
    "split_source",
]
