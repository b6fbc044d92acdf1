"""Image transforms for grey radiographs: torchvision.transforms.v2 on uint8 tensors [1, S, S].

Augmentation is deliberately mild and radiograph-aware: a near-square RandomResizedCrop (scale 0.8-1),
a few degrees of rotation and a few percent of translation, brightness/contrast jitter. There is NO
horizontal flip by default: left and right matter on a radiograph (heart side, L/R markers, situs);
``hflip=True`` is offered for tasks where they do not (e.g. bone studies). The grey channel is repeated
to ``channels`` (3 for ImageNet-style backbones) and normalised with the backbone's mean/std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import timm.models
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from xrayfm.errors import XrayfmError

# Train-time augmentation strength (kept in one place so that papers/configs can cite it).
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (0.9, 1.0 / 0.9)
ROTATION_DEGREES = 7.0
TRANSLATE = (0.04, 0.04)
BRIGHTNESS = 0.2
CONTRAST = 0.2


def normalization_for(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a timm model was pre-trained with, from timm's pretrained config (no download).

    Accepts ``arch`` or ``arch.tag`` names; unknown names fall back to ImageNet's mean/std.
    """
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError, KeyError):  # timm raises on some malformed names
        cfg = None
    if cfg is None or cfg.mean is None or cfg.std is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    """Fit mean/std to the channel count: one value is repeated; for one channel, several are averaged."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise XrayfmError(f"{what} has {len(values)} values but the transform outputs {channels} channels")


def build_transform(
    train: bool,
    size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    channels: int = 3,
    hflip: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Transform a uint8 tensor [1, H, W] into a normalised float32 tensor [channels, size, size].

    ``train=False`` is deterministic: resize only if the input is not already ``size`` (cached images
    are), scale to [0, 1] and normalise. ``train=True`` adds the mild augmentation described above.
    """
    if int(size) < 1 or int(channels) < 1:
        raise XrayfmError(f"size and channels must be positive (got size={size}, channels={channels})")
    size, channels = int(size), int(channels)
    mean_c, std_c = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if any(s <= 0 for s in std_c):
        raise XrayfmError(f"std must be positive, got {std_c}")
    if train:
        steps: list[Callable] = [
            v2.RandomResizedCrop((size, size), scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomAffine(degrees=ROTATION_DEGREES, translate=TRANSLATE),
            v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST),
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [v2.Resize((size, size), antialias=True)]  # no-op on images already size x size
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        # Grayscale on a 1-channel image with 3 outputs repeats the grey channel (no colour mixing).
        v2.Grayscale(num_output_channels=channels) if channels in (1, 3) else _Repeat(channels),
        v2.Normalize(mean=mean_c, std=std_c),
    ]
    return v2.Compose(steps)


class _Repeat(torch.nn.Module):
    """Repeat a grey channel to any channel count (v2.Grayscale only offers 1 or 3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] != 1:
            raise XrayfmError(f"expected a grey image [1, H, W], got {tuple(image.shape)}")
        return image.expand(*image.shape[:-3], self.channels, *image.shape[-2:]).contiguous()


__all__ = ["build_transform", "normalization_for"]
