"""Image transforms for grey radiographs: torchvision.transforms.v2 on uint8 tensors [1, S, S].

Augmentation is deliberately mild and radiograph-aware: a near-square RandomResizedCrop (scale 0.8-1),
a few degrees of rotation and a few percent of translation, brightness/contrast jitter. There is NO
horizontal flip by default: left and right matter on a radiograph (heart side, L/R markers, situs);
``hflip=True`` is offered for tasks where they do not (e.g. bone studies). The grey channel is repeated
to ``channels`` (3 for ImageNet-style backbones) and normalised with the backbone's mean/std, in one
fused step (:class:`GreyToNormalized`). Geometry and jitter use v2's PIL backend (faster for grey).
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
    """Transform a grey uint8 tensor [1, H, W] into a normalised float32 tensor [channels, size, size].

    ``train=False`` is deterministic: scale to [0, 1], repeat to ``channels`` and normalise (the input
    must already be ``size`` x ``size``, as cached images are). ``train=True`` adds the mild
    augmentation described in the module docstring; seed it with ``torch.manual_seed``.
    ``mean``/``std`` take one value per output channel (see :func:`normalization_for`), or one value.
    """
    if int(size) < 1 or int(channels) < 1:
        raise XrayfmError(f"size and channels must be positive (got size={size}, channels={channels})")
    size, channels = int(size), int(channels)
    mean_c, std_c = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if any(s <= 0 for s in std_c):
        raise XrayfmError(f"std must be positive, got {std_c}")
    if train:
        # The geometry and jitter run on PIL's backend of the same v2 transforms (one PIL "L" image in,
        # parameters still drawn from torch's RNG, so torch.manual_seed makes them repeatable): for a
        # grey uint8 image it is faster than the tensor backend (RandomAffine's grid_sample).
        steps: list[Callable] = [
            v2.ToPILImage(),
            v2.RandomResizedCrop((size, size), scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomAffine(degrees=ROTATION_DEGREES, translate=TRANSLATE),
            v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST),
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.PILToTensor())
        steps.append(GreyToNormalized(mean_c, std_c))
        return v2.Compose(steps)
    # Eval: no resampling at all. Cached images already have the model's size; a stretch-resize here
    # would silently distort a padded image, so another size is an error.
    return GreyToNormalized(mean_c, std_c, size=size)


class GreyToNormalized(torch.nn.Module):
    """Grey [..., 1, H, W] (uint8 0..255 or float 0..1) -> float32 [..., C, H, W], normalised per channel.

    Hand-written because it fuses three v2 steps (ToDtype, Grayscale(3), Normalize) into one
    multiply-add: ``out[c] = x * scale / std[c] - mean[c] / std[c]``, one pass instead of three, which matters
    at thousands of images per second per node. Results equal the v2 chain up to float rounding.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int | None = None) -> None:
        super().__init__()
        self.size = size
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("gain", 1.0 / std_t, persistent=False)
        self.register_buffer("offset", -mean_t / std_t, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim < 3 or image.shape[-3] != 1:
            raise XrayfmError(f"expected a grey image [..., 1, H, W], got {tuple(image.shape)}")
        if self.size is not None and tuple(image.shape[-2:]) != (self.size, self.size):
            raise XrayfmError(
                f"expected {self.size} x {self.size} images (the cache size), got {tuple(image.shape[-2:])}; "
                "prepare a cache of the model's input size"
            )
        gain = self.gain / 255.0 if image.dtype == torch.uint8 else self.gain
        return image.to(torch.float32).mul(gain).add_(self.offset)


__all__ = ["GreyToNormalized", "build_transform", "normalization_for"]
