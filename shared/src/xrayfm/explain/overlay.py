"""Render an explanation map over a radiograph: upsample, colour-map, blend; PNG bytes / base64.

numpy and PIL, no torch: the web frontend draws overlays without it, and the gateway draws the workers'
heatmaps (:func:`heatmap_on_image`) without matplotlib either (its image has none: matplotlib is imported
only to colour an overlay). Maps may still be
given as CPU torch tensors (anything ``np.asarray`` reads).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from xrayfm.data.images import to_png_bytes
from xrayfm.errors import XrayfmError


def upsample_heatmap(heatmap: Any, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map in [0, 1] to `size` (H, W); float32, still in [0, 1].

    Half-pixel centres, as torch's ``F.interpolate(mode="bilinear", align_corners=False)``: the same
    values to float32 rounding, for enlarging and shrinking alike (no antialiasing).
    """
    return _upsampled(_checked_map(heatmap), _checked_size(size))


def _checked_map(heatmap: Any) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or min(heat.shape) == 0:
        raise XrayfmError(f"heatmap must be a non-empty 2-D array, got shape {tuple(heat.shape)}")
    if not np.isfinite(heat).all():
        raise XrayfmError("heatmap contains NaN or infinite values")
    if heat.min() < -1e-6 or heat.max() > 1 + 1e-6:
        raise XrayfmError(
            f"heatmap values must lie in [0, 1] (got {float(heat.min()):.3g}..{float(heat.max()):.3g}); "
            "normalise it first (xrayfm.explain.normalize_maps)"
        )
    return heat


def _checked_size(size: tuple[int, ...]) -> tuple[int, int]:
    height, width = (int(n) for n in size)
    if height < 1 or width < 1:
        raise XrayfmError(f"size must be positive (H, W), got {tuple(size)}")
    return height, width


@lru_cache(maxsize=256)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of linear interpolation with half-pixel centres: output sample i is
    ``weights[i] @ input`` (two neighbours, weights summing to 1; the edges repeat the border sample).
    Cached (read-only): a deployment sees the same few geometries again and again."""
    scale = np.float32(n_in) / np.float32(n_out)
    source = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = np.minimum(source.astype(np.int64), n_in - 1)  # source >= 0: truncation is floor
    high = np.minimum(low + 1, n_in - 1)
    w_high = (source - low).astype(np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    weights[rows, low] = np.float32(1.0) - w_high
    weights[rows, high] += w_high  # += : at the last sample low == high and the two weights add up to 1
    weights.setflags(write=False)
    return weights


def _resized(heat: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows @ heat @ cols.T``, clipped to [0, 1]: the map resized along both axes by weight matrices.

    Matrices rather than per-axis gathers: a resize, a crop and a second resize compose into one pair of
    small matrices (:func:`heatmap_on_image`), so the gateway draws every answer's map from the small patch
    map directly instead of resizing twice through the model's square input."""
    out = (rows @ heat) @ cols.T
    return np.clip(out, 0.0, 1.0, out=out)


def _upsampled(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A checked map resized to `size` (H, W)."""
    return _resized(heat, _resize_matrix(heat.shape[0], size[0]), _resize_matrix(heat.shape[1], size[1]))


def heatmap_on_image(heat: Any, image_shape: tuple[int, ...], size: int, mode: str) -> np.ndarray:
    """Map an explanation over the model's square input (`size` px, made from the image by ``fit_square``
    in `mode`) back onto the image's own geometry: uint8 H x W, 255 = most attended.

    Hand-written because it inverts ``fit_square`` (pad: cut the letterbox off; crop: the map covers the
    central square, the cropped sides get 0; stretch: resize), which the library does not offer. Torch-free:
    the gateway draws the workers' maps with it. The map is first brought to the `size` square, as the model
    saw it, then cut and resized to the image: each step a linear map, composed into one (:func:`_resized`).
    """
    heat = _checked_map(heat)
    height, width = _checked_size(image_shape[:2])
    map_h, map_w = heat.shape
    if mode == "stretch":
        out = _upsampled(heat, (height, width))
    elif mode == "pad":
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        rows = _resize_matrix(new_h, height) @ _resize_matrix(map_h, size)[top : top + new_h]
        cols = _resize_matrix(new_w, width) @ _resize_matrix(map_w, size)[left : left + new_w]
        out = _resized(heat, rows, cols)
    elif mode == "crop":
        side = min(height, width)
        out = np.zeros((height, width), dtype=np.float32)
        top, left = (height - side) // 2, (width - side) // 2
        out[top : top + side, left : left + side] = _upsampled(heat, (side, side))
    else:
        raise XrayfmError(f"unknown resize mode {mode!r}; expected pad, crop or stretch")
    return np.rint(out * 255.0).astype(np.uint8)


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
    import matplotlib  # here, not at the top: drawing grey heatmaps (the gateway) needs no matplotlib

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


def to_base64_png(rgb: np.ndarray) -> str:
    """Encode an HxWx3 (or HxW grey) uint8 array as a base64 (ASCII) PNG string, e.g. for JSON responses."""
    return base64.b64encode(to_png_bytes(rgb)).decode("ascii")


def heatmap_to_base64(heat: Any, image_shape: tuple[int, ...], size: int, mode: str) -> str:
    """An answer's attention map: the model's map (over its `size` square input, fitted in `mode`) drawn
    on the image's geometry by :func:`heatmap_on_image`, as a base64 grey PNG (255 = most attended).
    The gateway draws every worker's map with it; :func:`heatmap_from_base64` reads it back."""
    return to_base64_png(heatmap_on_image(heat, image_shape, size, mode))


def heatmap_from_base64(png_b64: str) -> np.ndarray:
    """An answer's attention map (a base64 grey PNG, 255 = most attended) as float32 in [0, 1]."""
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


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
