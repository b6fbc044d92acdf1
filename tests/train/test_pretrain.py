"""Pre-training end to end on a tiny synthetic cache: outputs, metadata, logs, cancel, safe loading."""

from __future__ import annotations

import csv
import json
import pickle

import pytest
import torch

from tests.train.train_helpers import CHEST_LABELS, QUIET, TINY_MODEL
from xrayfm.errors import XrayfmError
from xrayfm.models.checkpoint import load_checkpoint, load_training_state
from xrayfm.train import PretrainConfig, pretrain
from xrayfm.train.loop import WarmupCosine, make_optimizer


def _config(out, cache, **overrides) -> PretrainConfig:
    settings = dict(
        out=str(out), cache=str(cache), labels=CHEST_LABELS, epochs=1, batch_size=8, augment=False
    )
    return PretrainConfig(**{**settings, **TINY_MODEL, **QUIET, **overrides})


def test_one_epoch_writes_best_and_last_as_safetensors_and_json(chest_cache, tmp_path):
    events = []
    summary = pretrain(_config(tmp_path / "run", chest_cache, tensorboard=True), progress=events.append)
    run = tmp_path / "run"
    assert summary["status"] == "completed"
    assert summary["step"] == summary["total_steps"] == summary["steps_per_epoch"] > 0
    for folder, expected in (
        ("best", {"model.safetensors", "meta.json"}),
        ("last", {"model.safetensors", "state.safetensors", "state.json"}),
    ):
        assert {p.name for p in (run / folder).iterdir()} == expected
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["labels"] == CHEST_LABELS
    assert meta["model"]["name"] == "vit_tiny_patch16_224" and meta["model"]["depth"] == 2
    assert meta["model"]["num_classes"] == 3 and meta["model"]["img_size"] == 32
    assert set(meta["preprocessing"]) >= {"size", "mode", "mean", "std", "channels"}
    manifest = json.loads((chest_cache / "manifest.json").read_text())
    assert meta["data"]["train_cache"]["fingerprint"] == manifest["fingerprint"]
    assert len(meta["manifest_sha256"]) == 64
    assert {"torch", "timm", "xrayfm"} <= set(meta["versions"])
    assert meta["metrics"]["epoch"] == 0 and "mean_auroc" in meta["metrics"]
    # Logs: one row per step, one per epoch, TensorBoard events.
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, summary["step"] + 1))
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # Progress callbacks carry what a worker shows.
    assert {"epoch", "step", "total_steps", "loss", "lr", "metrics", "eta_s"} <= set(events[0])
    assert events[-1]["metrics"]["step"] == summary["step"]
    # The saved model reproduces the validation metric it was saved with.
    model, loaded_meta = load_checkpoint(run / "best")
    assert loaded_meta["metrics"] == meta["metrics"]


def test_cancel_saves_state_and_reports_cancelled(chest_cache, tmp_path):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2  # let two steps run

    summary = pretrain(_config(tmp_path / "run", chest_cache, epochs=2), should_cancel=should_cancel)
    assert summary["status"] == "cancelled" and summary["step"] == 2
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["step"] == 2
    assert not (tmp_path / "run" / "best").exists()  # no epoch finished, so no validation yet


def test_loading_checkpoints_never_unpickles(chest_cache, tmp_path, monkeypatch):
    pretrain(_config(tmp_path / "run", chest_cache))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, _ = load_checkpoint(tmp_path / "run" / "best")
    config = _config(tmp_path / "run", chest_cache)
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(1, 10, 0.1))
    state = load_training_state(tmp_path / "run" / "last", model, optimizer, scheduler)
    assert state["step"] > 0


def test_bad_settings_fail_before_training(chest_cache, tmp_path):
    with pytest.raises(XrayfmError, match="unknown labels"):
        pretrain(_config(tmp_path / "run", chest_cache, labels=["Cardiomegaly", "Nonsense"]))
    with pytest.raises(XrayfmError, match="holds 32 px images"):
        pretrain(_config(tmp_path / "run", chest_cache, size=64))
    with pytest.raises(XrayfmError, match="metric"):
        _config(tmp_path / "run", chest_cache, metric="accuracy").validate()


def test_early_stopping_and_focal_loss(chest_cache, tmp_path):
    # A learning rate so small that the validation ranking cannot improve after the first epoch.
    config = _config(tmp_path / "run", chest_cache, epochs=4, lr=1e-12, early_stopping=1, loss="focal")
    summary = pretrain(config)
    assert summary["status"] == "early_stopped"
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert summary["step"] == 2 * summary["steps_per_epoch"] < summary["total_steps"]
    # Resuming a stopped run does not train on.
    again = pretrain(
        _config(
            tmp_path / "run", chest_cache, epochs=4, lr=1e-12, early_stopping=1, loss="focal", resume=True
        )
    )
    assert again["status"] == "early_stopped" and again["step"] == summary["step"]
