"""Pictures that are not radiographs, for testing that a model says it cannot judge them: colour
"photographs" (smooth colour fields with shapes and texture), screenshots (a page with a bar, text lines,
buttons), grey documents (black text on white), noise, blank and constant images.

Seeded and drawn with numpy + PIL; :func:`non_radiograph` returns one as encoded PNG or JPEG bytes, as an
upload would arrive.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("photo", "screenshot", "document", "noise", "blank", "constant")


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # a smooth colour field, upscaled
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    arr = arr + rng.normal(0, 6, arr.shape).astype(np.int16)  # sensor-like texture
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _page(rng: np.random.Generator, w: int, h: int, colour: bool) -> Image.Image:
    im = Image.new("RGB", (w, h), (255, 255, 255) if rng.random() < 0.8 else (30, 30, 35))
    ink = (20, 20, 20) if im.getpixel((0, 0))[0] > 128 else (230, 230, 230)
    draw = ImageDraw.Draw(im)
    top = 0
    if colour:
        bar = tuple(int(c) for c in rng.integers(0, 256, 3))
        top = int(rng.integers(h // 12, h // 6))
        draw.rectangle((0, 0, w, top), fill=bar)
    y = top + 8
    while y < h - 12:
        x = 8
        while x < w - 20:  # words as short ink runs, like rendered text at a distance
            length = int(rng.integers(8, 40))
            draw.rectangle((x, y, min(x + length, w - 8), y + 6), fill=ink)
            x += length + int(rng.integers(4, 10))
        if colour and rng.random() < 0.2:
            button = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.rounded_rectangle((8, y + 12, 8 + w // 4, y + 30), 4, fill=button)
            y += 24
        y += int(rng.integers(12, 22))
    return im


def non_radiograph(kind: str, seed: int = 0, size: tuple[int, int] = (320, 240), fmt: str = "PNG") -> bytes:
    """One non-radiograph of `kind` (see :data:`KINDS`), `size` (width, height), encoded as `fmt`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    w, h = size
    if kind == "photo":
        im = _photo(rng, w, h)
    elif kind in ("screenshot", "document"):
        im = _page(rng, w, h, colour=kind == "screenshot")
        im = im if kind == "screenshot" else im.convert("L")
    elif kind == "noise":
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    elif kind == "blank":
        im = Image.new("L", (w, h), 0)
    else:
        im = Image.new("L", (w, h), int(rng.integers(1, 255)))
    out = io.BytesIO()
    im.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


__all__ = ["KINDS", "non_radiograph"]
