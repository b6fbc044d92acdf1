"""Overlay rendering: shapes, opacity extremes, PNG / base64 encodings, input checks."""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from xrayfm.errors import XrayfmError
from xrayfm.explain import make_overlay, render_overlay, to_base64_png, to_png_bytes, upsample_heatmap


def _radiograph(h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(h, w), dtype=np.uint8)


def _heat() -> np.ndarray:
    return np.random.default_rng(1).random((4, 7)).astype(np.float32)


def test_overlay_shape_dtype_and_opacity_extremes() -> None:
    img, heat = _radiograph(), _heat()
    out = render_overlay(img, heat, alpha=0.5, cmap="inferno")
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(render_overlay(img, heat, alpha=0.0), np.repeat(img[:, :, None], 3, 2))
    colour = matplotlib.colormaps["jet"](upsample_heatmap(heat, (40, 56)))[..., :3] * 255
    np.testing.assert_allclose(render_overlay(img, heat, alpha=1.0), colour, atol=0.51)
    # the blend lies between the radiograph and the colour map
    mid = render_overlay(img, heat, alpha=0.5).astype(float)
    np.testing.assert_allclose(mid, 0.5 * img[:, :, None] + 0.5 * colour, atol=0.51)


def test_upsample_is_bilinear_and_stays_in_range() -> None:
    heat = np.array([[0.0, 1.0]], dtype=np.float32)
    up = upsample_heatmap(heat, (3, 8))
    assert up.shape == (3, 8) and up.dtype == np.float32
    assert up.min() >= 0 and up.max() <= 1
    assert np.all(np.diff(up[0]) >= 0) and 0 < up[0, 3] < 1  # a smooth ramp, not nearest-neighbour
    np.testing.assert_allclose(upsample_heatmap(np.full((2, 2), 0.3), (9, 9)), 0.3, atol=1e-6)


def test_png_and_base64_decode_to_the_same_image() -> None:
    out = render_overlay(_radiograph(), _heat())
    png = to_png_bytes(out)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(to_base64_png(out)))))
    np.testing.assert_array_equal(decoded, out)
    bundle = make_overlay(_radiograph(), _heat(), alpha=0.3)
    assert bundle.png == to_png_bytes(bundle.rgb)
    assert base64.b64decode(bundle.base64_png) == bundle.png
    assert bundle.heatmap.shape == (40, 56) and bundle.heatmap.dtype == np.float32


@pytest.mark.parametrize("deflater", ["isal.isal_zlib", "zlib"])
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 9), (9, 1), (210, 256), (33, 17, 3)], ids=["1x1", "row", "column", "map", "rgb"]
)
def test_png_bytes_decode_exactly_with_pillow(shape: tuple[int, ...], deflater: str, monkeypatch) -> None:
    """The hand-written encoder (Up filter; ISA-L's deflate where installed, as in the gateway, else zlib)
    gives files Pillow verifies and decodes to the very pixels: random values (every byte difference wraps
    around modulo 256) and a smooth map."""
    from xrayfm.data import images

    monkeypatch.setattr(images, "deflate", pytest.importorskip(deflater))
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = ((np.sin(x / 20) + np.cos(y / 15) + 2) / 4 * 255).astype(np.uint8)
    for arr in (noise, np.broadcast_to(smooth[..., None], shape) if len(shape) == 3 else smooth):
        png = to_png_bytes(arr)
        Image.open(io.BytesIO(png)).verify()  # chunk CRCs and structure
        decoded = Image.open(io.BytesIO(png))
        assert decoded.mode == ("L" if len(shape) == 2 else "RGB")
        np.testing.assert_array_equal(np.asarray(decoded), arr)


def test_png_bytes_refuse_what_they_cannot_encode() -> None:
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(XrayfmError):
            to_png_bytes(bad)


def test_overlay_rejects_bad_inputs() -> None:
    img = _radiograph()
    with pytest.raises(XrayfmError, match="uint8"):
        render_overlay(img.astype(np.float32), _heat())
    with pytest.raises(XrayfmError, match=r"\[0, 1\]"):
        render_overlay(img, _heat() * 5)
    with pytest.raises(XrayfmError, match="NaN"):
        render_overlay(img, np.full((2, 2), np.nan))
    with pytest.raises(XrayfmError, match="alpha"):
        render_overlay(img, _heat(), alpha=1.5)
    with pytest.raises(XrayfmError, match="colour map"):
        render_overlay(img, _heat(), cmap="not-a-cmap")
    with pytest.raises(XrayfmError, match="2-D"):
        render_overlay(img, np.zeros((1, 2, 2)))


def test_upsample_matches_torch_bilinear_interpolation() -> None:
    """The numpy resize is torch's F.interpolate(bilinear, align_corners=False), up and down, to float32
    rounding (the overlay module itself needs no torch)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for src, dst in [((4, 7), (40, 56)), ((14, 14), (224, 224)), ((14, 14), (37, 300)), ((50, 30), (7, 9))]:
        heat = rng.random(src).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(heat)[None, None], size=dst, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(upsample_heatmap(heat, dst), ref, rtol=0, atol=2e-6)
    as_tensor = upsample_heatmap(torch.from_numpy(heat), (5, 5))  # CPU tensors are accepted as they are
    np.testing.assert_array_equal(as_tensor, upsample_heatmap(heat, (5, 5)))


def test_heatmap_on_image_matches_the_steps_done_one_by_one_in_torch() -> None:
    """The composed resize (one pair of matrices) equals doing the steps in torch: interpolate the map to
    the model's square, cut the letterbox (pad) or take it whole (stretch: straight to the image; crop: the
    central square), interpolate to the image. At most 1 grey level apart (float32 rounding at .5)."""
    torch = pytest.importorskip("torch")
    from xrayfm.explain.overlay import heatmap_on_image

    def interp(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[
            0, 0
        ].numpy()

    rng = np.random.default_rng(5)
    for (height, width), size, grid in [((390, 320), 224, 14), ((256, 210), 224, 14), ((64, 200), 64, 4)]:
        heat = rng.random((grid, grid)).astype(np.float32)
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        side = min(height, width)
        crop = np.zeros((height, width), np.float32)
        crop[(height - side) // 2 :][:side, (width - side) // 2 :][:, :side] = interp(heat, (side, side))
        expected = {
            "pad": interp(
                interp(heat, (size, size))[top : top + new_h, left : left + new_w], (height, width)
            ),
            "stretch": interp(heat, (height, width)),
            "crop": crop,
        }
        for mode, ref in expected.items():
            out = heatmap_on_image(heat, (height, width), size, mode)
            want = np.rint(np.clip(ref, 0, 1) * 255).astype(int)
            assert out.shape == (height, width)
            assert np.abs(out.astype(int) - want).max() <= 1, mode


def test_an_answers_attention_map_is_the_drawn_map_as_a_lossless_grey_png() -> None:
    """:func:`heatmap_to_base64`, what the gateway puts in every answer's ``attention_map``: the map drawn by
    :func:`heatmap_on_image` (checked against torch above), as an 8-bit grey PNG that Pillow and
    :func:`heatmap_from_base64` read back to the very levels; a malformed map or mode is an XrayfmError."""
    from xrayfm.explain.overlay import heatmap_from_base64, heatmap_on_image, heatmap_to_base64

    heat = np.random.default_rng(7).random((14, 14)).astype(np.float32)
    for mode in ("pad", "crop", "stretch"):
        drawn = heatmap_on_image(heat, (390, 320), 224, mode)
        with Image.open(io.BytesIO(base64.b64decode(heatmap_to_base64(heat, (390, 320), 224, mode)))) as im:
            assert im.mode == "L" and im.size == (320, 390)
            np.testing.assert_array_equal(np.asarray(im), drawn)
        read = heatmap_from_base64(heatmap_to_base64(heat, (390, 320), 224, mode))
        np.testing.assert_array_equal(np.rint(read * 255).astype(np.uint8), drawn)
    cropped = heatmap_on_image(heat, (390, 320), 224, "crop")  # the central 320 x 320 square is covered
    assert cropped[:35].max() == cropped[-35:].max() == 0 and cropped[35:-35].min() > 0
    with pytest.raises(XrayfmError, match="unknown resize mode 'zoom'"):
        heatmap_to_base64(heat, (390, 320), 224, "zoom")
    with pytest.raises(XrayfmError, match=r"must lie in \[0, 1\]"):
        heatmap_to_base64(heat * 3, (390, 320), 224, "pad")
