"""k-fold cross-validation: patient-grouped folds, out-of-fold coverage, pooled AUROC, resume, real MURA."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import xrayfm.train.cv as cv
from tests.train.train_helpers import QUIET
from xrayfm.data.splits import kfold_by_patient
from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.errors import DataError, XrayfmError
from xrayfm.train.config import AdaptConfig, CVConfig, PretrainConfig, settings_of
from xrayfm.train.cv import cross_validate, pooled_auroc


class _Table:
    def __init__(self, patients):
        self.csv = pd.DataFrame({"patient_id": patients})


def test_kfold_by_patient_keeps_patients_whole_and_stratifies():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(40)], rng.integers(1, 4, size=40))
    labels = (rng.random(len(patients)) < 0.3).astype(float)
    fold_of, stratified = kfold_by_patient(_Table(patients), 4, seed=1, labels=labels)
    assert stratified and set(fold_of) == {0, 1, 2, 3}
    assert pd.Series(fold_of).groupby(patients).nunique().max() == 1  # no patient in two folds
    assert all((labels[fold_of == k] == 1).any() for k in range(4))  # every fold has positives
    again, _ = kfold_by_patient(_Table(patients), 4, seed=1, labels=labels)
    other, _ = kfold_by_patient(_Table(patients), 4, seed=2, labels=labels)
    assert (again == fold_of).all() and not (other == fold_of).all()  # seeded
    # Several labels (or masked entries): grouped, not stratified.
    plain, stratified = kfold_by_patient(_Table(patients), 4, seed=1, labels=None)
    assert not stratified and pd.Series(plain).groupby(patients).nunique().max() == 1
    masked = labels.copy()
    masked[0] = np.nan
    assert not kfold_by_patient(_Table(patients), 4, seed=1, labels=masked)[1]
    with pytest.raises(DataError, match="5 folds need at least 5 patients"):
        kfold_by_patient(_Table(["a", "a", "b", "c", "d"]), 5)


def test_fold_settings_are_checked(tmp_path):
    common = {"out": str(tmp_path), "cache": "c", "foundation": "f"}
    with pytest.raises(XrayfmError, match="--folds needs --fold"):
        AdaptConfig(**common, folds=3).validate()
    with pytest.raises(XrayfmError, match=r"fold=3 \(must be in 0..2\)"):
        AdaptConfig(**common, folds=3, fold=3).validate()
    with pytest.raises(XrayfmError, match="drop --val-split"):
        CVConfig(**common, val_split="valid").validate()
    with pytest.raises(XrayfmError, match="cv runs every fold"):
        CVConfig(**common, fold=1).validate()
    with pytest.raises(XrayfmError, match="drop --folds"):
        PretrainConfig(out=str(tmp_path), cache="c", objective="mae", folds=3, fold=0).validate()
    assert CVConfig(**common).report_on == "last"  # no checkpoint picked on the reported fold
    assert CVConfig(**common).adapt_config().folds == 5


def test_pooled_auroc_is_study_level_with_patient_bootstrap():
    # 4 patients, 2 studies each, 2 images per study; study probability = mean of its images'.
    rows = []
    for patient in range(4):
        for study in range(2):
            label = float((patient + study) % 2)
            for image in range(2):
                p = 0.2 + 0.6 * label + 0.05 * image - 0.1 * (patient == 3)
                rows.append({"patient_id": f"p{patient}", "study_id": f"p{patient}/s{study}",
                             "label/Abnormal": label, "prob/Abnormal": p})  # fmt: skip
    pooled = pooled_auroc(pd.DataFrame(rows), ["Abnormal"], n_bootstrap=200, seed=0)
    assert pooled["metric"] == "study_auroc" and pooled["n_units"] == 8
    assert pooled["value"] == 1.0 and pooled["ci_low"] is not None


@pytest.mark.slow
def test_cv_on_synthetic_mura_covers_every_image_once_and_resumes(
    foundation, bone_caches, tmp_path, monkeypatch
):
    train_cache = bone_caches[0]
    config = CVConfig(
        out=str(tmp_path / "cv"),
        foundation=str(foundation),
        cache=str(train_cache),
        folds=3,
        epochs=1,
        max_steps=2,
        batch_size=4,
        n_bootstrap=50,
        **QUIET,
    )
    result = cross_validate(config)
    out = tmp_path / "cv"
    base = CachedDataset(train_cache)
    oof = pd.read_csv(out / "oof_predictions.csv")
    # Every training image exactly once, each in one fold, no patient in two folds.
    assert sorted(oof["path"]) == sorted(base.csv["path"]) and not oof["path"].duplicated().any()
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1
    assert set(oof["fold"]) == {0, 1, 2}
    folds = pd.read_csv(out / "folds.csv")
    assert list(folds["fold"]) == [0, 1, 2] and (folds["metric_name"] == "study_auroc").all()
    assert (folds["train_images"] + folds["val_images"] == len(base)).all()
    assert list(folds["val_images"]) == [int((oof["fold"] == k).sum()) for k in range(3)]
    # A fold's run was validated on its held-out fold only.
    for k in range(3):
        meta = json.loads((out / "folds" / f"fold-{k}" / "best" / "meta.json").read_text())
        assert meta["data"]["validation"] == "k-fold" and meta["data"]["fold"] == k
    saved = json.loads((out / "cv.json").read_text())
    assert saved["pooled"]["metric"] == "study_auroc" and 0 <= saved["pooled"]["value"] <= 1
    assert saved["stratified"] is True and saved["trained_folds"] == [0, 1, 2]
    defined = [m for m in folds["metric"] if not np.isnan(m)]
    assert saved["fold_mean"] == pytest.approx(np.mean(defined))
    summary = (out / "summary.md").read_text()
    assert "pooled out-of-fold study_auroc" in summary and "SYNTHETIC" in summary
    assert (out / "cv.png").stat().st_size > 0 and (out / "oof_report" / "report.json").exists()

    # Resume: finished folds are reused; a fold without its report is trained again, alone.
    shutil.rmtree(out / "folds" / "fold-1" / "report")
    calls = []
    real_adapt = cv.adapt

    def counting(settings, *args, **kwargs):
        calls.append(settings.fold)
        return real_adapt(settings, *args, **kwargs)

    monkeypatch.setattr(cv, "adapt", counting)
    again = cross_validate(config)
    assert calls == [1] and again["reused_folds"] == [0, 2]
    assert again["rows"][0]["metric"] == result["rows"][0]["metric"]


@pytest.mark.slow
def test_cv_on_a_folder_task(foundation, bone_root, tmp_path):
    # A folder task: ROOT/<class>/image.png, one-hot labels, one patient per image.
    root = tmp_path / "folder"
    images = sorted((bone_root / "train").rglob("*.png"))[:36]
    for i, image in enumerate(images):
        label = "abnormal" if image.parent.name.endswith("positive") else "normal"
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / label / f"{i}.png")
    config = CVConfig(
        out=str(tmp_path / "cv"),
        kind="folder",
        root=str(root),
        foundation=str(foundation),
        folds=2,
        epochs=1,
        max_steps=1,
        batch_size=4,
        n_bootstrap=20,
        **QUIET,
    )
    result = cross_validate(config)
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert len(oof) == 36 and not oof["path"].duplicated().any()
    assert result["pooled"]["metric"] == "mean_auroc" and result["metric_name"] == "mean_auroc"
    assert result["stratified"] is False  # two one-hot labels: grouped, not stratified
    assert {p.name for p in root.iterdir()} == {"abnormal", "normal"}


@pytest.mark.real_data
@pytest.mark.slow
def test_cv_on_real_mura_humerus(shared_data, foundation, tmp_path):
    root = shared_data / "mura-humerus-64" / "MURA-v1.1"
    config = CVConfig(
        out=str(tmp_path / "cv"),
        kind="mura",
        root=str(root),
        split="train",
        body_parts=["XR_HUMERUS"],
        foundation=str(foundation),
        folds=3,
        max_steps=2,
        batch_size=16,
        n_bootstrap=50,
        **QUIET,
    )
    result = cross_validate(config)
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert len(oof) == 1133 and not oof["path"].duplicated().any()  # the humerus training images
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1
    assert result["pooled"]["metric"] == "study_auroc" and result["pooled"]["n_units"] == 558
    assert result["stratified"] is True and result["synthetic"] is False
    assert result["pooled"]["ci_low"] <= result["pooled"]["value"] <= result["pooled"]["ci_high"]


def test_cv_help_documents_every_option_and_prints_its_config(capsys):
    from xrayfm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["cv", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    skipped = {"fold", "val_split", "val_cache", "val_fraction", "resume"}
    for f in settings_of(CVConfig).values():
        if f.name not in skipped:
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert " ".join(f.help.split()[:3]) in text, f.name
    argv = ["cv", "--cache", "c", "--foundation", "f", "--folds", "4", "--print-config"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["folds"] == 4 and printed["fold"] is None and printed["report_on"] == "last"
