"""`xrayfm explain` and `xrayfm explain-eval` end to end on a tiny checkpoint, synthetic and real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_tiny_checkpoint
from xrayfm.cli import main
from xrayfm.data.labels import CHEXPERT_LABELS
from xrayfm.data.synth import synth_bone, synth_chest


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "chest"
    synth_chest(root, n=40, seed=3, size=48, progress=False)
    return root


@pytest.fixture(scope="module")
def chest_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "chest", CHEXPERT_LABELS, size=32)


def test_explain_writes_overlays_at_image_size(chest, chest_model, tmp_path, capsys):
    images = sorted(chest.glob("valid/*/*/*.jpg"))[:3]
    assert (
        main(
            ["explain", *map(str, images), "--checkpoint", str(chest_model), "--out", str(tmp_path), "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["predictions"]) == 3
    names = {p["overlay"] for p in result["predictions"]}
    assert len(names) == 3  # same file names in different folders do not overwrite each other
    for answer, image in zip(result["predictions"], images, strict=True):
        assert answer["prediction"] in CHEXPERT_LABELS
        assert set(answer["probabilities"]) == set(CHEXPERT_LABELS)
        overlay = Image.open(answer["overlay"])
        assert overlay.mode == "RGB" and overlay.size == Image.open(image).size
        heat = np.asarray(Image.open(answer["map"]))
        assert heat.shape == Image.open(image).size[::-1] and heat.max() > heat.min()
    assert json.loads((tmp_path / "predictions.json").read_text())["predictions"][0]["method"] == "rollout"


def test_explain_eval_table_on_phantom_masks(chest, chest_model, tmp_path, capsys):
    args = ["explain-eval", "chexpert", str(chest), "--checkpoint", str(chest_model), "--limit", "6",
            "--steps", "4", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"]["masks"] is True
    assert [r["method"] for r in result["rows"]] == ["rollout", "grad_rollout"]
    for row in result["rows"]:
        assert 0 <= row["pointing_hit_rate"] <= 1 and 0 < row["chance_hit_rate"] < 1
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
        assert -1 <= row["randomized_spearman"] <= 1
    assert "pointing hit rate" in (tmp_path / "faithfulness.md").read_text()


def test_explain_eval_without_masks_reports_curves_only(tmp_path, capsys):
    bone = tmp_path / "bone"
    synth_bone(bone, n=30, seed=1, size=48, progress=False)
    (bone / "findings.csv").unlink()  # like real MURA: no ground-truth masks
    model = make_tiny_checkpoint(tmp_path / "m", ["Abnormal"], size=32)
    args = [
        "explain-eval",
        "mura",
        str(bone),
        "--checkpoint",
        str(model),
        "--limit",
        "4",
        "--steps",
        "3",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"]["masks"] is False
    assert "pointing_hit_rate" not in result["rows"][0] and "deletion_auc" in result["rows"][0]


@pytest.mark.real_data
def test_explain_real_images(shared_data, tmp_path, capsys):
    images = [
        next(
            (shared_data / "chexpert-small-valid/CheXpert-v1.0-small/valid").glob(
                "*/study1/view1_frontal.jpg"
            )
        ),
        next((shared_data / "mura-humerus-64/MURA-v1.1/valid/XR_HUMERUS").glob("*/*/image1.jpg")),
        shared_data / "dicom-radiographs/RG1_UNCR.dcm",
        shared_data / "dicom-radiographs/RG3_J2KI.dcm",
    ]
    model = make_tiny_checkpoint(tmp_path / "m", ["Abnormal"], size=32)
    args = [
        "explain",
        *map(str, images),
        "--checkpoint",
        str(model),
        "--method",
        "grad-rollout",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["prediction"] in ("Abnormal", "Normal") for p in result["predictions"]] == [True] * 4
    for answer in result["predictions"]:
        assert Image.open(answer["overlay"]).size[0] > 0
