"""The single entry point of the explanations: :func:`explain` dispatches a method name to its maps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from xrayfm.errors import XrayfmError
from xrayfm.explain.gradients import Target, gradcam, gradient_rollout
from xrayfm.explain.methods import OPTIONS, canonical_method
from xrayfm.explain.rollout import attention_rollout, is_vit


def explain(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "rollout",
    target: Target = None,
    **kwargs: Any,
) -> np.ndarray:
    """Explanation maps [B, H', W'] in [0, 1] (patch grid for ViTs, last-stage grid for CNNs).

    method: 'rollout' (class-agnostic; kwargs head_fusion='mean'|'max'|'min', discard_ratio),
    'grad_rollout' (ViT, class-specific) or 'gradcam' (CNN, class-specific; kwarg target_layer).
    `target` is the output index to explain, one for all images or one per image (default: each
    image's top class); rollout takes none.
    """
    name = canonical_method(method)
    unknown = set(kwargs) - OPTIONS[name]
    if unknown:
        allowed = ", ".join(sorted(OPTIONS[name])) or "none"
        raise XrayfmError(
            f"unexpected option(s) for {name}: {', '.join(sorted(unknown))} (allowed: {allowed})"
        )
    if name == "rollout":
        if target is not None:
            raise XrayfmError("attention rollout is class-agnostic; use method='grad_rollout' for a target")
        maps = attention_rollout(model, images, **kwargs)
    elif name == "grad_rollout":
        maps = gradient_rollout(model, images, target)
    else:
        maps = gradcam(model, images, target, **kwargs)
    return maps.detach().cpu().numpy().astype(np.float32)


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The explanation methods `model` supports, its default first: a ViT (plain, LoRA or merged) has
    rollout and gradient rollout; any other timm model (ResNet, ConvNeXt, DenseNet) has Grad-CAM."""
    return ("rollout", "grad_rollout") if is_vit(model) else ("gradcam",)


def default_method(model: nn.Module) -> str:
    """The method used when none is named: rollout for a ViT, Grad-CAM for a CNN."""
    return methods_for(model)[0]


__all__ = ["default_method", "explain", "methods_for"]
