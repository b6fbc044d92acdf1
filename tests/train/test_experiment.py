"""Label-efficiency experiment at tiny sizes: table, summary, plot; finished runs are reused."""

from __future__ import annotations

import pandas as pd
import pytest

import xrayfm.train.experiment as experiment
from tests.train.train_helpers import QUIET
from xrayfm.errors import XrayfmError
from xrayfm.train import AdaptConfig, label_efficiency


@pytest.mark.slow
def test_label_efficiency_table_summary_and_plot(foundation, bone_caches, tmp_path, monkeypatch):
    base = AdaptConfig(
        out=str(tmp_path / "exp"),
        foundation=str(foundation),
        cache=str(bone_caches[0]),
        val_cache=str(bone_caches[1]),
        epochs=1,
        max_steps=2,
        batch_size=4,
        n_bootstrap=0,
        **QUIET,
    )
    result = label_efficiency(base, methods=["lora", "linear"], fractions=[0.5, 1.0], seeds=[0, 1])
    table = pd.read_csv(tmp_path / "exp" / "results.csv")
    assert len(table) == 8
    assert set(table["method"]) == {"lora", "linear"} and set(table["fraction"]) == {0.5, 1.0}
    assert (table["metric_name"] == "study_auroc").all()
    # Half the studies are kept at fraction 0.5, and the seed changes which ones.
    full = table[table["fraction"] == 1.0]["train_studies"].unique()
    half = table[table["fraction"] == 0.5]["train_studies"].unique()
    assert len(full) == 1 and list(half) == [round(full[0] * 0.5)]
    assert table.groupby("method")["trainable_fraction"].nunique().eq(1).all()
    assert table.set_index("method")["trainable_fraction"]["linear"].iloc[0] < 0.01
    markdown = (tmp_path / "exp" / "summary.md").read_text()
    assert "| lora |" in markdown and "| linear |" in markdown and "SYNTHETIC" in markdown
    assert (tmp_path / "exp" / "label_efficiency.png").stat().st_size > 0
    assert len(result["summary"]) == 4  # (method, fraction) cells

    # A second call reuses the finished runs instead of training again.
    def refuse(config):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiment, "adapt", refuse)
    again = label_efficiency(base, methods=["lora", "linear"], fractions=[0.5, 1.0], seeds=[0, 1])
    assert [r["metric"] for r in again["rows"]] == [r["metric"] for r in result["rows"]]


def test_label_efficiency_rejects_bad_grids(foundation, bone_caches, tmp_path):
    base = AdaptConfig(out=str(tmp_path), foundation=str(foundation), cache=str(bone_caches[0]))
    with pytest.raises(XrayfmError, match="unknown methods"):
        label_efficiency(base, methods=["lora", "prompt"])
    with pytest.raises(XrayfmError, match="fractions"):
        label_efficiency(base, fractions=[0.0, 0.5])
