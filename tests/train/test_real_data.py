"""LoRA adaptation on the real MURA humerus subset from a tiny foundation: a study-level report comes out."""

from __future__ import annotations

import json

import pytest

from tests.train.train_helpers import QUIET
from xrayfm.train import AdaptConfig, adapt


@pytest.mark.real_data
@pytest.mark.slow
def test_lora_on_mura_humerus_writes_a_study_level_report(shared_data, foundation, tmp_path):
    root = shared_data / "mura-humerus-64" / "MURA-v1.1"
    config = AdaptConfig(
        out=str(tmp_path / "run"),
        kind="mura",
        root=str(root),
        split="train",
        val_split="valid",
        body_parts=["XR_HUMERUS"],
        foundation=str(foundation),
        method="lora",
        max_steps=3,
        batch_size=16,
        n_bootstrap=50,
        **QUIET,
    )
    summary = adapt(config)
    assert summary["status"] == "completed" and summary["step"] == 3
    assert summary["data"]["synthetic"] is False
    assert summary["data"]["val"]["studies"] == 125  # the official humerus validation studies
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["kind"] == "binary" and report["n_studies"] == 125
    study = report["overall"]["study"]
    assert study["n"] == 125 and study["positives"] + study["negatives"] == 125
    assert 0.0 <= study["auroc"]["auroc"] <= 1.0  # a few steps: the value itself means nothing
    assert set(report["groups"]) == {"XR_HUMERUS"}
    assert "SYNTHETIC" not in (tmp_path / "run" / "report" / "report.md").read_text()
