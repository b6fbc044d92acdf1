"""The ``calibrate`` job kind: its spec checked at submission (accepted; a bad method or a path outside the
data folders refused, naming the field) and a calibrate job run by the training worker in process (real
Redis job records, skipped without one) on a tiny model and generated images, published as the next version
of the model's name."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_tiny_checkpoint
from xrayfm.errors import XrayfmError
from xrayfm_stack import store as model_store
from xrayfm_stack.spec import validate_spec

SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"


def _site(folder: Path, per_class: int = 40, size: int = 32) -> Path:
    """Generated grey images in class folders ``negative`` / ``positive`` (brighter), seeded."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("negative", "positive")):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(90 + 60 * k, 30, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")
    return folder


@pytest.fixture()
def stack_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data folder holding the site, model store with m/1 = a tiny one-label model, the site)."""
    data, store = tmp_path / "data", tmp_path / "store"
    site = _site(data / "site")
    model = make_tiny_checkpoint(tmp_path / "tiny", ["Abnormal"], 32)
    assert model_store.add_version(store, "m", model, {"job_id": "seed", "kind": "pretrain"}) == "1"
    return data, store, site


def test_calibrate_spec_is_validated(stack_files, tmp_path: Path) -> None:
    data, store, site = stack_files
    spec = validate_spec({"kind": "calibrate", "config": {"model": "store:m/1", "data": [f"folder:{site}:train"],
                          "eval_data": [f"folder:{site}"]}}, store, [data])  # fmt: skip
    assert spec["name"] == "m"  # published as the next version of the model it calibrates
    assert spec["config"]["data"] == [f"folder:{site.resolve()}:train"]
    assert spec["config"]["eval_data"] == [f"folder:{site.resolve()}"]
    assert spec["config"]["method"] == "auto" and spec["config"]["out"] is None
    shipped = validate_spec({"kind": "calibrate", "config": {"model": SHIPPED, "data": [f"folder:{site}"]}},
                            store, [data])  # fmt: skip
    assert shipped["name"] == "cxr-vit-tiny-mae-pneumonia-lora"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (data / "link").symlink_to(outside)
    ok = {"model": "store:m/1", "data": [f"folder:{site}"]}
    refused = [
        ({**ok, "method": "bogus"}, "method 'bogus'"),
        ({**ok, "rule": "accuracy"}, "rule 'accuracy'"),
        ({**ok, "eval_fraction": 1.0}, "eval_fraction=1.0"),
        ({**ok, "data": [f"folder:{outside}"]}, f"data[0] '{outside}' is outside the data folders"),
        ({**ok, "data": [f"folder:{data / 'link'}:val"]}, "data[0]"),  # a symlink out of the data folders
        ({**ok, "eval_data": [f"folder:{outside}"]}, "eval_data[0]"),
        ({**ok, "model": str(outside)}, f"model '{outside}' is outside the data folders"),
        ({**ok, "model": "store:m/9"}, "no version m/9"),
        ({**ok, "out": str(data)}, "may not set ['out']"),
        ({**ok, "data": "folder:/x"}, "data (str, expected list[str])"),
    ]
    for config, field in refused:
        with pytest.raises(XrayfmError, match=re.escape(field)):
            validate_spec({"kind": "calibrate", "config": config}, store, [data])


def test_training_worker_runs_a_calibrate_job(stack_files, records, tmp_path: Path) -> None:
    from xrayfm.inference import load_served_model
    from xrayfm_stack.settings import TrainingSettings
    from xrayfm_training.worker import run_job

    data, store, site = stack_files
    settings = TrainingSettings.from_env({}).model_copy(
        update={"model_store": store, "runs_dir": tmp_path / "runs"}
    )
    spec = validate_spec({"kind": "calibrate", "config": {
        "model": "store:m/1", "data": [f"folder:{site}"], "label": "positive", "method": "temperature",
        "n_bootstrap": 20, "device": "cpu"}}, store, [data])  # fmt: skip
    job_id = records.create(spec)
    assert run_job(job_id, settings, records) == {"status": "done", "model": {"name": "m", "version": "2"}}

    job = records.get(job_id)
    assert job["status"] == "done" and job["model"] == {"name": "m", "version": "2"}, job
    result = job["result"]
    assert result["method"] == "temperature" and math.isfinite(result["value"])
    assert "no domain gate" in result["gate"]["note"]  # the tiny model has none: skipped, said so
    version = json.loads((store / "models/m/2/version.json").read_text())
    assert version["kind"] == "calibrate" and version["job_id"] == job_id
    assert version["lineage"]["calibrated_from"]["version"] == "1"
    assert version["lineage"]["calibrated_from"]["name"] == "m"
    served = load_served_model(store / "models/m/2", "cpu")
    assert served.info()["calibrated"] is True and served.calibration.method == "temperature"
    assert served.threshold_source.startswith("youden on 56 site images")
    assert (store / "models/m/2/report/reliability.png").is_file()
    assert load_served_model(store / "models/m/1", "cpu").calibration is None  # the source is untouched
