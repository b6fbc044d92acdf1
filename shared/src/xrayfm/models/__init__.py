"""Models: timm backbones, LoRA adaptation (PEFT) and safe (pickle-free) checkpoints."""

from xrayfm.models.backbones import classifier_names, create_model, model_info, new_head
from xrayfm.models.checkpoint import (
    load_adapted,
    load_checkpoint,
    load_training_state,
    save_adapted,
    save_checkpoint,
    save_training_state,
)
from xrayfm.models.lora import LoraSettings, apply_lora, load_adapter, merge, save_adapter, trainable_summary

__all__ = [
    "LoraSettings",
    "apply_lora",
    "classifier_names",
    "create_model",
    "load_adapted",
    "load_adapter",
    "load_checkpoint",
    "load_training_state",
    "merge",
    "model_info",
    "new_head",
    "save_adapted",
    "save_adapter",
    "save_checkpoint",
    "save_training_state",
    "trainable_summary",
]
