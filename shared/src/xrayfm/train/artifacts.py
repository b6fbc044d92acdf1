"""What runs record and read back: model specs, preprocessing metadata, any kind of checkpoint."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from xrayfm.errors import XrayfmError
from xrayfm.models.checkpoint import checkpoint_format, load_any  # re-exported for the train API
from xrayfm.train.config import TrainConfig


def model_spec(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The ``create_model`` arguments of the configured model (what ``meta.json["model"]`` stores)."""
    spec: dict[str, Any] = {
        "name": config.model,
        "num_classes": int(num_classes),
        "img_size": int(config.size),
        "in_chans": int(config.channels),
        "drop_path_rate": float(config.drop_path_rate),
    }
    clash = sorted(set(spec) & set(config.model_kwargs))
    if clash:
        raise XrayfmError(f"model_kwargs must not repeat {clash}: use the dedicated settings")
    spec = {**spec, **config.model_kwargs}
    if not _builds(spec):  # CNNs (ResNet, ConvNeXt) take any input size and have no img_size argument
        spec.pop("img_size")
    if spec["drop_path_rate"] and not _builds(spec) and _builds({**spec, "drop_path_rate": 0.0}):
        # DenseNet has no stochastic depth: train without it rather than refuse the default 0.1; the
        # checkpoint's spec records the 0 that was used.
        warnings.warn(
            f"{config.model} has no stochastic depth: drop_path_rate {spec['drop_path_rate']} ignored",
            stacklevel=2,
        )
        spec["drop_path_rate"] = 0.0
    return spec


def _builds(spec: dict[str, Any]) -> bool:
    """Whether ``create_model(**spec)`` accepts these arguments (checked on the meta device: no memory)."""
    from xrayfm.models.backbones import create_model

    try:
        with torch.device("meta"):
            create_model(**spec)
    except XrayfmError:
        return False
    return True


def preprocessing(config: TrainConfig, mean, std) -> dict[str, Any]:
    """How images must be prepared for the model (stored in checkpoint metadata)."""
    from xrayfm.data.labels import parse_policy

    return {
        "size": int(config.size),
        "mode": config.resize_mode,
        "channels": int(config.channels),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "policy": parse_policy(config.policy).describe(),
    }


__all__ = ["checkpoint_format", "load_any", "model_spec", "preprocessing"]
