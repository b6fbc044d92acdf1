"""The demo chain at tiny sizes: it runs end to end and its report says plainly that the data are synthetic."""

from __future__ import annotations

import json

import pytest

from xrayfm.cli import main


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 0
    printed = capsys.readouterr().out
    report = tmp_path / "demo" / "DEMO_REPORT.md"
    assert str(report) in printed
    text = report.read_text()
    assert "SYNTHETIC" in text.splitlines()[0]
    assert "not medical images" in text
    for what in ("Foundation model", "lora", "linear", "Study AUROC"):
        assert what in text
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert set(summary["bone_study_auroc"]) == {"lora", "linear"}
    assert 0 < summary["lora_trainable_fraction"] < 1
    assert (tmp_path / "demo" / "adapt-lora" / "best" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "demo" / "eval-chest" / "report.json").exists()
