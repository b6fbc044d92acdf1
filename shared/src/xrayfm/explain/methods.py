"""The explanation methods by name: the list, their aliases and options. Torch-free on purpose, so the
services (gateway, frontend) check a method name against the same list the library runs."""

from __future__ import annotations

from xrayfm.errors import XrayfmError

METHODS = ("rollout", "grad_rollout", "gradcam")
CLASS_SPECIFIC_METHODS = frozenset({"grad_rollout", "gradcam"})
ALIASES = {
    "attention_rollout": "rollout",
    "grad-rollout": "grad_rollout",
    "gradient_rollout": "grad_rollout",
    "chefer": "grad_rollout",
    "grad-cam": "gradcam",
    "grad_cam": "gradcam",
}
# Keyword options each method accepts (see :func:`xrayfm.explain.explain`).
OPTIONS = {
    "rollout": frozenset({"head_fusion", "discard_ratio"}),
    "grad_rollout": frozenset(),
    "gradcam": frozenset({"target_layer"}),
}


def canonical_method(method: str) -> str:
    """Normalise a method name ('grad-cam' -> 'gradcam'); raise for unknown ones."""
    name = ALIASES.get(method.lower(), method.lower())
    if name not in METHODS:
        raise XrayfmError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    return name


__all__ = ["ALIASES", "CLASS_SPECIFIC_METHODS", "METHODS", "OPTIONS", "canonical_method"]
