"""Render an explanation map over a radiograph: upsample, colour-map, blend; PNG bytes / base64."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xrayfm.errors import XrayfmError


def upsample_heatmap(heatmap: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map in [0, 1] to `size` (H, W); float32, still in [0, 1]."""
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    if heat.dim() != 2 or min(heat.shape) == 0:
        raise XrayfmError(f"heatmap must be a non-empty 2-D array, got shape {tuple(heat.shape)}")
    if not torch.isfinite(heat).all():
        raise XrayfmError("heatmap contains NaN or infinite values")
    if heat.min() < -1e-6 or heat.max() > 1 + 1e-6:
        raise XrayfmError(
            f"heatmap values must lie in [0, 1] (got {float(heat.min()):.3g}..{float(heat.max()):.3g}); "
            "normalise it first (xrayfm.explain.normalize_maps)"
        )
    out = F.interpolate(heat[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return out[0, 0].clamp(0.0, 1.0).numpy()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxW (grey), HxWx1 or HxWx3 -> HxWx3 uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise XrayfmError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise XrayfmError(f"image must be HxW (grey) or HxWx3, got shape {img.shape}")


def render_overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend the colour-mapped `heatmap` (any 2-D grid, in [0, 1]) over a uint8 radiograph.

    `alpha` is the heat map's opacity (0 = radiograph only, 1 = heat map only). Returns HxWx3 uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise XrayfmError(f"alpha must be in [0, 1], got {alpha}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise XrayfmError(f"unknown matplotlib colour map {cmap!r} (try 'jet' or 'inferno')") from err
    base = _as_rgb(image).astype(np.float32)
    heat = upsample_heatmap(heatmap, base.shape[:2])
    colour = colormap(heat)[..., :3].astype(np.float32) * 255.0
    blended = (1.0 - alpha) * base + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def to_png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an HxWx3 (or HxW) uint8 array as PNG bytes."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise XrayfmError(f"expected a uint8 HxW or HxWx3 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def to_base64_png(rgb: np.ndarray) -> str:
    """Encode an HxWx3 uint8 array as a base64 (ASCII) PNG string, e.g. for JSON responses."""
    return base64.b64encode(to_png_bytes(rgb)).decode("ascii")


@dataclass(frozen=True)
class Overlay:
    """A rendered explanation: blended RGB image, its PNG encodings and the upsampled raw map."""

    rgb: np.ndarray  # HxWx3 uint8
    png: bytes
    base64_png: str
    heatmap: np.ndarray  # HxW float32 in [0, 1], at the image's size


def make_overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Overlay:
    """Render the overlay and bundle it with its PNG bytes, base64 string and the upsampled float map."""
    rgb = render_overlay(image, heatmap, alpha=alpha, cmap=cmap)
    png = to_png_bytes(rgb)
    return Overlay(
        rgb=rgb,
        png=png,
        base64_png=base64.b64encode(png).decode("ascii"),
        heatmap=upsample_heatmap(heatmap, rgb.shape[:2]),
    )
