"""AUROC + bootstrap CI, thresholded metrics and ECE against sklearn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from xrayfm.errors import DataError
from xrayfm.evaluate import auroc_with_ci, expected_calibration_error, roc_curves, threshold_metrics
from xrayfm.evaluate.metrics import _weighted_auroc, paired_auroc_difference


def _scored(n: int, seed: int, signal: float = 1.0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    s = 1 / (1 + np.exp(-(signal * y + rng.normal(size=n))))
    return y, (np.round(s, 1) if ties else s)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auroc_equals_sklearn(seed: int, ties: bool) -> None:
    y, s = _scored(300, seed, ties=ties)
    res = auroc_with_ci(y, s, n_bootstrap=50, seed=seed)
    assert res["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert (res["n"], res["n_pos"], res["n_neg"]) == (300, int(y.sum()), int(300 - y.sum()))


def test_bootstrap_kernel_equals_sklearn_on_resamples() -> None:
    """The vectorised bootstrap AUROC with integer counts equals sklearn on the explicitly resampled data."""
    y, s = _scored(80, 3, ties=True)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(y), size=(20, len(y)))
    counts = np.stack([np.bincount(row, minlength=len(y)) for row in idx]).astype(float)
    _, groups = np.unique(s, return_inverse=True)
    got = _weighted_auroc(y == 1, groups, int(groups.max()) + 1, counts)
    want = [roc_auc_score(y[row], s[row]) for row in idx]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_ci_contains_point_and_narrows_with_more_data() -> None:
    small = auroc_with_ci(*_scored(150, 4), n_bootstrap=400, seed=0)
    large = auroc_with_ci(*_scored(6000, 5), n_bootstrap=400, seed=0)
    for res in (small, large):
        assert res["ci_low"] <= res["auroc"] <= res["ci_high"]
        assert res["n_bootstrap_skipped"] == 0
    assert large["ci_high"] - large["ci_low"] < 0.5 * (small["ci_high"] - small["ci_low"])


def test_ci_reproducible_and_alpha_widens() -> None:
    y, s = _scored(300, 6)
    a = auroc_with_ci(y, s, n_bootstrap=300, seed=11)
    assert a == auroc_with_ci(y, s, n_bootstrap=300, seed=11)
    wide = auroc_with_ci(y, s, n_bootstrap=300, seed=11, alpha=0.01)
    assert wide["ci_low"] < a["ci_low"] and wide["ci_high"] > a["ci_high"]


def test_masked_entries_excluded() -> None:
    y, s = _scored(200, 8)
    masked = y.copy()
    masked[::3] = np.nan
    keep = ~np.isnan(masked)
    res = auroc_with_ci(masked, s, n_bootstrap=100)
    assert res == auroc_with_ci(y[keep], s[keep], n_bootstrap=100)
    assert res["auroc"] == pytest.approx(roc_auc_score(y[keep], s[keep]))
    assert res["n"] == int(keep.sum())


def test_single_class_is_undefined() -> None:
    res = auroc_with_ci(np.ones(20), np.linspace(0, 1, 20))
    assert res["auroc"] is None and res["reason"] == "single class"
    assert res["n_pos"] == 20 and res["n_neg"] == 0


def test_resamples_lacking_a_class_are_skipped_and_counted() -> None:
    y = np.array([1.0] + [0.0] * 9)
    s = np.linspace(0.9, 0.0, 10)
    res = auroc_with_ci(y, s, n_bootstrap=2000, seed=0)
    # A resample of 10 misses the only positive with probability 0.9**10 ~= 0.349.
    assert abs(res["n_bootstrap_skipped"] / 2000 - 0.9**10) < 0.04
    assert res["auroc"] == 1.0 and res["ci_low"] == res["ci_high"] == 1.0


def test_cluster_bootstrap_resamples_whole_clusters() -> None:
    """Duplicating every image into a two-image study must not narrow a cluster-bootstrap CI."""
    y, s = _scored(200, 9)
    base = auroc_with_ci(y, s, n_bootstrap=300, seed=1)
    y2, s2, study = np.repeat(y, 2), np.repeat(s, 2), np.repeat(np.arange(200), 2)
    clustered = auroc_with_ci(y2, s2, n_bootstrap=300, seed=1, clusters=study)
    naive = auroc_with_ci(y2, s2, n_bootstrap=300, seed=1)
    assert clustered["auroc"] == pytest.approx(base["auroc"])
    assert clustered["ci_low"] == pytest.approx(base["ci_low"])
    assert clustered["ci_high"] == pytest.approx(base["ci_high"])
    assert naive["ci_high"] - naive["ci_low"] < 0.85 * (base["ci_high"] - base["ci_low"])


@pytest.mark.parametrize(
    "y,s,match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "labels must be"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN or infinite"),
        ([0, 1], [0.1, 0.2, 0.3], "same length"),
    ],
)
def test_bad_input_raises(y, s, match) -> None:
    with pytest.raises(DataError, match=match):
        auroc_with_ci(y, s)


def test_roc_curves_skip_undefined_labels() -> None:
    y, s = _scored(100, 10)
    labels = np.stack([y, np.zeros_like(y)], axis=1)
    curves = roc_curves(labels, np.stack([s, s], axis=1), ["a", "b"])
    assert list(curves) == ["a"]
    assert curves["a"]["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert curves["a"]["fpr"][0] == 0 and curves["a"]["tpr"][-1] == 1


def test_threshold_metrics_match_hand_counts() -> None:
    # tp=3, fn=1, fp=2, tn=4 at threshold 0.5 (a probability equal to the threshold counts as positive).
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.5, 0.7, 0.2, 0.6, 0.8, 0.1, 0.3, 0.4, 0.49])
    tp, fn, fp, tn, n = 3, 1, 2, 4, 10
    res = threshold_metrics(y, p, 0.5)
    assert res["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert res["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert res["specificity"] == pytest.approx(tn / (tn + fp))
    assert res["accuracy"] == pytest.approx((tp + tn) / n)
    po = (tp + tn) / n
    pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    assert res["kappa"] == pytest.approx((po - pe) / (1 - pe))


def test_threshold_metrics_undefined_cases() -> None:
    res = threshold_metrics([1, 1, 1], [0.9, 0.8, 0.7])
    assert res["specificity"] is None and res["kappa"] is None
    assert set(res["undefined"]) == {"specificity", "kappa"}
    assert res["sensitivity"] == 1.0


def test_ece_zero_when_bins_perfectly_calibrated() -> None:
    # Every bin's mean probability equals its fraction of positives.
    p = np.array([0.1] * 10 + [0.5] * 4 + [0.9] * 10)
    y = np.array([1] + [0] * 9 + [1, 1, 0, 0] + [1] * 9 + [0])
    res = expected_calibration_error(y, p, n_bins=10)
    assert res["ece"] == pytest.approx(0.0, abs=1e-12)
    assert sum(b["count"] for b in res["bins"]) == 24


def test_ece_hand_made_case() -> None:
    # n_bins=5: bin [0.2, 0.4) holds 0.25 twice, 1 positive; bin [0.8, 1] holds 0.85, 1.0, 0.9, all positive.
    p = np.array([0.25, 0.25, 0.85, 1.0, 0.9])
    y = np.array([1, 0, 1, 1, 1])
    res = expected_calibration_error(y, p, n_bins=5)
    conf_high = (0.85 + 1.0 + 0.9) / 3
    assert res["ece"] == pytest.approx(2 / 5 * abs(0.5 - 0.25) + 3 / 5 * abs(1.0 - conf_high))
    counts = [b["count"] for b in res["bins"]]
    assert counts == [0, 2, 0, 0, 3]
    assert res["bins"][0]["accuracy"] is None
    assert res["bins"][4]["mean_confidence"] == pytest.approx(conf_high)


def test_ece_masks_nan_and_rejects_logits() -> None:
    res = expected_calibration_error([1, np.nan, 0], [0.7, 0.2, 0.3], n_bins=2)
    assert res["n"] == 2
    with pytest.raises(DataError, match="outside"):
        expected_calibration_error([1, 0], [2.3, -1.0])


def test_paired_auroc_difference_is_paired_and_skips_one_class_labels():
    rng = np.random.default_rng(1)
    y = np.column_stack([rng.integers(0, 2, 300), np.zeros(300)]).astype(float)  # label 2: one class
    a = y + rng.normal(0, 0.5, y.shape)
    same = paired_auroc_difference(y, a, a, n_bootstrap=200)
    assert same["difference"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0  # paired: no spread
    better = paired_auroc_difference(y, a, y + rng.normal(0, 3.0, y.shape), n_bootstrap=200)
    assert better["difference"] > 0.1 and 0 < better["ci_low"] < better["difference"] < better["ci_high"]
    none = paired_auroc_difference(np.zeros((5, 1)), np.zeros((5, 1)), np.zeros((5, 1)))
    assert none["difference"] is None and none["ci_low"] is None
    with pytest.raises(DataError, match=r"must be \[N, L\] alike"):
        paired_auroc_difference(y, a[:, :1], a)
