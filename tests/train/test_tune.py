"""Hyper-parameter search: the space, pruning through adapt's callbacks, a resumable study, the best trial."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import xrayfm.train.tune as tuning
from tests.train.train_helpers import QUIET
from xrayfm.errors import XrayfmError
from xrayfm.train.artifacts import load_any
from xrayfm.train.config import TuneConfig, settings_of
from xrayfm.train.tune import DEFAULT_SPACE, decode, parse_space, tune

optuna = pytest.importorskip("optuna")


def test_space_parsing_and_refusals(tmp_path):
    params = {p.name: p for p in parse_space({}, "lora")}
    assert set(params) == set(DEFAULT_SPACE) and params["lr"].log
    assert set(p.name for p in parse_space({}, "full")) == {"lr", "weight_decay"}  # no LoRA settings
    space = parse_space({"lora_targets": [["qkv"], ["qkv", "proj"]], "epochs": {"low": 1, "high": 3}}, "lora")
    assert space[0].choices == ("qkv", "qkv,proj")
    assert decode({"lora_targets": "qkv,proj"}) == {"lora_targets": ["qkv", "proj"]}
    with pytest.raises(XrayfmError, match="low < high"):
        parse_space({"lr": {"low": 0, "high": 1e-3, "log": True}}, "lora")
    with pytest.raises(XrayfmError, match="a range needs a numeric setting"):
        parse_space({"loss": {"low": 0, "high": 1}}, "lora")
    common = {"out": str(tmp_path), "cache": "c", "foundation": "f"}
    with pytest.raises(XrayfmError, match="never on a separate split"):
        TuneConfig(**common, val_split="valid").validate()
    with pytest.raises(XrayfmError, match="cannot tune"):
        TuneConfig(**common, space={"out": ["a", "b"]}).validate()


def test_pruner_stops_a_trial_below_the_median(tmp_path, monkeypatch):
    """adapt's per-epoch metric reaches the pruner, and a pruned trial stops through should_cancel."""
    scripted = {0: [0.8, 0.9, 0.95], 1: [0.3, 0.4, 0.5], 2: [0.85, 0.9, 0.96]}
    seen = []

    def fake_adapt(settings, progress=None, should_cancel=None):
        number = int(settings.out[-4:])
        history, status = [], "completed"
        for epoch, value in enumerate(scripted[number]):
            if should_cancel():
                status = "cancelled"
                break
            progress({"epoch": epoch, "step": 1, "loss": 0.5, "metrics": {}})  # a step: not reported
            history.append({"epoch": epoch, "mean_auroc": value})
            progress({"epoch": epoch, "step": 1, "loss": None, "metrics": history[-1]})
        seen.append((number, len(history), status))
        best = max(h["mean_auroc"] for h in history)
        return {"status": status, "best_metric": best, "best_dir": f"{settings.out}/best", "step": 1}

    monkeypatch.setattr(tuning, "adapt", fake_adapt)
    config = TuneConfig(
        out=str(tmp_path / "tune"),
        cache="unused",
        foundation="unused",
        trials=3,
        space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        prune_startup_trials=1,
        **QUIET,
    )
    result = tune(config)
    # Trial 1 fell below trial 0 at epoch 0 and stopped after it; trial 2 stayed above and finished.
    assert seen == [(0, 3, "completed"), (1, 1, "cancelled"), (2, 3, "completed")]
    states = pd.read_csv(tmp_path / "tune" / "trials.csv")["state"].tolist()
    assert states == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert result["trials"]["pruned"] == 1 and result["best"]["number"] == 2
    assert result["best"]["value"] == 0.96
    study = optuna.load_study(study_name=tuning.STUDY_NAME, storage=f"sqlite:///{tmp_path / 'tune/study.db'}")
    assert study.trials[1].intermediate_values == {0: 0.3}


@pytest.mark.slow
def test_tune_trains_resumes_and_keeps_the_best_checkpoint(foundation, bone_caches, tmp_path, monkeypatch):
    config = TuneConfig(
        out=str(tmp_path / "tune"),
        foundation=str(foundation),
        cache=str(bone_caches[0]),
        trials=3,
        epochs=2,
        batch_size=4,
        max_steps=4,
        n_bootstrap=0,
        val_fraction=0.3,
        space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "lora_rank": [2, 4]},
        prune_startup_trials=1,
        **QUIET,
    )
    result = tune(config)
    out = tmp_path / "tune"
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 3 and set(table["state"]) <= {"COMPLETE", "PRUNED"}
    assert {"params_lr", "params_lora_rank", "value"} <= set(table.columns)
    assert result["trials_run"] == 3 and result["trials_before"] == 0
    best = json.loads((out / "best.json").read_text())
    assert best["number"] in set(table.loc[table["state"] == "COMPLETE", "number"])
    model, meta = load_any(best["checkpoint"])  # the best trial's best/ loads
    assert meta["training"]["lora_rank"] == best["params"]["lora_rank"]
    assert meta["training"]["lr"] == pytest.approx(best["params"]["lr"])
    assert meta["data"]["validation"] == "patient split"  # never a separate (reported) split
    assert (out / "optimization_history.png").stat().st_size > 0
    assert (out / "param_importances.png").stat().st_size > 0
    assert "Hyper-parameter search" in (out / "summary.md").read_text()

    # Rerun: the study is complete, so no trial is trained again.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished study trained again")

    monkeypatch.setattr(tuning, "adapt", refuse)
    again = tune(config)
    assert again["trials_run"] == 0 and again["best"]["number"] == best["number"]
    # Asking for more trials continues the same study; other settings are refused.
    with pytest.raises(XrayfmError, match="other settings"):
        tune(TuneConfig(**{**config.to_dict(), "lr": 0.5}))


@pytest.mark.real_data
@pytest.mark.slow
def test_tune_on_real_mura_humerus(shared_data, foundation, tmp_path):
    root = shared_data / "mura-humerus-64" / "MURA-v1.1"
    config = TuneConfig(
        out=str(tmp_path / "tune"),
        kind="mura",
        root=str(root),
        split="train",
        body_parts=["XR_HUMERUS"],
        foundation=str(foundation),
        trials=2,
        epochs=2,
        max_steps=4,
        batch_size=16,
        n_bootstrap=0,
        space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        **QUIET,
    )
    result = tune(config)
    assert result["trials"]["complete"] + result["trials"]["pruned"] == 2
    best = result["best"]
    _, meta = load_any(best["checkpoint"])
    assert meta["data"]["validation"] == "patient split" and meta["data"]["synthetic"] is False
    assert best["report_metric"] == "study_auroc"  # MURA: the trial's report is study level


def test_tune_help_documents_every_option_and_prints_its_config(capsys):
    from xrayfm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in settings_of(TuneConfig).values():
        if f.name not in {"val_split", "val_cache", "folds", "fold", "resume"}:
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert " ".join(f.help.split()[:3]) in text, f.name
    space = '{"lr": {"low": 1e-4, "high": 1e-2, "log": true}, "lora_rank": [4, 8]}'
    argv = ["tune", "--cache", "c", "--foundation", "f", "--space", space, "--trials", "3", "--print-config"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["trials"] == 3 and printed["space"]["lora_rank"] == [4, 8]
