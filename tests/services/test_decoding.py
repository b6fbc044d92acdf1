"""Uploads are decoded in child processes (xrayfm_gateway.decoding): the gateway's own process and event
loop stay free while a decode runs, a decode over its time or memory limit is refused and its child
replaced, a dead child is replaced, and a study's pixels and the uploads held at once are bounded."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.services.gateway_fakes import FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import jpeg_bytes, phantom
from xrayfm_gateway.decoding import DecodePool
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.uploads import Upload, UploadBuffer
from xrayfm_stack.settings import GatewaySettings


def noise_png(side: int) -> bytes:
    """A PNG that is slow to decode (noise does not compress): ~0.5 s at 4000 x 4000 on a slow core."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def run(coro):
    return asyncio.run(coro)


async def _with_pool(settings: GatewaySettings, body):
    pool = DecodePool(settings)
    try:
        return await body(pool)
    finally:
        await pool.close()


def test_uploads_are_decoded_in_another_process_and_the_loop_stays_free():
    slow = noise_png(4000)

    async def body(pool: DecodePool):
        await pool.decode(Upload(jpeg_bytes(phantom(64, 64)), "x.jpg", None))  # the child is started
        [pid] = pool.pids
        assert pid != os.getpid()
        task = asyncio.create_task(pool.decode(Upload(slow, "x.png", None)))
        ticks = 0
        while not task.done():  # the loop runs while the child decodes
            await asyncio.sleep(0.005)
            ticks += 1
        decoded = await task
        assert decoded.pixels.shape == (512, 512) and (decoded.width, decoded.height) == (4000, 4000)
        return ticks

    assert run(_with_pool(GatewaySettings(), body)) > 5


def test_a_decode_over_its_time_limit_is_422_and_its_child_is_replaced():
    settings = GatewaySettings(decode_timeout_s=0.05, decode_concurrency=1)

    async def body(pool: DecodePool):
        with pytest.raises(APIError) as refused:
            await pool.decode(Upload(noise_png(4000), "x.png", None))
        assert (refused.value.status, refused.value.code) == (422, "decode_timeout")
        assert pool.pids == []
        pool.timeout_s = 30.0
        small = await pool.decode(Upload(jpeg_bytes(phantom(64, 64)), "x.jpg", None))
        return small.pixels.shape

    assert run(_with_pool(settings, body)) == (64, 64)


def test_a_decode_over_its_memory_cap_is_422_and_the_next_one_works():
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000)).save(buf, "JPEG")  # 147 MB of RGB pixels from a 770 KB file
    settings = GatewaySettings(decode_memory_mb=400)

    async def body(pool: DecodePool):
        with pytest.raises(APIError) as refused:
            await pool.decode(Upload(buf.getvalue(), "x.jpg", None))
        assert (refused.value.status, refused.value.code) == (422, "image_too_large")
        assert "XRAYFM_DECODE_MEMORY_MB" in refused.value.detail
        return (await pool.decode(Upload(jpeg_bytes(phantom(64, 64)), "x.jpg", None))).pixels.shape

    assert run(_with_pool(settings, body)) == (64, 64)


def test_a_killed_decoder_is_replaced():
    async def body(pool: DecodePool):
        image = Upload(jpeg_bytes(phantom(64, 64)), "x.jpg", None)
        await pool.decode(image)
        [pid] = pool.pids
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        assert (await pool.decode(image)).pixels.shape == (64, 64)
        assert pool.pids and pid not in pool.pids

    run(_with_pool(GatewaySettings(), body))


def test_the_upload_buffer_refuses_beyond_its_limit_and_frees_on_exit():
    buffer = UploadBuffer(100)
    with buffer.hold() as take:
        take(60)
        with buffer.hold() as other, pytest.raises(APIError) as busy:
            other(50)
        assert (busy.value.status, busy.value.code) == (503, "busy")
        assert buffer.used == 60
    assert buffer.used == 0


@pytest.fixture()
def http(tmp_path: Path):
    settings = {"max_study_pixels": 3 * 256 * 256, "upload_buffer_bytes": 200_000}
    with gateway_client(FakeQueue(), FakeTraining(), model_store=tmp_path / "store", **settings) as client:
        yield client


def test_a_study_over_its_pixel_limit_is_422_before_the_image_is_decoded(http):
    image = jpeg_bytes(phantom(256, 256))
    ok = http.post("/predict/study", files=[("files", ("a.jpg", image))] * 3)
    assert ok.status_code == 200, ok.text
    resp = http.post("/predict/study", files=[("files", ("a.jpg", image))] * 4)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "study_too_large" and resp.json()["detail"].startswith("file 4 of 4")


def test_uploads_beyond_the_buffer_are_503_busy(http):
    resp = http.post("/predict", files={"file": ("x.png", noise_png(600))})  # 360 KB > the 200 KB buffer
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "busy" and resp.headers["retry-after"] == "2"
    assert http.post("/predict", files={"file": ("x.jpg", jpeg_bytes(phantom(64, 64)))}).status_code == 200
