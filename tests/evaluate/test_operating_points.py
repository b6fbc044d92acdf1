"""Operating points: candidate thresholds against a brute-force search over every distinct score."""

from __future__ import annotations

import numpy as np
import pytest

from xrayfm.evaluate.metrics import operating_points


def _brute(y: np.ndarray, p: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """For every distinct score t (predict p >= t): the rules' thresholds, found by trying them all."""
    rows = []
    for t in np.unique(p):
        pred = p >= t
        rows.append((t, pred[y == 1].mean(), (~pred[y == 0]).mean()))
    youden = max(rows, key=lambda r: (r[1] + r[2], r[0]))
    sens = max((r for r in rows if r[1] >= 0.9), key=lambda r: r[0])
    spec = min((r for r in rows if r[2] >= 0.8), key=lambda r: r[0])
    return {"youden": youden, "sensitivity>=0.9": sens, "specificity>=0.8": spec}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_a_brute_force_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(float)
    p = np.clip(0.35 * y + rng.random(300) * 0.7, 0, 1).round(3)  # ties on purpose
    points = {o["rule"]: o for o in operating_points(y, p, 0.9, 0.8, n_bootstrap=200, seed=seed)}
    for rule, (t, sens, spec) in _brute(y, p).items():
        got = points[rule]
        assert got["sensitivity"] == pytest.approx(sens) and got["specificity"] == pytest.approx(spec), rule
        if rule != "youden":  # Youden's optimum may be reached at several thresholds
            assert got["threshold"] == pytest.approx(t), rule
        lo, hi = got["sensitivity_ci"]
        assert lo <= got["sensitivity"] <= hi and 0 <= lo < hi <= 1
    assert points["sensitivity>=0.9"]["sensitivity"] >= 0.9
    assert points["specificity>=0.8"]["specificity"] >= 0.8


def test_clustered_ci_is_wider_than_rows_when_clusters_repeat_rows() -> None:
    rng = np.random.default_rng(3)
    y1 = (rng.random(60) < 0.5).astype(float)
    p1 = np.clip(0.3 * y1 + rng.random(60) * 0.7, 0, 1)
    y, p = np.repeat(y1, 5), np.repeat(p1, 5)  # each study = 5 identical images
    studies = np.repeat(np.arange(60), 5)
    rows = operating_points(y, p, n_bootstrap=500, seed=0)[0]
    clustered = operating_points(y, p, n_bootstrap=500, seed=0, clusters=studies)[0]
    assert rows["threshold"] == clustered["threshold"]
    width = lambda o: o["sensitivity_ci"][1] - o["sensitivity_ci"][0]  # noqa: E731
    assert width(clustered) > 1.5 * width(rows)


def test_one_class_gives_no_points_and_nan_rows_are_dropped() -> None:
    assert operating_points(np.zeros(10), np.linspace(0, 1, 10)) == []
    y = np.array([0, 1, np.nan, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.5, 0.8, 0.3, 0.7])
    (youden, *_) = operating_points(y, p, n_bootstrap=50)
    assert youden["rule"] == "youden" and youden["sensitivity"] == 1.0 and youden["specificity"] == 1.0
    assert 0.3 < youden["threshold"] <= 0.7
