"""Drawing primitives of the phantoms: keyed random streams, soft edges, blur, smooth noise, coordinates, exposure.

Everything is numpy + PIL on float "density" maps; :func:`expose` turns a density map into 8-bit grey.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator seeded by the whole key (seed, kind, patient, study, image): one stream per item."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def sig(x: np.ndarray) -> np.ndarray:
    """Logistic step, used for soft (anti-aliased) shape edges."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Cubic ease from 0 (x <= 0) to 1 (x >= 1)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float image.

    Hand-written as a sum of shifted copies because PIL's GaussianBlur only takes 8-bit images (we blur the
    float density before quantising) and scipy is not a dependency of the library.
    """
    if sigma <= 0:
        return a
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if ax == axis else (0, 0) for ax in range(2)]
        p = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        a = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return a.astype(np.float32)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean noise, smooth over ``cell`` pixels (bicubic upsampling of a coarse random grid)."""
    gh, gw = max(3, int(h / cell) + 3), max(3, int(w / cell) + 3)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def grid(h: int, w: int, size: int, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of half of ``size``, origin at (cx, cy), rotated by ``angle``."""
    half = size / 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x + 0.5 - w / 2) / half - float(cx)
    y = (y + 0.5 - h / 2) / half - float(cy)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return c * x + s * y, -s * x + c * y


def expose(density: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Density map -> 8-bit radiograph: exposure (gain, offset, gamma), detector blur and noise."""
    gain, bias, gamma = rng.uniform(0.78, 1.0), rng.uniform(0.0, 0.07), rng.uniform(0.8, 1.25)
    blur_px, noise = rng.uniform(0.3, 0.8) * size / 128, rng.uniform(0.008, 0.03)
    img = np.clip(bias + gain * density, 0.0, 1.0) ** gamma
    img = blur(img, blur_px)
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


__all__ = ["blur", "expose", "grid", "keyed_rng", "sig", "smooth_noise", "smoothstep"]
