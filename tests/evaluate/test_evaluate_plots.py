"""Figures are written as non-empty PNGs; the label-efficiency summary is checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from xrayfm.errors import DataError
from xrayfm.evaluate import (
    expected_calibration_error,
    plot_label_efficiency,
    plot_reliability,
    plot_roc,
    roc_curves,
    summarise_label_efficiency,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_plot_roc_and_reliability(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 2)).astype(float)
    p = np.clip(0.4 * y + rng.uniform(0, 0.6, y.shape), 0, 1)
    assert _is_png(plot_roc(roc_curves(y, p, ["a", "b"]), tmp_path / "roc.png"))
    assert _is_png(plot_roc({}, tmp_path / "empty_roc.png"))
    ece = expected_calibration_error(y[:, 0], p[:, 0], n_bins=5)
    assert _is_png(plot_reliability(ece, tmp_path / "rel.png"))
    assert _is_png(plot_reliability({"image": ece, "study": ece}, tmp_path / "sub" / "rel2.png"))


def _table() -> list[dict]:
    rows = []
    for method, base in (("lora", 0.8), ("linear", 0.7)):
        for fraction in (0.01, 0.1, 1.0):
            for seed in range(3):
                rows.append(
                    {"method": method, "fraction": fraction, "seed": seed, "metric": base + 0.01 * seed}
                )
    return rows


def test_label_efficiency_summary_matches_numpy() -> None:
    table = _table()
    summary = summarise_label_efficiency(table)
    assert len(summary) == 6
    for row in summary:
        values = [
            r["metric"] for r in table if r["method"] == row["method"] and r["fraction"] == row["fraction"]
        ]
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert row["n_seeds"] == 3


def test_label_efficiency_plot_and_undefined_rows(tmp_path) -> None:
    table = _table() + [{"method": "lora", "fraction": 0.1, "seed": 9, "metric": None}]
    with pytest.warns(UserWarning, match="undefined"):
        path = plot_label_efficiency(table, tmp_path / "eff.png")
    assert _is_png(path)
    with pytest.warns(UserWarning):
        row = next(
            r for r in summarise_label_efficiency(table) if (r["method"], r["fraction"]) == ("lora", 0.1)
        )
    assert row["n_undefined"] == 1 and row["n_seeds"] == 3


def test_label_efficiency_rejects_bad_rows(tmp_path) -> None:
    with pytest.raises(DataError, match="fraction"):
        plot_label_efficiency([{"method": "m", "fraction": 0, "seed": 0, "metric": 0.5}], tmp_path / "x.png")
    with pytest.raises(DataError, match="lack"):
        plot_label_efficiency([{"method": "m", "seed": 0, "metric": 0.5}], tmp_path / "x.png")
