"""Adaptation with each method, LoRA's trainable fraction, label subsampling by study, MURA-style reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.train.train_helpers import QUIET
from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.models.backbones import create_model
from xrayfm.models.lora import LoraSettings, apply_lora
from xrayfm.train import AdaptConfig, adapt
from xrayfm.train.artifacts import load_any
from xrayfm.train.config import METHOD_LR
from xrayfm.train.data import load_task_data, subsample, subsample_labelled
from xrayfm.train.distributed import env_from_environ
from xrayfm.train.sampler import RawImage, SeededView


def _config(out, foundation, caches, **overrides) -> AdaptConfig:
    train, valid = caches
    settings = dict(
        out=str(out),
        foundation=str(foundation),
        cache=str(train),
        val_cache=str(valid),
        epochs=1,
        batch_size=8,
        augment=False,
        n_bootstrap=20,
    )
    return AdaptConfig(**{**settings, **QUIET, **overrides})


def _backbone(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if not k.startswith("head.")}


@pytest.mark.parametrize("method", ["lora", "full", "linear", "scratch"])
def test_each_method_trains_saves_and_reports(method, foundation, bone_caches, tmp_path):
    summary = adapt(_config(tmp_path / method, foundation, bone_caches, method=method, max_steps=3))
    run = tmp_path / method
    assert summary["status"] == "completed" and summary["step"] == 3
    assert summary["labels"] == ["Abnormal"]
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["method"] == method and meta["task"] == "binary"
    assert meta["training"]["lr"] == METHOD_LR[method]  # no --lr: the method's own
    assert (
        meta["foundation"]["sha256"]
        == json.loads((foundation / "meta.json").read_text())["weights"]["sha256"]
    )

    report = json.loads((run / "report" / "report.json").read_text())
    valid = CachedDataset(bone_caches[1])
    assert report["kind"] == "binary"
    assert report["n_studies"] == valid.csv["study_id"].nunique()
    assert "auroc" in report["overall"]["study"]["auroc"]
    assert set(report["groups"]) == set(valid.csv["body_part"])
    assert summary["report"]["metric"] == "study_auroc"
    assert (run / "report" / "roc_curves.png").stat().st_size > 0
    points = report["operating_points"]["Abnormal"]  # candidate thresholds, per image and per study
    assert {o["rule"] for o in points["image"]} >= {"youden", "sensitivity>=0.95", "specificity>=0.95"}
    assert all(0 <= o["threshold"] <= 1 and o["sensitivity"] >= 0.95 for o in points["study"][1:2])
    assert "## Operating points" in (run / "report" / "report.md").read_text()

    model, _ = load_any(run / "best")
    trained = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    base = _backbone(load_file(str(foundation / "model.safetensors")))
    if method == "lora":
        # the adapter alone (no foundation copy), and the version's domain gate
        assert {p.name for p in (run / "best").iterdir()} == {
            "adapter", "meta.json", "domain_gate.json", "domain_gate.safetensors"
        }  # fmt: skip
        adapter = (run / "best" / "adapter" / "adapter_model.safetensors").stat().st_size
        assert adapter < (foundation / "model.safetensors").stat().st_size / 4
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # the adapter learnt
    else:
        weights = _backbone(load_file(str(run / "best" / "model.safetensors")))
        same = [torch.equal(weights[k], base[k]) for k in base]
        if method == "linear":
            assert all(same)  # frozen backbone
        else:
            assert not any(same[:1]) and sum(same) < len(same) // 2  # trained (full) or random (scratch)


def test_lora_trainable_fraction_is_what_peft_counts(foundation, bone_caches, tmp_path):
    settings = dict(method="lora", lora_rank=4, lora_alpha=8, lora_targets=["qkv", "fc1"], max_steps=1)
    summary = adapt(_config(tmp_path / "run", foundation, bone_caches, **settings))
    spec = {**json.loads((foundation / "meta.json").read_text())["model"], "num_classes": 1}
    peft_model = apply_lora(create_model(**spec), LoraSettings(4, 8, 0.1, ("qkv", "fc1")))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert summary["trainable"]["trainable"] == trainable
    assert summary["trainable"]["fraction"] == pytest.approx(trainable / total, rel=1e-12)
    # By hand: per block, qkv (48 -> 144) and fc1 (48 -> 192) get A [r, in] + B [out, r]; head 48 + 1.
    depth, r = spec["depth"], 4
    assert trainable == depth * (r * 48 + 144 * r + r * 48 + 192 * r) + 48 + 1


def test_label_fraction_keeps_whole_studies(bone_caches, foundation, tmp_path):
    base = CachedDataset(bone_caches[0], transform=RawImage())
    view = SeededView(base, RawImage())
    half = subsample(view, 0.5, None, "study_id", seed=3)
    studies = base.csv["study_id"]
    kept = set(half.csv["study_id"])
    assert len(kept) == round(0.5 * studies.nunique())
    assert (
        sorted(half.rows.tolist()) == np.flatnonzero(studies.isin(kept)).tolist()
    )  # every image of a kept study
    assert set(subsample(view, 0.5, None, "study_id", seed=3).csv["study_id"]) == kept  # seeded
    assert set(subsample(view, 0.5, None, "study_id", seed=4).csv["study_id"]) != kept
    assert subsample(view, None, 3, "study_id", seed=0).csv["study_id"].nunique() == 3
    # Through adapt: the run records the subsampled training set; validation is untouched.
    summary = adapt(_config(tmp_path / "run", foundation, bone_caches, label_fraction=0.5, max_steps=1))
    assert summary["data"]["train"]["studies"] == len(kept)
    assert summary["data"]["val"]["images"] == len(CachedDataset(bone_caches[1]))


def test_a_validation_split_of_the_training_data_comes_from_the_labelled_share(
    bone_caches, foundation, tmp_path
):
    """With few labels (label_fraction) and no separate validation set, the patient split is drawn from
    the kept studies only: both sides together hold the share a run is told it has, none beyond it."""
    base = CachedDataset(bone_caches[0], transform=RawImage())
    config = _config(tmp_path / "run", foundation, bone_caches, val_cache=None, val_fraction=0.3)
    data = load_task_data(config, env_from_environ(), [0.5], [0.25])
    few = subsample_labelled(data, 0.5, None, "study_id", seed=3)
    studies = base.csv["study_id"].to_numpy()
    pool = SeededView(base, RawImage(), rows=np.concatenate([data.train.rows, data.val.rows]))
    kept = set(subsample(pool, 0.5, None, "study_id", seed=3).csv["study_id"])
    train, val = set(studies[few.train.rows]), set(studies[few.val.rows])
    assert train | val == kept and not train & val and val  # the share, split between the two sides
    assert set(few.val.rows) <= set(data.val.rows) and set(few.train.rows) <= set(data.train.rows)
    # a separate validation set stays whole
    separate = load_task_data(
        _config(tmp_path / "sep", foundation, bone_caches), env_from_environ(), [0.5], [0.25]
    )
    assert len(subsample_labelled(separate, 0.5, None, "study_id", seed=3).val) == len(separate.val)


def test_predictions_file_lines_up_with_the_report(foundation, bone_caches, tmp_path):
    adapt(_config(tmp_path / "run", foundation, bone_caches, method="linear", max_steps=2, n_bootstrap=0))
    predictions = pd.read_csv(tmp_path / "run" / "report" / "predictions.csv")
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    from sklearn.metrics import roc_auc_score

    by_study = predictions.groupby("study_id").agg(y=("label/Abnormal", "first"), p=("prob/Abnormal", "mean"))
    expected = roc_auc_score(by_study["y"], by_study["p"])
    assert report["overall"]["study"]["auroc"]["auroc"] == pytest.approx(expected)
