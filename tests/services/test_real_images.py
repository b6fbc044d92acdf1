"""Every kind of real radiograph in ../shared/data through the real stack: each gets a 200 and a map."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services.svc_helpers import decode_map
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
    shape = (info["height"], info["width"])
    for side in (512, 256):  # the test stack's transport size, then XRAYFM_HEATMAP_SIDE
        scale = min(1.0, side / max(shape))
        shape = (round(shape[0] * scale), round(shape[1] * scale))
    assert heat.shape == shape
    assert heat.max() > heat.min()


def test_a_real_mura_study_is_answered_in_one_worker_call(shared_data, client):
    """POST /predict/study with every image of one MURA humerus study: each image's answer is the one
    /predict gives it alone, the study's probability is their mean, and the images were batched together."""
    studies = sorted((shared_data / "mura-humerus-64/MURA-v1.1/valid/XR_HUMERUS").glob("*/study*"))
    study = next((s for s in studies if len(list(s.glob("*.jpg"))) >= 2), None)
    if study is None:
        pytest.skip("no MURA study with two images or more")
    paths = sorted(study.glob("*.jpg"))
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    resp = client.post("/predict/study", files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["images"]) == len(paths) and "mean" in body["aggregation"]
    label = body["model"]["labels"][0]
    alone = [client.post("/predict", files={"file": (p.name, p.read_bytes())}).json() for p in paths]
    for one, single in zip(body["images"], alone, strict=True):
        assert one["probabilities"][label] == pytest.approx(single["probabilities"][label], abs=1e-4)
        assert decode_map(one["attention_map"]).shape == decode_map(single["attention_map"]).shape
    mean = sum(a["probabilities"][label] for a in body["images"]) / len(paths)
    assert body["probabilities"][label] == pytest.approx(mean, abs=1e-5)
    assert body["prediction"] == (label if mean >= body["model"]["threshold"] else "Normal")
    assert max(a["batch_size"] for a in body["images"]) >= 2  # batched together, not one by one
