"""`xrayfm calibrate` and :mod:`xrayfm.inference.calibrate`: the shipped pneumonia model calibrated to a small
site of real PneumoniaMNIST PNGs (120 val images), the new checkpoint loaded and served, and bad inputs
refused naming the problem. Skipped, with the reason, when the shared data folder is absent."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint
from xrayfm.errors import XrayfmError

MODEL = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
CLASSES = ("normal", "pneumonia")


def _site(source: Path, folder: Path, per_class: int, classes: tuple[str, ...] = CLASSES) -> Path:
    """A class-folder site of links to the first `per_class` PNGs of each class in `source`."""
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        if name in classes:
            for png in sorted((source / name).glob("*.png"))[:per_class]:
                (folder / name / png.name).symlink_to(png)
    return folder


@pytest.fixture(scope="module")
def pngs(shared_data: Path) -> Path:
    root = shared_data / "pneumoniamnist" / "png"
    if not (root / "val" / "pneumonia").is_dir():
        pytest.skip(f"no PneumoniaMNIST PNGs at {root}")
    return root


@pytest.fixture(scope="module")
def calibrated(pngs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The shipped model calibrated (auto) on 120 val images, 0.3 of them kept out for evaluation."""
    from xrayfm.inference.calibrate import calibrate_checkpoint

    tmp = tmp_path_factory.mktemp("calibrate")
    site = _site(pngs / "val", tmp / "site", 60)
    out = tmp / "calibrated"
    summary = calibrate_checkpoint(MODEL, [f"folder:{site}"], out, device="cpu", n_bootstrap=200)
    return out, summary


def test_calibrated_checkpoint_loads_and_answers_calibrated(calibrated, pngs: Path) -> None:
    from xrayfm.data.images import read_image
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.registry import pretrained_dir
    from xrayfm.utils import sha256_folder

    out, summary = calibrated
    served = load_served_model(out, "cpu")
    info = served.info()
    assert info["calibrated"] is True and summary["method"] == served.calibration.method
    assert "site images of folder:" in info["calibration_source"]
    point = json.loads((out / "operating_point.json").read_text())
    assert served.threshold == point["threshold"] == summary["operating_point"]["threshold"]
    assert served.threshold_source.startswith(f"youden on {summary['site']['fit_images']} site images")
    assert summary["site"]["fit_images"] + summary["site"]["eval_images"] == 120
    # the gate now holds the site's fit images, its threshold set on the evaluation part
    assert served.gate is not None and summary["gate"]["threshold"] == pytest.approx(served.gate.threshold)
    assert any(key.startswith("added: calibration site") for key in served.gate.facts["sources"])
    # lineage: the source's identity; the adapter's foundation found by an absolute path
    meta = json.loads((out / "meta.json").read_text())
    assert meta["calibration"]["source_model"]["sha256"] == sha256_folder(pretrained_dir(MODEL))
    assert Path(meta["foundation"]["path"]).is_absolute() and Path(meta["foundation"]["path"]).is_dir()
    # answers: the calibrated probability of what the source model says
    images = [read_image(p) for p in sorted((pngs / "test" / "pneumonia").glob("*.png"))[:4]]
    raw = load_served_model(MODEL, "cpu")
    raw_p = np.array(
        [r.probabilities["Pneumonia"] for r in Predictor(raw).predict(images, explain_maps=False)]
    )
    answers = Predictor(served).predict(images, explain_maps=False)
    got = np.array([r.probabilities["Pneumonia"] for r in answers])
    np.testing.assert_allclose(got, served.calibration.apply(raw_p), atol=1e-5)
    assert [r.prediction for r in answers] == [
        "Pneumonia" if p >= served.threshold else served.negative_label for p in got
    ]


def test_report_numbers_are_finite(calibrated) -> None:
    out, summary = calibrated
    report = json.loads((out / "report" / "calibration.json").read_text())
    for name in ("before", "after"):
        scores = report["evaluation"][name]
        assert all(math.isfinite(scores[k]) for k in ("ece", "ci_low", "ci_high", "brier", "nll"))
        assert scores["ci_low"] <= scores["ece"] <= scores["ci_high"] and scores["n"] == 36
    assert (out / "report" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ECE [95 % CI]" in (out / "report" / "calibration.md").read_text()
    assert summary["evidence"]["chosen"] == summary["method"]  # auto: chosen with evidence
    assert 0.0 <= summary["operating_point"]["threshold"] <= 1.0


def test_cli_with_separate_evaluation_set(pngs: Path, tmp_path: Path) -> None:
    from xrayfm.cli import main
    from xrayfm.inference import load_served_model

    site = _site(pngs / "val", tmp_path / "site", 40)
    held = _site(pngs / "test", tmp_path / "held", 20)
    out = tmp_path / "cli-out"
    argv = ["calibrate", MODEL, "--data", f"folder:{site}", "--eval", f"folder:{held}", "--out", str(out),
            "--method", "temperature", "--rule", "sensitivity>=0.9", "--n-bootstrap", "50",
            "--device", "cpu", "--json"]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    summary = json.loads(stdout.getvalue())
    assert summary["method"] == "temperature" and summary["out"] == str(out.resolve())
    assert summary["site"]["fit_images"] == 80 and summary["site"]["eval_images"] == 40
    assert summary["operating_point"]["sensitivity_fit"] >= 0.9
    assert load_served_model(out, "cpu").info()["calibrated"] is True
    with contextlib.redirect_stdout(
        io.StringIO()
    ):  # again into the same folder: an earlier output is replaced
        assert main(argv) == 0


def test_refusals_name_the_problem(pngs: Path, tmp_path: Path) -> None:
    from xrayfm.inference.calibrate import calibrate_checkpoint
    from xrayfm.registry import pretrained_dir

    site = f"folder:{_site(pngs / 'val', tmp_path / 'site', 30)}"
    out = tmp_path / "out"
    with pytest.raises(XrayfmError, match="no class 'Effusion' among its classes"):
        calibrate_checkpoint(MODEL, [site], out, label="Effusion", device="cpu")
    small = f"folder:{_site(pngs / 'val', tmp_path / 'small', 10)}"
    with pytest.raises(XrayfmError, match="fit part has 14 labelled images; calibration needs at least 20"):
        calibrate_checkpoint(MODEL, [small], out, device="cpu")
    normal_only = f"folder:{_site(pngs / 'val', tmp_path / 'normal', 40, classes=('normal',))}"
    with pytest.raises(XrayfmError, match="fit part has one class only"):
        calibrate_checkpoint(MODEL, [normal_only], out, device="cpu")
    with pytest.raises(XrayfmError, match="method 'bogus'"):
        calibrate_checkpoint(MODEL, [site], out, method="bogus")
    with pytest.raises(XrayfmError, match="rule 'sensitivity>=2'"):
        calibrate_checkpoint(MODEL, [site], out, rule="sensitivity>=2")
    with pytest.raises(XrayfmError, match="overlaps the model folder"):
        calibrate_checkpoint(MODEL, [site], pretrained_dir(MODEL) / "calibrated", device="cpu")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(XrayfmError, match="not an earlier calibrated checkpoint"):
        calibrate_checkpoint(MODEL, [site], tmp_path / "busy", device="cpu")
    assert not out.exists()


def test_multi_label_model_is_refused(tmp_path: Path) -> None:
    from xrayfm.inference.calibrate import calibrate_checkpoint

    model = make_tiny_checkpoint(tmp_path / "two", ["Effusion", "Edema"], 32)
    with pytest.raises(XrayfmError, match=r"has 2 labels \['Effusion', 'Edema'\].*multi-label"):
        calibrate_checkpoint(str(model), ["folder:/nowhere"], tmp_path / "out", device="cpu")


def test_cli_refuses_bad_settings_naming_the_field(tmp_path: Path) -> None:
    from xrayfm.cli import main

    base = ["calibrate", MODEL, "--data", "folder:/x", "--out", str(tmp_path / "o")]
    for extra, field in ((["--rule", "f1"], "rule 'f1'"), (["--eval-fraction", "1.5"], "eval_fraction=1.5")):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            assert main([*base, *extra]) == 1
        assert field in stderr.getvalue()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        main([*base, "--method", "bogus"])  # argparse's choices


def test_config_validation_and_helpers() -> None:
    from xrayfm.evaluate.calibration import METHODS
    from xrayfm.train.config import CALIBRATION_METHODS, CalibrateConfig, split_source

    assert CALIBRATION_METHODS == ("auto", *METHODS)
    assert split_source("folder:/data/site") == ("folder", "/data/site", None)
    assert split_source("folder:/data/site:val") == ("folder", "/data/site", "val")
    assert split_source("mura:/d/MURA-v1.1:valid") == ("mura", "/d/MURA-v1.1", "valid")
    assert split_source("csv:/a:b/c.csv") == ("csv", "/a:b/c.csv", None)  # a ':' inside the path
    with pytest.raises(XrayfmError, match="KIND:ROOT"):
        split_source("bogus:/x")
    good = CalibrateConfig.from_dict({"model": MODEL, "data": ["folder:/x:val"]})
    assert good.method == "auto" and good.eval_fraction == 0.3 and good.out is None
    for bad, field in (({"method": "bogus"}, "method 'bogus'"), ({"rule": "f1"}, "rule 'f1'"),
                       ({"eval_fraction": 0.0}, "eval_fraction=0.0"), ({"data": ["x:/a"]}, "data[0]"),
                       ({"eval_data": ["nope"]}, "eval_data[0]"), ({"data": []}, "data: at least one")):  # fmt: skip
        with pytest.raises(XrayfmError, match=f"invalid CalibrateConfig: .*{re.escape(field)}"):
            CalibrateConfig.from_dict({"model": MODEL, "data": ["folder:/x"], **bad})
