"""An ``adapt`` job with ``method: auto``: its spec is accepted (and auto's own refusals are made at
submission), and the training worker runs it in process (real Redis job records, skipped without one):
the three candidates, then the chosen method published with the choice in its meta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_tiny_checkpoint
from xrayfm.errors import XrayfmError
from xrayfm_stack.spec import validate_spec

SIZE = 32


def _images(folder: Path, per_class: int = 24) -> Path:
    """Generated grey images in class folders ``negative`` / ``positive`` (brighter), seeded."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("negative", "positive")):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(90 + 60 * k, 30, (SIZE, SIZE)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")
    return folder


def _config(data: Path, **overrides) -> dict:
    return {"kind": "folder", "root": str(data / "images"), "foundation": str(data / "foundation"),
            "method": "auto", "labels": ["positive"], "epochs": 1, "batch_size": 8, "n_bootstrap": 0,
            "val_fraction": 0.25, "device": "cpu", "progress_bar": False, "tensorboard": False,
            **overrides}  # fmt: skip


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """A data folder holding the images and a tiny foundation."""
    folder = tmp_path / "data"
    _images(folder / "images")
    make_tiny_checkpoint(folder / "foundation", ["Finding"], SIZE)
    return folder


def test_an_auto_adapt_spec_is_accepted(data: Path) -> None:
    spec = validate_spec({"kind": "adapt", "name": "auto-m", "config": _config(data)}, None, [data])
    assert spec["config"]["method"] == "auto"
    for bad, says in (
        ({"folds": 3, "fold": 0}, "drop --folds/--fold"),
        ({"val_fraction": 0.0}, "val-fraction"),
    ):
        with pytest.raises(XrayfmError, match=says):
            validate_spec({"kind": "adapt", "config": _config(data, **bad)}, None, [data])


def test_training_worker_runs_an_auto_adapt_job(data: Path, records, tmp_path: Path) -> None:
    from xrayfm_stack.settings import TrainingSettings
    from xrayfm_training.worker import run_job

    store = tmp_path / "store"
    settings = TrainingSettings.from_env({}).model_copy(
        update={"model_store": store, "runs_dir": tmp_path / "runs"}
    )
    spec = validate_spec({"kind": "adapt", "name": "auto-m", "config": _config(data)}, store, [data])
    job_id = records.create(spec)
    assert run_job(job_id, settings, records) == {
        "status": "done",
        "model": {"name": "auto-m", "version": "1"},
    }

    run = tmp_path / "runs" / job_id
    choice = json.loads((run / "auto" / "choice.json").read_text())
    assert set(choice["scores"]) == {"lora", "full", "linear"}
    for method in ("lora", "full", "linear"):
        assert (run / "auto" / method / "best" / "meta.json").is_file()
    meta = json.loads((store / "models" / "auto-m" / "1" / "meta.json").read_text())
    assert meta["method"] == choice["chosen"] and meta["auto"] == choice  # the version carries the choice
    version = json.loads((store / "models" / "auto-m" / "1" / "version.json").read_text())
    assert version["method"] == choice["chosen"]
    assert version["lineage"]["auto"] == choice  # and its lineage: what /models shows
