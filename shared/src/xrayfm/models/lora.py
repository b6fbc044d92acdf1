"""LoRA adaptation of timm ViTs with Hugging Face PEFT: apply, count, save/load the adapter, merge."""

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
LORA_TARGETS: dict[str, str] = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (a small PEFT `LoraConfig`); `targets` are keys of LORA_TARGETS."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: tuple[str, ...] = ("qkv",)
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
        """Regex that PEFT full-matches against module names: only the chosen timm Linear layers."""
        alternatives = "|".join(re.escape(LORA_TARGETS[t]) for t in self.targets)
        return rf"(?:.*\.)?(?:{alternatives})"


def apply_lora(model: nn.Module, settings: LoraSettings) -> peft.PeftModel:
    """Wrap `model` (modified in place) with fresh LoRA adapters; base weights are frozen.

    The classifier head stays fully trainable (PEFT `modules_to_save`) when `settings.train_head`.
    A fresh adapter does not change outputs (PEFT initialises LoRA B to zero).
    """
    if isinstance(model, peft.PeftModel):
        raise XrayfmError("model already has PEFT adapters; apply LoRA to the plain timm model")
    regex = settings.target_regex()
    matched = {name: module for name, module in model.named_modules() if re.fullmatch(regex, name)}
    if not matched:
        raise XrayfmError(f"no module of {type(model).__name__} matches LoRA targets {settings.targets}")
    not_linear = [name for name, module in matched.items() if not isinstance(module, nn.Linear)]
    if not_linear:
        raise XrayfmError(f"LoRA targets must be Linear layers, these are not: {list_offenders(not_linear)}")
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
