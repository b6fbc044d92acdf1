"""LoRA adaptation of timm models with Hugging Face PEFT: apply, count, save/load the adapter, merge.

Which layers get LoRA (the short names of :data:`LORA_TARGETS`), per backbone family:

- ViT: ``qkv`` (default), ``proj`` (attention), ``fc1``, ``fc2`` (MLP): ``nn.Linear``.
- ConvNeXt: ``fc1``, ``fc2`` (default both): each block's point-wise MLP (``mlp.fc1``/``mlp.fc2``),
  ``nn.Linear`` (or 1x1 ``nn.Conv2d`` with ``conv_mlp=True``). The 7x7 depth-wise ``conv_dw`` is not
  offered: PEFT's LoRA on grouped convolutions needs the rank divisible by the groups and cannot merge.
- ResNet: ``conv1``, ``conv2``, ``conv3`` (default: those the blocks have; ``conv3`` only in bottleneck
  blocks): the residual blocks' ``nn.Conv2d``; the stem (top-level ``conv1``) and the downsample
  shortcuts stay frozen.
- DenseNet: ``conv1`` (1x1), ``conv2`` (3x3) (default both): every dense layer's ``nn.Conv2d``; stem and
  transitions stay frozen.

PEFT wraps ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) here; LoRA on a k x k convolution is a k x k
conv to ``rank`` channels followed by a 1x1 conv back (PEFT's ``lora.Conv2d``), merged like a Linear.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import peft
from safetensors import safe_open
from torch import nn

from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.models.backbones import classifier_names

# Short target names -> the timm module path they stand for (suffix of e.g. "blocks.3.attn.qkv").
LORA_TARGETS: dict[str, str] = {
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "conv1": "conv1",
    "conv2": "conv2",
    "conv3": "conv3",
}
# Targets matched only inside a block (never a top-level module: a ResNet's stem is called `conv1` too).
NESTED_TARGETS = frozenset({"conv1", "conv2", "conv3"})
# What `targets` defaults to (a ViT's); on another family :func:`resolve_lora_targets` picks its own.
DEFAULT_TARGETS: tuple[str, ...] = ("qkv",)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (a small PEFT `LoraConfig`); `targets` are keys of LORA_TARGETS."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_head: bool = True

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise XrayfmError(
                f"unknown LoRA targets {list_offenders(unknown)}: choose from {list(LORA_TARGETS)}"
            )
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise XrayfmError(
                f"invalid LoRA settings: rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"
            )

    def target_regex(self) -> str:
        """Regex that PEFT full-matches against module names: only the chosen timm layers."""
        return targets_regex(self.targets)


def targets_regex(targets: tuple[str, ...] | list[str]) -> str:
    """The PEFT ``target_modules`` regex of short target names (ViT-only names give the same string as
    before CNN targets existed, so saved ViT adapters keep their config)."""
    anywhere = "|".join(re.escape(LORA_TARGETS[t]) for t in targets if t not in NESTED_TARGETS)
    nested = "|".join(re.escape(LORA_TARGETS[t]) for t in targets if t in NESTED_TARGETS)
    parts = ([rf"(?:.*\.)?(?:{anywhere})"] if anywhere else []) + ([rf".+\.(?:{nested})"] if nested else [])
    return "|".join(parts)


def _matches(model: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    regex = targets_regex(targets)
    return {name: module for name, module in model.named_modules() if re.fullmatch(regex, name)}


def _family_candidates(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """(family, its default LoRA target names) of a timm model (PEFT-wrapped or not)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.densenet import DenseNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    families = (
        (VisionTransformer, "ViT", DEFAULT_TARGETS),
        (ConvNeXt, "ConvNeXt", ("fc1", "fc2")),
        (ResNet, "ResNet", ("conv1", "conv2", "conv3")),
        (DenseNet, "DenseNet", ("conv1", "conv2")),
    )
    for module in model.modules():
        for cls, family, targets in families:
            if isinstance(module, cls):
                return family, targets
    return type(model).__name__, ()


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The default LoRA targets of `model`'s family (see the module docstring), those it has."""
    family, candidates = _family_candidates(model)
    found = tuple(t for t in candidates if _matches(model, (t,)))
    if not found:
        raise XrayfmError(
            f"no default LoRA targets for {family} models: pass targets from {list(LORA_TARGETS)} that "
            "name its Linear / Conv2d layers"
        )
    return found


def resolve_lora_targets(model: nn.Module, requested: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The targets to use on `model`: `requested`, except that the ViT default (``qkv``) on a model with
    no attention becomes its family's default (ConvNeXt fc1,fc2; ResNet conv1,conv2[,conv3]; DenseNet
    conv1,conv2)."""
    requested = tuple(requested)
    if requested == DEFAULT_TARGETS and not _matches(model, requested):
        return default_lora_targets(model)
    return requested


def apply_lora(model: nn.Module, settings: LoraSettings) -> peft.PeftModel:
    """Wrap `model` (modified in place) with fresh LoRA adapters; base weights are frozen.

    Every target must match at least one module of `model` (see :func:`resolve_lora_targets` for the
    per-family defaults).

    The classifier head stays fully trainable (PEFT `modules_to_save`) when `settings.train_head`.
    A fresh adapter does not change outputs (PEFT initialises LoRA B to zero).
    """
    if isinstance(model, peft.PeftModel):
        raise XrayfmError("model already has PEFT adapters; apply LoRA to the plain timm model")
    regex = settings.target_regex()
    family, candidates = _family_candidates(model)
    absent = [t for t in settings.targets if not _matches(model, (t,))]
    if absent:
        raise XrayfmError(
            f"no module of this {family} model matches LoRA target(s) {absent} "
            f"(candidates for {family}: {', '.join(candidates) or 'none known'})"
        )
    matched = _matches(model, settings.targets)
    unsupported = [
        name
        for name, module in matched.items()
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1))
    ]
    if unsupported:
        raise XrayfmError(
            "LoRA targets must be Linear or (non-grouped) Conv2d layers, these are not: "
            f"{list_offenders(unsupported)}"
        )
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=regex,
        modules_to_save=list(classifier_names(model)) if settings.train_head else None,
    )
    return peft.get_peft_model(model, config)


def trainable_summary(model: nn.Module) -> dict[str, int | float]:
    """Exact parameter counts: trainable, total (every parameter of `model` once) and their ratio.

    For a PEFT model `total` includes the LoRA matrices and PEFT's frozen copy of the original head.
    """
    params = list(model.parameters())  # parameters() yields shared tensors once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}


def save_adapter(model: peft.PeftModel, out_dir: str | os.PathLike) -> Path:
    """Write only the adapter (LoRA matrices + trainable head) with PEFT's safetensors serialisation."""
    if not isinstance(model, peft.PeftModel):
        raise XrayfmError(f"save_adapter needs a PEFT model, got {type(model).__name__}")
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    if not (out / ADAPTER_WEIGHTS).is_file():
        raise XrayfmError(f"PEFT did not write {ADAPTER_WEIGHTS} into {out}")
    return out


def load_adapter(
    base_model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False
) -> peft.PeftModel:
    """Attach a saved adapter to `base_model` (modified in place); refuses anything but safetensors.

    `base_model` must have the architecture and head size the adapter was trained with.
    """
    folder = Path(adapter_dir)
    # Checked here because PEFT would treat a missing folder as a hub repo id and go online,
    # and would fall back to unpickling adapter_model.bin.
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / required).is_file():
            raise XrayfmError(f"not an adapter folder: {folder / required} is missing")
    try:
        model = peft.PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)
    except (RuntimeError, ValueError) as exc:
        raise XrayfmError(f"adapter {folder} does not fit this base model: {exc}") from exc
    # PEFT loads non-strictly (it only warns about missing keys and ignores extra ones): compare the
    # file's tensor names with what the model now holds, in PEFT's own saved-key naming.
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        in_file = set(handle.keys())
    in_model = set(peft.get_peft_model_state_dict(model))
    if in_file != in_model:
        raise XrayfmError(
            f"adapter {folder} does not fit this base model: "
            f"missing {list_offenders(sorted(in_model - in_file), 5) or '-'}; "
            f"unused {list_offenders(sorted(in_file - in_model), 5) or '-'}"
        )
    return model


def merge(model: peft.PeftModel) -> nn.Module:
    """Fold LoRA into the base weights and return the plain timm model (with the trained head)."""
    if not isinstance(model, peft.PeftModel):
        raise XrayfmError(f"merge needs a PEFT model, got {type(model).__name__}")
    return model.merge_and_unload()
