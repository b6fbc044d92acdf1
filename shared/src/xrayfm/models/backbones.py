"""One entry point over `timm.create_model`: random init, timm's own pretrained weights, or a local file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.registry import is_registry_name, pretrained_dir

# Weight files timm reads natively; .npz (JAX/big_vision) goes through the model's own `load_pretrained`.
_STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_NPZ_SUFFIX = ".npz"


def create_model(
    name: str = "vit_base_patch16_224",
    num_classes: int = 14,
    pretrained: bool | str | os.PathLike = False,
    img_size: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model (ViT, ConvNeXt, ResNet, ...) with random, timm-pretrained or file weights.

    `pretrained=False`: random init. `pretrained=True`: timm's own weights from the HF cache or the hub
    (set HF_HUB_OFFLINE=1 to use the cache only and fail fast). `pretrained="/path/weights.safetensors"`
    (or .pth/.pt/.bin/.npz): a local file of the same architecture; timm resizes the position embedding
    for another `img_size`, adapts the stem to `in_chans`, and drops the head when `num_classes` differs.
    Extra `kwargs` go to the timm model (e.g. `depth`, `drop_rate`).

    `name="xrayfm/<model>"` is a foundation shipped in the package (see :mod:`xrayfm.registry`): its
    architecture, with its weights when `pretrained=True` (no network) and a new `num_classes` head.
    """
    if is_registry_name(name):
        return _create_shipped(name, num_classes, pretrained, img_size, in_chans, drop_path_rate, kwargs)
    check_timm_model(name)
    model_kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if drop_path_rate:  # 0 is every timm model's default; DenseNet has no stochastic depth and refuses it
        model_kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    if pretrained is False or pretrained is None:
        return _timm_create(name, pretrained=False, **model_kwargs)
    if pretrained is True:
        return _create_from_timm_weights(name, model_kwargs)
    return _create_from_file(name, Path(pretrained), model_kwargs)


def check_timm_model(name: str) -> None:
    """XrayfmError unless `name` is an architecture in timm's registry (``arch`` or ``arch.tag``; a hub
    reference such as ``hf-hub:org/name`` is not one)."""
    if not timm.is_model(name):
        raise XrayfmError(f"unknown timm model {name!r} (see timm.list_models())")


def _create_shipped(
    name: str,
    num_classes: int,
    pretrained: bool | str | os.PathLike,
    img_size: int | None,
    in_chans: int,
    drop_path_rate: float,
    kwargs: dict[str, Any],
) -> nn.Module:
    """A shipped foundation's architecture (from its meta.json), with its weights when ``pretrained``."""
    import json

    if pretrained not in (True, False, None):
        raise XrayfmError(f"{name} names its own weights: pass pretrained=True or False, not {pretrained!r}")
    folder = pretrained_dir(name)
    spec = dict(json.loads((folder / "meta.json").read_text())["model"])
    arch = spec.pop("name")
    spec.update(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate, **kwargs)
    if img_size is not None:
        spec["img_size"] = img_size
    if not pretrained:
        return create_model(arch, **spec)
    return _create_from_file(arch, folder / "model.safetensors", spec)


def model_info(model: nn.Module) -> dict[str, Any]:
    """Summarise a (possibly PEFT-wrapped) timm model: name, parameter counts, input and token sizes."""
    base = _unwrap(model)
    cfg = getattr(base, "pretrained_cfg", None) or {}
    patch_embed = getattr(base, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None) or tuple(cfg.get("input_size", (None, None, None))[-2:])
    params = list(model.parameters())
    return {
        "name": cfg.get("architecture", type(base).__name__),
        "num_classes": getattr(base, "num_classes", None),
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
        "img_size": tuple(img_size) if img_size is not None else None,
        "patch_size": tuple(patch_embed.patch_size) if patch_embed is not None else None,
        "embed_dim": getattr(base, "embed_dim", None) or getattr(base, "num_features", None),
    }


def new_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier by a freshly initialised one with `num_classes` outputs (0 = no head)."""
    if _unwrap(model) is not model:  # replacing the head would silently drop PEFT's trainable head wrapper
        raise XrayfmError("new_head must be called before apply_lora, not on a PEFT model")
    model.reset_classifier(num_classes)
    return model


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of a timm model's classifier head(s): ('head',) for a ViT, ('fc',) for a ResNet."""
    names = (getattr(_unwrap(model), "pretrained_cfg", None) or {}).get("classifier")
    if not names:
        raise XrayfmError(f"cannot tell which module is the classifier of {type(model).__name__}")
    return (names,) if isinstance(names, str) else tuple(names)


def classifier_module(model: nn.Module) -> nn.Module:
    """The module whose input is the model's feature vector (``head`` of a ViT, ``fc`` of a ResNet...),
    through a PEFT wrapper."""
    base = _unwrap(model)
    return base.get_submodule(classifier_names(base)[0])


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside a PEFT wrapper (PeftModel -> LoraModel -> timm model), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _timm_create(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model` with argument errors turned into clear XrayfmErrors."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise XrayfmError(f"model {name!r} does not accept these arguments: {exc}") from exc


@contextlib.contextmanager
def _hub_offline_if_requested() -> Iterator[bool]:
    """Honour HF_HUB_OFFLINE even when set after huggingface_hub was imported (it reads it at import)."""
    from huggingface_hub import constants

    requested = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or requested
    try:
        yield constants.HF_HUB_OFFLINE
    finally:
        constants.HF_HUB_OFFLINE = previous


def _create_from_timm_weights(name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """timm's own pretrained loading (HF cache, then the hub); any failure becomes one clear XrayfmError."""
    from huggingface_hub.errors import HfHubHTTPError

    with _hub_offline_if_requested() as offline:
        try:
            return _timm_create(name, pretrained=True, **model_kwargs)
        except (OSError, RuntimeError, ValueError, HfHubHTTPError) as exc:
            mode = (
                "offline mode (HF_HUB_OFFLINE=1), not in the local HF cache" if offline else "download failed"
            )
            raise XrayfmError(
                f"cannot get timm's pretrained weights for {name!r}: {mode} ({type(exc).__name__}: {exc}). "
                "Pass pretrained='/path/to/weights.safetensors' or pre-fill the HF cache."
            ) from exc


def _create_from_file(name: str, path: Path, model_kwargs: dict[str, Any]) -> nn.Module:
    """Load a local weight file through timm's `pretrained_cfg_overlay`, after checking it fits the model."""
    if not path.is_file():
        raise XrayfmError(f"pretrained weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (*_STATE_DICT_SUFFIXES, _NPZ_SUFFIX):
        raise XrayfmError(
            f"unsupported weight file {path.name}: use one of {_STATE_DICT_SUFFIXES + (_NPZ_SUFFIX,)}"
        )
    # Probe the architecture on the meta device (no memory, no init cost) to learn its keys and head names.
    with torch.device("meta"):
        probe = _timm_create(name, pretrained=False, **model_kwargs)
    cfg = probe.pretrained_cfg
    overlay: dict[str, Any] = {"file": str(path), "custom_load": suffix == _NPZ_SUFFIX}
    if suffix != _NPZ_SUFFIX:
        shapes = _file_shapes(path)
        heads = classifier_names(probe)
        _check_same_architecture(name, path, probe, shapes, heads)
        # timm drops the file's head iff `num_classes` differs from the cfg's; state the file's real size.
        head_weight = shapes.get(f"{heads[0]}.weight")
        overlay["num_classes"] = head_weight[0] if head_weight else 0
        stem = cfg.get("first_conv")
        stem_weight = shapes.get(f"{stem}.weight") if isinstance(stem, str) else None
        if (
            stem_weight is not None and len(stem_weight) == 4
        ):  # the file's input channels, for stem adaptation
            overlay["input_size"] = (stem_weight[1], *cfg.get("input_size", (3, 224, 224))[1:])
    try:
        return _timm_create(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = list_offenders([line for line in lines if "size mismatch" in line] or lines[:1], 3)
        raise XrayfmError(f"weights in {path} do not fit model {name!r} {model_kwargs}: {detail}") from exc


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names (timm-cleaned, no 'module.' prefix) and shapes in a weight file, never unpickling."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    else:
        from timm.models import load_state_dict

        try:  # weights_only=True: plain tensors only, never arbitrary pickled objects
            raw = {
                key: tuple(value.shape)
                for key, value in load_state_dict(str(path), weights_only=True).items()
            }
        except Exception as exc:  # torch raises several types for files that are not weights-only
            raise XrayfmError(f"cannot read {path} as a weights-only state dict: {exc}") from exc
    return {key.removeprefix("module."): shape for key, shape in raw.items()}


def _check_same_architecture(
    name: str, path: Path, probe: nn.Module, shapes: dict[str, tuple[int, ...]], heads: tuple[str, ...]
) -> None:
    """Refuse a file that lacks backbone tensors of `name`.

    timm loads non-strictly whenever it drops the head, which would silently leave missing tensors at
    random init; this check keeps that from passing unnoticed. Shape mismatches are timm's to resize/raise.
    """
    head_prefixes = tuple(f"{head}." for head in heads)
    expected = [key for key in probe.state_dict() if not key.startswith(head_prefixes)]
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise XrayfmError(
            f"{path} is not a {name!r} state dict: {len(missing)} of {len(expected)} backbone tensors "
            f"missing ({list_offenders(missing, 5)})"
        )
