"""Post-hoc calibration: parameter recovery on synthetic miscalibrations, the method choice, ECE with a
bootstrap CI, the JSON form and its validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xrayfm.errors import DataError, XrayfmError
from xrayfm.evaluate.calibration import (
    CALIBRATION_FILE,
    METHODS,
    Calibration,
    bootstrap_ece,
    choose_calibration,
    ece_with_ci,
    fit_calibration,
    read_calibration,
    write_calibration,
)
from xrayfm.evaluate.metrics import expected_calibration_error


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True logits z and labels drawn from sigmoid(z): a perfectly calibrated model would output sigmoid(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.5, 2.0, n)
    return z, (rng.random(n) < _sigmoid(z)).astype(float)


def _over_confident(n: int, seed: int, t: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """A model whose logits are the true ones times `t`: fixed exactly by temperature `t`."""
    z, y = _calibrated(n, seed)
    return _sigmoid(t * z), y


def test_temperature_recovers_known_t() -> None:
    p, y = _over_confident(5000, 0, t=2.5)
    cal = fit_calibration(p, y, "temperature", source="synthetic")
    assert cal.params["temperature"] == pytest.approx(2.5, abs=0.15)
    assert (cal.method, cal.n, cal.source) == ("temperature", 5000, "synthetic")
    under = fit_calibration(*_over_confident(5000, 1, t=0.5), "temperature")
    assert under.params["temperature"] == pytest.approx(0.5, abs=0.05)


def test_platt_recovers_a_and_b() -> None:
    a, b = 0.6, -0.8  # true logit = a * model logit + b
    rng = np.random.default_rng(2)
    model_logit = rng.normal(0.0, 2.5, 5000)
    y = (rng.random(5000) < _sigmoid(a * model_logit + b)).astype(float)
    cal = fit_calibration(_sigmoid(model_logit), y, "platt")
    assert cal.params["a"] == pytest.approx(a, abs=0.08)
    assert cal.params["b"] == pytest.approx(b, abs=0.12)

    # The fit is the maximum likelihood: nudging either parameter costs log-loss.
    def nll(a_: float, b_: float) -> float:
        q = _sigmoid(a_ * model_logit + b_)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    best = nll(cal.params["a"], cal.params["b"])
    for da, db in ((0.02, 0), (-0.02, 0), (0, 0.02), (0, -0.02)):
        assert nll(cal.params["a"] + da, cal.params["b"] + db) > best


def test_isotonic_is_monotone_and_reduces_ece_out_of_sample() -> None:
    z, y = _calibrated(4000, 3)
    p = _sigmoid(z) ** 2  # squared: not a map of the logit that temperature or platt could undo
    cal = fit_calibration(p[:2000], y[:2000], "isotonic")
    grid = np.linspace(0, 1, 1001)
    out = cal.apply(grid)
    assert np.all(np.diff(out) >= 0)
    assert out.min() >= 1e-3 and out.max() <= 1 - 1e-3
    before = expected_calibration_error(y[2000:], p[2000:])["ece"]
    after = expected_calibration_error(y[2000:], cal.apply(p[2000:]))["ece"]
    assert before > 0.1
    assert after < 0.3 * before


def test_apply_temperature_one_is_identity_and_keeps_shape() -> None:
    p = np.array([0.0, 1e-9, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
    cal = Calibration("temperature", {"temperature": 1.0})
    np.testing.assert_allclose(cal.apply(p), np.clip(p, 1e-7, 1 - 1e-7), rtol=1e-9, atol=1e-12)
    assert cal.apply(p[:, None]).shape == (8, 1)
    platt = Calibration("platt", {"a": 1.0, "b": 0.0})
    np.testing.assert_allclose(platt.apply(p[2:7]), p[2:7], rtol=1e-9)
    with pytest.raises(DataError, match="outside"):
        cal.apply(np.array([0.2, 1.5]))
    with pytest.raises(DataError, match="shape"):
        cal.apply(np.full((3, 2), 0.5))


@pytest.mark.parametrize("method", METHODS)
def test_to_dict_from_dict_round_trip(method: str) -> None:
    p, y = _over_confident(400, 4)
    cal = fit_calibration(p, y, method, source="site sample: 400 synthetic")
    data = json.loads(json.dumps(cal.to_dict(), allow_nan=False))  # plain JSON
    back = Calibration.from_dict(data)
    assert back == cal
    np.testing.assert_array_equal(back.apply(p), cal.apply(p))


@pytest.mark.parametrize(
    "change,field",
    [
        ({"method": "beta"}, "'method'"),
        ({"params": {"temperature": -1.0}}, "'params.temperature'"),
        ({"params": {"temperature": 0.0}}, "'params.temperature'"),
        ({"params": {"temperature": float("nan")}}, "'params.temperature'"),
        ({"params": {"temperature": "2"}}, "'params.temperature'"),
        ({"params": {"t": 2.0}}, "'params'"),
        ({"method": "platt", "params": {"a": -0.5, "b": 0.0}}, "'params.a'"),
        ({"method": "isotonic", "params": {"x": [0.1, 0.5, 0.4], "y": [0.1, 0.2, 0.3]}}, "'params.x'"),
        ({"method": "isotonic", "params": {"x": [0.1, 0.5], "y": [0.3, 0.2]}}, "'params.y'"),
        ({"method": "isotonic", "params": {"x": [0.1, 0.5], "y": [0.3]}}, "'params.x' and 'params.y'"),
        ({"n": -3}, "'n'"),
        ({"format": "pickle"}, "'format'"),
    ],
)
def test_from_dict_refuses_bad_fields_by_name(change: dict, field: str) -> None:
    good = Calibration("temperature", {"temperature": 2.0}, "here", 50, 1.0).to_dict()
    with pytest.raises(XrayfmError, match=field):
        Calibration.from_dict({**good, **change})
    missing = dict(good)
    del missing["params"]
    with pytest.raises(XrayfmError, match="'params' is missing"):
        Calibration.from_dict(missing)


def test_choose_prefers_temperature_for_a_temperature_miscalibration() -> None:
    """Over ten independent sets, the default rule picks temperature at least 8 times (simulated: 37 of 40),
    lowest-NLL at most as often; evidence covers every method and the uncalibrated reference."""
    chosen, lowest = [], []
    for seed in range(10):
        p, y = _over_confident(1000, 100 + seed)
        cal = choose_calibration(p, y, seed=seed, source="synthetic")
        chosen.append(cal.method)
        lowest.append(cal.evidence["lowest_nll"])
        assert choose_calibration(p, y, seed=seed, rule="min_nll").method == cal.evidence["lowest_nll"]
        margins = cal.evidence["margins"]  # the rule: fewest parameters within one SE of the lowest
        within = [m for m in METHODS if margins[m]["nll_minus_lowest"] <= margins[m]["standard_error"]]
        assert cal.method == (within[0] if within else cal.evidence["lowest_nll"])
    assert chosen.count("temperature") >= 8
    assert lowest.count("temperature") <= chosen.count("temperature")
    ev = cal.evidence
    assert set(ev["cv"]) == {"uncalibrated", *METHODS}
    for name, row in ev["cv"].items():
        assert len(row["folds"]) == ev["folds"] == 5
        for metric in ("nll", "brier", "ece"):
            assert np.isfinite(row[f"{metric}_mean"]), (name, metric)
    assert ev["cv"]["temperature"]["nll_mean"] < ev["cv"]["uncalibrated"]["nll_mean"]
    assert "standard error" in ev["rule"] and ev["chosen"] == cal.method
    json.dumps(cal.to_dict(), allow_nan=False)


def test_choose_prefers_a_richer_map_when_temperature_cannot_fit() -> None:
    """A shifted model (true logit = 1.5 * logit + 1.5) needs platt's intercept: temperature is not chosen."""
    rng = np.random.default_rng(5)
    logit = rng.normal(-0.5, 1.5, 600)
    y = (rng.random(600) < _sigmoid(1.5 * logit + 1.5)).astype(float)
    cal = choose_calibration(_sigmoid(logit), y, seed=0)
    assert cal.method == "platt"
    margin = cal.evidence["margins"]["temperature"]
    assert margin["nll_minus_lowest"] > margin["standard_error"]


def test_bootstrap_ece_equals_ece_of_explicit_resamples() -> None:
    p, y = _over_confident(120, 6)
    boot = bootstrap_ece(y, p, n_bins=15, n_bootstrap=30, seed=9)
    rng = np.random.default_rng(9)
    rows = rng.integers(0, 120, size=(30, 120))  # the same draws bootstrap_ece makes
    want = [expected_calibration_error(y[r], p[r])["ece"] for r in rows]
    np.testing.assert_allclose(boot, want, rtol=1e-10, atol=1e-12)


def test_ece_with_ci_contains_point_and_narrows_with_more_data() -> None:
    small = ece_with_ci(*reversed(_over_confident(200, 7)), n_bootstrap=400)
    large = ece_with_ci(*reversed(_over_confident(5000, 8)), n_bootstrap=400)
    for res in (small, large):
        assert res["ci_low"] <= res["ece"] <= res["ci_high"]
        assert res["brier"] > 0 and res["nll"] > 0
    assert large["ci_high"] - large["ci_low"] < 0.5 * (small["ci_high"] - small["ci_low"])
    p, y = _over_confident(300, 9)
    y_masked = y.copy()
    y_masked[:10] = np.nan
    assert ece_with_ci(y_masked, p, n_bootstrap=50)["n"] == 290
    assert (
        ece_with_ci(y_masked, p, n_bootstrap=50)["ece"] == ece_with_ci(y[10:], p[10:], n_bootstrap=50)["ece"]
    )


def test_read_write_round_trip(tmp_path) -> None:
    assert read_calibration(tmp_path) is None
    p, y = _over_confident(300, 10)
    cal = choose_calibration(p, y, source="site sample: 300 synthetic")
    path = write_calibration(tmp_path / "model", cal)
    assert path == tmp_path / "model" / CALIBRATION_FILE
    assert read_calibration(tmp_path / "model") == cal
    path.write_text('{"method": "temperature", "params": {"temperature": -2}}')
    with pytest.raises(XrayfmError, match="params.temperature"):
        read_calibration(tmp_path / "model")
    path.write_text("{not json")
    with pytest.raises(XrayfmError, match="not valid JSON"):
        read_calibration(tmp_path / "model")


def test_refuses_one_class_too_few_and_unknown_method() -> None:
    p, y = _over_confident(100, 11)
    with pytest.raises(DataError, match="both classes"):
        fit_calibration(p, np.ones(100), "temperature")
    with pytest.raises(DataError, match="both classes"):
        choose_calibration(p, np.zeros(100))
    with pytest.raises(DataError, match="at least 20"):
        fit_calibration(p[:19], y[:19], "platt")
    y_nan = y.copy()
    y_nan[15:] = np.nan  # NaN labels are dropped: 15 remain
    with pytest.raises(DataError, match="got 15"):
        fit_calibration(p, y_nan, "isotonic")
    with pytest.raises(XrayfmError, match="method"):
        fit_calibration(p, y, "beta")
    with pytest.raises(XrayfmError, match="rule"):
        choose_calibration(p, y, rule="best")
    with pytest.raises(DataError, match="logits"):
        fit_calibration(p * 3 - 1, y, "temperature")


def test_nan_labels_dropped_in_fit() -> None:
    p, y = _over_confident(400, 12)
    y_nan = y.copy()
    y_nan[::4] = np.nan
    keep = ~np.isnan(y_nan)
    a = fit_calibration(p, y_nan, "temperature")
    b = fit_calibration(p[keep], y[keep], "temperature")
    assert a.n == int(keep.sum()) and a.params == b.params
