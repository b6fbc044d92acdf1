"""What the UI shows: the original radiograph (any format, as the model sees it) and the heatmap over it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from xrayfm.data.images import read_image
from xrayfm.explain.overlay import render_overlay

DISPLAY_SIDE = 768  # the UI never needs more pixels than this


def original_for_display(data: bytes, side: int = DISPLAY_SIDE) -> np.ndarray:
    """Decode the upload (PNG, JPEG or DICOM) to grey uint8, at most `side` pixels on the long side."""
    image = read_image(data, max_pixels=200_000_000)
    height, width = image.shape
    if max(height, width) <= side:
        return image
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


def overlay(image: np.ndarray, heat: np.ndarray, opacity: float) -> np.ndarray:
    """The heatmap (jet colours) over the radiograph at `opacity` (0 = radiograph only); H x W x 3 uint8."""
    return render_overlay(image, heat, alpha=float(opacity), cmap="jet")
