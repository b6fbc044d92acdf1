"""Multi-label and binary reports, study aggregation, and the files write_report produces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from xrayfm.data.labels import CHEXPERT_LABELS, COMPETITION_TASKS
from xrayfm.errors import DataError
from xrayfm.evaluate import binary_report, multilabel_report, roc_curves, study_level, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _multilabel(n: int, names: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, len(names))).astype(float)
    signal = rng.uniform(0.2, 2.0, len(names))
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=y.shape))))
    return y, p


def _strict_json(path) -> dict:
    def refuse(const: str):
        raise AssertionError(f"non-strict JSON constant {const}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_masked_entries_excluded_per_label() -> None:
    names = ["a", "b"]
    y, p = _multilabel(120, names, seed=1)
    y[::4, 0] = np.nan
    rep = multilabel_report(y, p, names, n_bootstrap=50)
    keep = ~np.isnan(y[:, 0])
    a = rep["labels"]["a"]
    assert a["auroc"] == pytest.approx(roc_auc_score(y[keep, 0], p[keep, 0]))
    assert (a["n"], a["masked"]) == (int(keep.sum()), 30)
    assert (a["positives"], a["negatives"]) == (int((y[keep, 0] == 1).sum()), int((y[keep, 0] == 0).sum()))
    assert rep["labels"]["b"]["auroc"] == pytest.approx(roc_auc_score(y[:, 1], p[:, 1]))
    # Masked probabilities may be anything (even NaN): they are never read.
    p2 = p.copy()
    p2[~keep, 0] = np.nan
    assert multilabel_report(y, p2, names, n_bootstrap=50)["labels"]["a"]["auroc"] == a["auroc"]


def test_single_class_label_undefined_and_excluded_from_mean() -> None:
    names = ["a", "b", "c", "d"]
    y, p = _multilabel(150, names, seed=2)
    y[:, 2] = 0.0  # "c": negatives only
    y[:, 3] = np.where(np.arange(150) % 2 == 0, np.nan, 1.0)  # "d": positives only once masked
    rep = multilabel_report(y, p, names, n_bootstrap=200)
    for name in ("c", "d"):
        assert rep["labels"][name]["auroc"] is None
        assert rep["labels"][name]["reason"] == "single class"
        assert rep["labels"][name]["ci_low"] is None
    defined = [roc_auc_score(y[:, j], p[:, j]) for j in (0, 1)]
    assert rep["mean_auroc"] == pytest.approx(np.mean(defined))
    info = rep["mean_auroc_info"]
    assert info["included"] == ["a", "b"] and set(info["excluded"]) == {"c", "d"}
    assert info["ci_low"] <= rep["mean_auroc"] <= info["ci_high"]


def test_competition_mean_uses_exactly_the_five_tasks() -> None:
    y, p = _multilabel(200, CHEXPERT_LABELS, seed=3)
    rep = multilabel_report(y, p, CHEXPERT_LABELS, n_bootstrap=100)
    idx = [CHEXPERT_LABELS.index(t) for t in COMPETITION_TASKS]
    want = np.mean([roc_auc_score(y[:, j], p[:, j]) for j in idx])
    assert rep["competition_mean_auroc"] == pytest.approx(want)
    assert sorted(rep["competition_mean_auroc_info"]["included"]) == sorted(COMPETITION_TASKS)
    assert rep["mean_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(14)]))
    assert rep["competition_mean_auroc"] != pytest.approx(rep["mean_auroc"])


def test_competition_mean_reports_missing_and_undefined_tasks() -> None:
    names = ["Atelectasis", "Cardiomegaly", "Edema", "Fracture"]
    y, p = _multilabel(100, names, seed=4)
    y[:, 2] = 1.0  # Edema single class
    rep = multilabel_report(y, p, names, n_bootstrap=50)
    info = rep["competition_mean_auroc_info"]
    assert info["included"] == ["Atelectasis", "Cardiomegaly"]
    assert info["excluded"] == {
        "Consolidation": "not in names",
        "Pleural Effusion": "not in names",
        "Edema": "single class",
    }
    assert rep["competition_mean_auroc"] == pytest.approx(
        np.mean([roc_auc_score(y[:, 0], p[:, 0]), roc_auc_score(y[:, 1], p[:, 1])])
    )
    none = multilabel_report(y, p, names, n_bootstrap=0, competition=["Pneumonia"])
    assert none["competition_mean_auroc"] is None


def test_multilabel_rejects_bad_shapes_and_logits() -> None:
    y, p = _multilabel(10, ["a", "b"])
    with pytest.raises(DataError, match="names"):
        multilabel_report(y, p, ["a"])
    with pytest.raises(DataError, match="duplicate"):
        multilabel_report(y, p, ["a", "a"])
    with pytest.raises(DataError, match="logits"):
        multilabel_report(y, p * 5 - 2, ["a", "b"])


# Five studies, two images each. Study probability = mean of its images:
# A (pos) .9,.4 -> .65 | B (neg) .6,.6 -> .6 | C (pos) .7,.7 -> .7 | D (neg) .2,.3 -> .25
# E (neg) .8,.1 -> .45
# Study AUROC (mean) = 1.0; with max aggregation it would be 5/6; image-level AUROC = 19/24.
STUDIES = np.repeat(list("ABCDE"), 2)
PROBS = np.array([0.9, 0.4, 0.6, 0.6, 0.7, 0.7, 0.2, 0.3, 0.8, 0.1])
LABELS = np.repeat([1, 0, 1, 0, 0], 2)


def test_study_auroc_uses_mean_of_image_probabilities() -> None:
    rep = binary_report(LABELS, PROBS, study_ids=STUDIES, n_bootstrap=100)
    assert rep["overall"]["image"]["auroc"]["auroc"] == pytest.approx(19 / 24)
    assert rep["overall"]["study"]["auroc"]["auroc"] == pytest.approx(1.0)
    assert rep["overall"]["study"]["n"] == 5 and rep["n_studies"] == 5
    ids, ys, ps = study_level(LABELS, PROBS, STUDIES)
    assert list(ids) == list("ABCDE")
    np.testing.assert_allclose(ps, [0.65, 0.6, 0.7, 0.25, 0.45])
    np.testing.assert_array_equal(ys, [1, 0, 1, 0, 0])


def test_study_level_metrics_match_hand_counts() -> None:
    # At 0.5: A, C true positives; B false positive; D, E true negatives.
    tp, fp, tn, fn, n = 2, 1, 2, 0, 5
    study = binary_report(LABELS, PROBS, study_ids=STUDIES, n_bootstrap=0)["overall"]["study"]
    assert study["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert study["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert study["specificity"] == pytest.approx(tn / (tn + fp))
    assert study["accuracy"] == pytest.approx((tp + tn) / n)
    po, pe = (tp + tn) / n, ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    assert study["kappa"] == pytest.approx((po - pe) / (1 - pe))
    image = binary_report(LABELS, PROBS, study_ids=STUDIES, n_bootstrap=0)["overall"]["image"]
    # Images at 0.5: positives .9 .7 .7 found, .4 missed; negatives .6 .6 .8 flagged, .2 .3 .1 not.
    assert image["confusion"] == {"tp": 3, "fp": 3, "tn": 3, "fn": 1}


def test_mixed_study_labels_raise() -> None:
    labels = LABELS.copy()
    labels[1] = 0
    with pytest.raises(DataError, match="mix labels.*A"):
        binary_report(labels, PROBS, study_ids=STUDIES)


def test_per_group_split_equals_report_on_subset() -> None:
    rng = np.random.default_rng(5)
    n_studies = 60
    studies = np.repeat(np.arange(n_studies), 2)
    parts = np.where(studies % 3 == 0, "XR_HAND", "XR_ELBOW")
    y = np.repeat(rng.integers(0, 2, n_studies), 2)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, y.size), 0, 1)
    rep = binary_report(y, p, study_ids=studies, groups=parts, n_bootstrap=100)
    assert set(rep["groups"]) == {"XR_HAND", "XR_ELBOW"}
    for part in ("XR_HAND", "XR_ELBOW"):
        m = parts == part
        alone = binary_report(y[m], p[m], study_ids=studies[m], n_bootstrap=100)["overall"]
        assert rep["groups"][part] == alone
        frame = pd.DataFrame({"s": studies[m], "y": y[m], "p": p[m]}).groupby("s").mean()
        assert alone["study"]["auroc"]["auroc"] == pytest.approx(roc_auc_score(frame["y"], frame["p"]))
    assert rep["groups"]["XR_HAND"]["study"]["n"] == 20
    assert rep["overall"]["image"]["calibration"]["n"] == 120


def test_study_spanning_groups_raises() -> None:
    with pytest.raises(DataError, match="span several groups"):
        binary_report(LABELS, PROBS, study_ids=STUDIES, groups=["x"] * 9 + ["y"])


def test_write_multilabel_report_files(tmp_path) -> None:
    names = ["a", "b", "c"]
    y, p = _multilabel(80, names, seed=6)
    y[:, 1] = 1.0
    rep = multilabel_report(y, p, names, n_bootstrap=50, competition=["a", "b"])
    paths = write_report(rep, tmp_path / "out", "Tiny test", curves=roc_curves(y, p, names))
    assert set(paths) == {"json", "markdown", "roc", "reliability"}
    loaded = _strict_json(paths["json"])
    assert loaded["labels"]["b"]["auroc"] is None
    assert loaded["mean_auroc"] == pytest.approx(rep["mean_auroc"])
    md = paths["markdown"].read_text()
    assert "| b | undefined (single class) |" in md
    a = rep["labels"]["a"]
    assert f"| a | {a['auroc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | 80 |" in md
    for key in ("roc", "reliability"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC and paths[key].stat().st_size > 1000


def test_write_binary_report_json_has_no_nan(tmp_path) -> None:
    # Single-class group: its AUROC, specificity and kappa are undefined, and must come out as null.
    groups = ["g1"] * 4 + ["g2"] * 6
    labels = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    studies = np.repeat(np.arange(5), 2)
    rep = binary_report(labels, PROBS, study_ids=studies, groups=groups, n_bootstrap=30)
    paths = write_report(rep, tmp_path, "Binary")
    assert "roc" not in paths
    loaded = _strict_json(paths["json"])
    assert loaded["groups"]["g1"]["study"]["auroc"]["auroc"] is None
    assert loaded["groups"]["g1"]["study"]["specificity"] is None
    md = paths["markdown"].read_text()
    assert "| g1 | study | undefined (single class) |" in md
    assert paths["reliability"].read_bytes()[:8] == PNG_MAGIC
