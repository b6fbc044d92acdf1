"""Exact resume: a run killed after step k, resumed from its last saved state, ends with the same weights."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from tests.train.train_helpers import CHEST_LABELS, QUIET, TINY_MODEL
from xrayfm.errors import XrayfmError
from xrayfm.train import PretrainConfig, pretrain


class Killed(Exception):
    """Stands for SIGKILL: the loop gets no chance to save anything."""


def _config(out, cache, **overrides) -> PretrainConfig:
    # Augmentation and stochastic depth on: the data order, the augmentation and the dropout RNG all matter.
    settings = dict(
        out=str(out),
        cache=str(cache),
        labels=CHEST_LABELS,
        epochs=3,
        batch_size=8,
        augment=True,
        drop_path_rate=0.2,
        save_every=2,
        warmup_fraction=0.2,
    )
    return PretrainConfig(**{**settings, **TINY_MODEL, **QUIET, **overrides})


def _kill_after(k: int):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        if len(calls) > k:  # called before each step: this is the call before step k + 1
            raise Killed
        return False

    return should_cancel


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_matches_uninterrupted_run(chest_cache, tmp_path):
    reference = pretrain(_config(tmp_path / "ref", chest_cache))
    per_epoch = reference["steps_per_epoch"]
    assert reference["total_steps"] == 3 * per_epoch and per_epoch >= 3
    kill_at = per_epoch + 3  # mid second epoch; last save (every 2 steps) is one step earlier
    assert kill_at % 2 == 1

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        pretrain(_config(run, chest_cache), should_cancel=_kill_after(kill_at))
    saved = _weights(run)  # the state the resume starts from: far from the final weights
    assert any(not torch.allclose(saved[n], w, atol=1e-4) for n, w in _weights(tmp_path / "ref").items())
    steps_logged = [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert steps_logged[-1] == kill_at  # the killed run got past its last saved state

    resumed = pretrain(_config(run, chest_cache, resume=True))
    assert resumed["resumed_from_step"] == kill_at - 1
    assert resumed["step"] == reference["step"]

    ref_w, res_w = _weights(tmp_path / "ref"), _weights(run)
    assert ref_w.keys() == res_w.keys()
    for name in ref_w:
        assert torch.allclose(ref_w[name], res_w[name], rtol=0, atol=1e-6), name
    # The resumed run's logs read like an uninterrupted run's: each step once, each epoch once.
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert steps == list(range(1, reference["step"] + 1))
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert epochs == [0, 1, 2]
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx(
        [h["val_loss"] for h in reference["history"]]
    )


def test_resume_refuses_other_settings(chest_cache, tmp_path):
    pretrain(_config(tmp_path / "run", chest_cache, epochs=1), should_cancel=lambda: False)
    with pytest.raises(XrayfmError, match="cannot resume"):
        pretrain(_config(tmp_path / "run", chest_cache, epochs=1, batch_size=4, resume=True))


def test_resume_of_a_finished_run_does_no_more_steps(chest_cache, tmp_path):
    first = pretrain(_config(tmp_path / "run", chest_cache, epochs=1))
    again = pretrain(_config(tmp_path / "run", chest_cache, epochs=1, resume=True))
    assert again["resumed_from_step"] == again["step"] == first["step"]
    assert again["history"] == first["history"]
