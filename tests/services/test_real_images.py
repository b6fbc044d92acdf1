"""Every kind of real radiograph in ../shared/data through the real stack: each gets a 200 and a map."""

from __future__ import annotations

from pathlib import Path

import pytest

from svc_helpers import decode_map
from xrayfm.data.images import image_info

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def _first(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        pytest.skip(f"no file matches {pattern} under {root}")
    return found[0]


CASES = {
    "chexpert_jpeg": "chexpert-small-valid/CheXpert-v1.0-small/valid/*/study1/view1_frontal.jpg",
    "mura_jpeg": "mura-humerus-64/MURA-v1.1/valid/XR_HUMERUS/*/*/image1.jpg",
    "pneumoniamnist_png": "pneumoniamnist/png/test/pneumonia/*.png",
    "dicom_chest_uncompressed": "dicom-radiographs/RG1_UNCR.dcm",
    "dicom_chest_jpeg2000": "dicom-radiographs/RG1_J2KI.dcm",
    "dicom_tibia_uncompressed": "dicom-radiographs/RG3_UNCR.dcm",
    "dicom_tibia_jpeg2000": "dicom-radiographs/RG3_J2KI.dcm",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_image_gets_a_prediction_and_map(case, shared_data, client):
    path = _first(shared_data, CASES[case])
    info = image_info(path)
    resp = client.post("/predict", files={"file": (path.name, path.read_bytes())})
    assert resp.status_code == 200, f"{path}: {resp.text}"
    body = resp.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["image"]["width"] == info["width"] and body["image"]["height"] == info["height"]
    heat = decode_map(body["attention_map"])
    scale = min(1.0, 512 / max(info["width"], info["height"]))  # transport size of the test stack
    assert heat.shape == (round(info["height"] * scale), round(info["width"] * scale))
    assert heat.max() > heat.min()
