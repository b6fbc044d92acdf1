"""The features a model computes for an image: the input of its classifier head (the pooled, normed
embedding of a ViT; the pooled feature map of a CNN), captured by a forward pre-hook during the ordinary
forward pass, so the domain gate costs no second pass. Works through PEFT wrappers and in ONNX export
(the captured tensor becomes a graph output)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from xrayfm.models.backbones import classifier_module


@dataclass
class FeatureRecord:
    """Filled by :func:`capture_features`: the head's input of the last forward, [B, D] (None before)."""

    features: torch.Tensor | None = None


@contextmanager
def capture_features(model: nn.Module) -> Iterator[FeatureRecord]:
    """Record the classifier head's input while the block runs (the hook is removed in ``finally``)."""
    record = FeatureRecord()

    def hook(_module: nn.Module, args: tuple) -> None:
        record.features = args[0].flatten(1)

    handle = classifier_module(model).register_forward_pre_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


__all__ = ["FeatureRecord", "capture_features"]
