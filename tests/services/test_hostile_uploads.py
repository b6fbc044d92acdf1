"""Hostile uploads at the gateway, in process: FastAPI's TestClient with the queues faked
(gateway_fakes). A DICOM whose encapsulated frame is larger than its header is a 422 `image_too_large`
before any pixel is decoded; corrupt JPEGs, and a frame of another size than its header, are 400
`corrupt_image`. The files are built here from generated pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
from openjpeg.utils import encode_array
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from tests.hostile_files import dicom, j2k_with_siz_size, scan_zeroed, with_sof_size
from tests.services.gateway_fakes import FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import jpeg_bytes, phantom


@pytest.fixture()
def http(tmp_path: Path):
    with gateway_client(FakeQueue(), FakeTraining(), model_store=tmp_path / "store") as client:
        yield client


def post(http, name: str, data: bytes):
    return http.post("/predict", files={"file": (name, data)})


VALID_JPEG = jpeg_bytes(phantom(224, 224))


def test_a_valid_jpeg_is_answered(http):
    assert post(http, "x.jpg", VALID_JPEG).status_code == 200


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda: (j2k_with_siz_size(encode_array(phantom(64, 64)), 15000, 15000), JPEG2000Lossless), id="j2k"),
        pytest.param(lambda: (with_sof_size(jpeg_bytes(phantom(64, 64)), 15000, 15000), JPEGBaseline8Bit), id="jpeg"),
    ],
)  # fmt: skip
def test_a_frame_larger_than_its_dicom_header_is_422(http, frame):
    codestream, syntax = frame()
    resp = post(http, "bomb.dcm", dicom(codestream, syntax, 64, 64))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "image_too_large" and "15000x15000" in resp.json()["detail"]


def test_a_frame_of_another_size_than_its_dicom_header_is_400(http):
    resp = post(http, "odd.dcm", dicom(encode_array(phantom(96, 128)), JPEG2000Lossless, 64, 64))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "corrupt_image" and "128x96" in resp.json()["detail"]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(scan_zeroed, id="scan zeroed"),
        pytest.param(lambda data: data[: len(data) * 6 // 10] + b"\xff\xd9", id="cut at 60 % with EOI"),
        pytest.param(lambda data: with_sof_size(data, 2000, 2000), id="SOF 2000 x 2000"),
        pytest.param(lambda data: with_sof_size(data, 7000, 7000), id="SOF 7000 x 7000"),
    ],
)
def test_corrupt_jpegs_are_400(http, corrupt):
    resp = post(http, "x.jpg", corrupt(VALID_JPEG))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "corrupt_image"
