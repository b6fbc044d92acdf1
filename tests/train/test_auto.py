"""``adapt --method auto``: three candidates on a patient split of the training data, the best retrained as
the run, the choice recorded in the summary and the checkpoint; an interrupted choice resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.train.train_helpers import QUIET
from xrayfm.cli import main
from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.errors import XrayfmError
from xrayfm.train import AdaptConfig, adapt
from xrayfm.train.auto import CANDIDATES, DEFAULT, candidate_dir, choose, decide, lead
from xrayfm.train.config import METHOD_LR, TuneConfig


def _config(out: Path, foundation: Path, caches: tuple[Path, Path], **overrides) -> AdaptConfig:
    train, valid = caches
    settings = dict(
        out=str(out),
        foundation=str(foundation),
        cache=str(train),
        val_cache=str(valid),
        method="auto",
        val_fraction=0.3,
        epochs=1,
        batch_size=8,
        augment=False,
        n_bootstrap=0,
    )
    return AdaptConfig(**{**settings, **QUIET, **overrides})


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_auto_trains_each_candidate_and_retrains_the_best(foundation, bone_caches, tmp_path):
    out = tmp_path / "auto"
    summary = adapt(_config(out, foundation, bone_caches))
    auto = summary["auto"]
    assert set(auto["scores"]) == set(CANDIDATES) and auto["metric"] == "mean_auroc"

    # each candidate: its method at its own learning rate, validated on a patient split of the training
    # data (never on the user's val_cache), scored by its best epoch's metric
    train_cache = CachedDataset(bone_caches[0])
    for method in CANDIDATES:
        run = candidate_dir(out, method)
        meta = _read(run / "best" / "meta.json")
        assert meta["method"] == method and meta["training"]["lr"] == METHOD_LR[method]
        assert meta["data"]["validation"] == "patient split"
        assert meta["data"]["train_cache"]["cache"] == str(bone_caches[0].resolve())
        assert auto["scores"][method] == _read(run / "summary.json")["best_metric"]
        assert not (run / "best" / "domain_gate.json").exists()  # never published: no gate fitted

    # the best is the argmax (ties: the first of lora, full, linear); it is chosen when it is lora, or when
    # its lead over lora is clear
    scores = {m: s for m, s in auto["scores"].items() if s is not None}
    top = max(scores.values())
    assert auto["best"] == next(m for m in CANDIDATES if scores.get(m) == top)
    if auto["best"] == DEFAULT:
        assert auto["chosen"] == DEFAULT and auto["lead"] is None and not auto["kept_default"]
    else:  # its lead over lora was measured; this choice split (a few bone patients) is too small for it
        assert auto["lead"]["units"] < 10 and auto["chosen"] == DEFAULT and auto["kept_default"]

    # the choice split: every training patient on exactly one side, every training image used
    split = auto["split"]
    assert split["validation"] == "patient split" and split["val_fraction"] == 0.3
    assert split["train"]["patients"] + split["val"]["patients"] == train_cache.csv["patient_id"].nunique()
    assert split["train"]["images"] + split["val"]["images"] == len(train_cache)
    assert split["val"]["patients"] >= 1

    # the result: a normal run of the chosen method on the user's split, carrying the choice
    meta = _read(out / "best" / "meta.json")
    assert summary["method"] == meta["method"] == auto["chosen"]
    assert meta["training"]["lr"] == METHOD_LR[auto["chosen"]]
    assert meta["data"]["validation"] == "separate"
    assert meta["data"]["train"]["images"] == len(train_cache)  # retrained on all training images
    assert meta["auto"] == auto == _read(out / "summary.json")["auto"]
    assert _read(out / "auto" / "choice.json") == auto
    assert (out / "report" / "report.json").is_file()


def test_an_interrupted_auto_run_resumes_without_retraining(foundation, bone_caches, tmp_path):
    out = tmp_path / "auto"
    config = _config(out, foundation, bone_caches, epochs=2)
    seen: list[tuple[str, str, int]] = []
    stop = {"flag": False}

    def progress(info: dict) -> None:
        seen.append((info["auto"]["phase"], info["auto"]["method"], info["step"]))
        if info["auto"]["method"] == "full" and info["step"] >= 2:
            stop["flag"] = True

    first = adapt(config, progress=progress, should_cancel=lambda: stop["flag"])
    assert first["status"] == "cancelled" and first["auto"]["running"] == "full"
    assert set(first["auto"]["scores"]) == {"lora"}
    lora = candidate_dir(out, "lora")
    lora_summary = (lora / "summary.json").read_bytes()
    lora_weights = (lora / "best" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert not (out / "best").exists()

    seen.clear()
    stop["flag"] = False
    second = adapt(
        config, progress=lambda info: seen.append((info["auto"]["phase"], info["auto"]["method"], 0))
    )
    assert second["status"] == "completed"
    trained = {method for phase, method, _ in seen if phase == "candidate"}
    assert trained == {"full", "linear"}  # lora was finished: reused, not retrained
    assert (lora / "summary.json").read_bytes() == lora_summary
    assert (lora / "best" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == lora_weights
    full = _read(candidate_dir(out, "full") / "summary.json")
    assert full["resumed_from_step"] == 2 and full["status"] == "completed"  # continued where it stopped
    assert second["auto"]["scores"]["lora"] == first["auto"]["scores"]["lora"]
    assert {phase for phase, _, _ in seen} == {"candidate", "final"}


def test_changed_settings_retrain_a_finished_candidate(foundation, bone_caches, tmp_path):
    out = tmp_path / "auto"
    adapt(_config(out, foundation, bone_caches, max_steps=2))
    seen: list[str] = []
    adapt(
        _config(out, foundation, bone_caches, max_steps=3),
        progress=lambda info: seen.append(info["auto"]["method"]),
    )
    assert set(seen) == set(CANDIDATES)
    for method in CANDIDATES:
        assert _read(candidate_dir(out, method) / "summary.json")["step"] == 3


def test_choose_picks_the_best_defined_score() -> None:
    assert choose({"lora": 0.7, "full": 0.8, "linear": None}, "mean_auroc") == "full"
    assert choose({"lora": 0.8, "full": 0.8, "linear": 0.5}, "mean_auroc") == "lora"  # a tie: the first
    assert choose({"lora": 0.3, "full": 0.2, "linear": 0.4}, "val_loss") == "full"
    assert choose({"lora": float("nan"), "full": None, "linear": 0.1}, "mean_auroc") == "linear"
    with pytest.raises(XrayfmError, match="no candidate has a mean_auroc"):
        choose({"lora": None, "full": None, "linear": None}, "mean_auroc")


def _predictions(out: Path, method: str, y: np.ndarray, p: np.ndarray, patients: np.ndarray) -> None:
    report = candidate_dir(out, method) / "report"
    report.mkdir(parents=True)
    frame = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(y))], "patient_id": patients})
    frame["label/abnormal"], frame["prob/abnormal"] = y, p
    frame.to_csv(report / "predictions.csv", index=False)


@pytest.mark.parametrize(
    ("patients", "same", "kept"),
    [(8, False, "fewer than 10"), (200, True, "within the choice split's noise"), (200, False, None)],
)
def test_the_default_is_kept_unless_the_lead_is_clear(tmp_path, patients, same, kept):
    """full scores above lora by its best epoch. Its lead counts only on 10 patients or more and when its
    paired CI is above 0: 8 patients are too few; on 200, predictions equal to lora's are no lead (the
    paired CI is [0, 0]); better ones on 200 patients are."""
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(patients), 3)
    y = np.repeat(rng.permutation(np.arange(patients) % 2), 3).astype(float)
    good = 1 / (1 + np.exp(-(y + rng.normal(0, 0.8, len(y)))))  # full: AUROC about 0.8
    weak = 1 / (1 + np.exp(-(y + rng.normal(0, 2.0, len(y)))))  # lora: about 0.6
    _predictions(tmp_path, "full", y, weak if same else good, ids)
    _predictions(tmp_path, "lora", y, weak, ids)
    config = AdaptConfig(out=str(tmp_path), method="auto")
    scores = {"lora": 0.6, "full": 0.8, "linear": 0.5}
    chosen, best, margin = decide(tmp_path, scores, config)
    assert best == "full" and margin is not None and margin["of"] == "full" and margin["over"] == DEFAULT
    assert margin["units"] == patients and margin["ci_low"] <= margin["difference"] <= margin["ci_high"]
    if kept:
        assert chosen == DEFAULT and kept in margin["reason"]
    else:
        assert margin["ci_low"] > 0 and chosen == "full" and "above 0" in margin["reason"]
    # the default itself best, or a val_loss choice: the argmax, no lead measured
    assert decide(tmp_path, {**scores, "lora": 0.9}, config) == ("lora", "lora", None)
    val_loss = AdaptConfig(out=str(tmp_path), method="auto", metric="val_loss")
    assert decide(tmp_path, {"lora": 0.5, "full": 0.3, "linear": 0.6}, val_loss) == ("full", "full", None)


def test_a_lead_is_measured_on_studies_when_the_rows_have_them(tmp_path):
    ids = np.repeat(np.arange(40), 2)  # 40 studies of 2 images, one study per patient
    y = np.repeat(np.arange(40) % 2, 2).astype(float)
    for method, p in (("full", 0.2 + 0.6 * y), ("lora", np.full(len(y), 0.5))):
        _predictions(tmp_path, method, y, p, ids)
        file = candidate_dir(tmp_path, method) / "report" / "predictions.csv"
        pd.read_csv(file).assign(study_id=ids).to_csv(file, index=False)
    margin = lead(tmp_path, "full", "lora", n_bootstrap=200, seed=0)
    assert margin is not None and margin["level"] == "study"
    assert margin["difference"] == pytest.approx(0.5)  # 1.0 against a constant's 0.5
    assert lead(tmp_path, "full", "linear", n_bootstrap=200, seed=0) is None  # linear has no predictions


def test_auto_refuses_what_it_cannot_choose_on(foundation, bone_caches, tmp_path):
    with pytest.raises(XrayfmError, match="drop --folds/--fold"):
        _config(tmp_path, foundation, bone_caches, val_cache=None, folds=3, fold=0).validate()
    with pytest.raises(XrayfmError, match="needs --val-fraction > 0"):
        _config(tmp_path, foundation, bone_caches, val_fraction=0.0).validate()
    for method in ("lora", "auto"):  # a plain method and auto are both valid settings
        _config(tmp_path, foundation, bone_caches, method=method).validate()
    tune = {"kind": "mura", "root": str(tmp_path), "out": str(tmp_path / "t"), "foundation": str(foundation)}
    with pytest.raises(XrayfmError, match=r"method 'auto' \(choose one of lora, full, linear, scratch\)"):
        TuneConfig.from_dict({**tune, "method": "auto"})


def test_cli_offers_auto(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "one of lora, full, linear, scratch, auto)" in text
    assert "auto: train lora, full and linear" in text
