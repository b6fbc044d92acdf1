"""Explanations: where did the model look? Attention rollout, gradient rollout, Grad-CAM, overlays and
faithfulness metrics. :func:`explain` is the single entry point.

    from xrayfm.explain import explain, make_overlay
    maps = explain(model, images, method="rollout")          # [B, H', W'] in [0, 1]
    overlay = make_overlay(radiograph, maps[0])              # RGB, PNG bytes, base64

Names are imported lazily: ``xrayfm.explain.methods`` and ``xrayfm.explain.overlay`` need no torch, so a
torch-free process (the web frontend) can use them; the rest loads torch and timm when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLASS_SPECIFIC_METHODS": "xrayfm.explain.methods",
    "METHODS": "xrayfm.explain.methods",
    "canonical_method": "xrayfm.explain.methods",
    "default_method": "xrayfm.explain.api",
    "explain": "xrayfm.explain.api",
    "methods_for": "xrayfm.explain.api",
    "Overlay": "xrayfm.explain.overlay",
    "heatmap_on_image": "xrayfm.explain.overlay",
    "make_overlay": "xrayfm.explain.overlay",
    "render_overlay": "xrayfm.explain.overlay",
    "to_base64_png": "xrayfm.explain.overlay",
    "to_png_bytes": "xrayfm.explain.overlay",
    "upsample_heatmap": "xrayfm.explain.overlay",
    "attention_rollout": "xrayfm.explain.rollout",
    "capture_attention": "xrayfm.explain.rollout",
    "find_vit": "xrayfm.explain.rollout",
    "is_vit": "xrayfm.explain.rollout",
    "normalize_maps": "xrayfm.explain.rollout",
    "predict_with_rollout": "xrayfm.explain.rollout",
    "rollout_matrix": "xrayfm.explain.rollout",
    "gradcam": "xrayfm.explain.gradients",
    "gradient_rollout": "xrayfm.explain.gradients",
    "resolve_targets": "xrayfm.explain.gradients",
    "deletion_insertion": "xrayfm.explain.faithfulness",
    "pointing_game": "xrayfm.explain.faithfulness",
    "randomization_check": "xrayfm.explain.faithfulness",
    "reinitialize": "xrayfm.explain.faithfulness",
    "topk_iou": "xrayfm.explain.faithfulness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xrayfm.explain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
