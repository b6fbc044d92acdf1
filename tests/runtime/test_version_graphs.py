"""ONNX graphs stored with a published version: both graphs written with their record and the int8 verdict
measured on the run's own validation images, XRAYFM_QUANTIZE=auto following that verdict, the stored graphs
served without an export at load, and their parity with torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.train.train_helpers import CHEST_LABELS, QUIET, SIZE, TINY_MODEL  # noqa: E402
from xrayfm.inference import Predictor, load_served_model  # noqa: E402
from xrayfm.inference.graphs import (  # noqa: E402
    GRAPH_FILES,
    INT8_MAX_AUROC_LOSS,
    int8_verdict,
    version_graphs,
)
from xrayfm.inference.runtime import make_predictor  # noqa: E402
from xrayfm.utils import sha256_file  # noqa: E402
from xrayfm_stack import store as model_store  # noqa: E402
from xrayfm_stack.settings import InferenceSettings  # noqa: E402
from xrayfm_training.publish import publish_run  # noqa: E402


@pytest.fixture(scope="module")
def run_best(tmp_path_factory) -> Path:
    """best/ of a tiny training run on synthetic chest phantoms, validated on a patient split of its cache."""
    from xrayfm.data import open_dataset
    from xrayfm.data.cache import prepare_cache
    from xrayfm.data.synth import synth_chest
    from xrayfm.train import PretrainConfig, pretrain

    base = tmp_path_factory.mktemp("graphs")
    synth_chest(base / "chest", n=48, seed=1, size=SIZE, progress=False)
    cache = base / "cache"
    prepare_cache(
        open_dataset("chexpert", base / "chest", split="train"), cache, size=SIZE, workers=1, progress=False
    )
    config = PretrainConfig(
        out=str(base / "run"), cache=str(cache), labels=CHEST_LABELS, epochs=1, batch_size=8,
        drop_path_rate=0.0, augment=False, **TINY_MODEL, **QUIET,
    )  # fmt: skip
    pretrain(config)
    return base / "run" / "best"


def test_publish_writes_both_graphs_and_the_int8_verdict(tmp_path, run_best):
    store = tmp_path / "store"
    version, info = publish_run(store, "chest", run_best, job_id="job-1", kind="pretrain")
    folder = model_store.version_dir(store, "chest", version)
    record = json.loads((folder / model_store.VERSION_FILE).read_text())["onnx"]
    assert record == info["onnx"] and model_store.graphs_record(folder) == record
    for quantize, name in GRAPH_FILES.items():
        assert record["files"][quantize] == {"file": name, "sha256": sha256_file(folder / name)}
    assert record["opset"] == 17 and record["exported_from"]["checkpoint_sha256"]
    assert record["exported_from"]["torch"] and record["exported_from"]["onnxruntime"]
    verdict = record["int8"]
    # measured on the very validation images the run chose its checkpoint on: fp32 gives the run's AUROC
    run_auroc = json.loads((run_best / "meta.json").read_text())["metrics"]["mean_auroc"]
    assert verdict["images"] > 0 and verdict["fp32_auroc"] == pytest.approx(run_auroc, abs=1e-6)
    assert verdict["delta"] == pytest.approx(verdict["int8_auroc"] - verdict["fp32_auroc"])
    assert verdict["serve_int8"] is (verdict["delta"] >= -INT8_MAX_AUROC_LOSS)
    assert "validation images" in verdict["reason"]


def test_a_job_that_runs_again_gets_its_version_back_without_exporting_again(tmp_path, run_best, monkeypatch):
    store = tmp_path / "store"
    version, info = publish_run(store, "chest", run_best, job_id="job-1", kind="pretrain")
    import xrayfm.inference.graphs as graphs

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again for a job that had published")

    monkeypatch.setattr(graphs, "version_graphs", no_second_export)
    again, info_again = publish_run(store, "chest", run_best, job_id="job-1", kind="pretrain")
    assert again == version and info_again["onnx"] == info["onnx"]
    assert model_store.version_of_job(store, "chest", "job-1") == version
    assert model_store.version_of_job(store, "chest", "job-2") is None


def test_a_validation_split_that_is_not_the_runs_is_not_measured(tmp_path, run_best):
    import shutil

    best = tmp_path / "best"
    shutil.copytree(run_best, best)
    meta = json.loads((best / "meta.json").read_text())
    meta["data"]["val_rows_sha256"] = "0" * 64  # the run validated on other rows
    (best / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "out").mkdir()
    verdict = version_graphs(best, tmp_path / "out")["int8"]
    assert verdict["serve_int8"] is False and "not the one the run used" in verdict["reason"]
    assert "fp32_auroc" not in verdict


def test_the_int8_rule_is_at_most_0005_auroc_lost():
    measured = {"images": 100, "fp32_auroc": 0.9, "int8_auroc": 0.895}
    assert int8_verdict({**measured, "delta": -0.005})["serve_int8"] is True
    assert int8_verdict({**measured, "delta": 0.01})["serve_int8"] is True
    refused = int8_verdict({**measured, "delta": -0.0051})
    assert refused["serve_int8"] is False and "loses more than 0.005" in refused["reason"]
    assert int8_verdict(None, "no data")["serve_int8"] is False


def stored_version(tmp_path: Path) -> tuple[Path, dict]:
    """A tiny checkpoint folder with its graphs exported into it (no validation data: int8 not measured)."""
    folder = make_tiny_checkpoint(tmp_path / "version", ["Effusion", "Edema"], size=64)
    return folder, version_graphs(folder)


def test_auto_follows_the_verdict_and_serves_the_stored_graphs(tmp_path):
    folder, record = stored_version(tmp_path)
    served = load_served_model(folder, device="cpu")
    cache = tmp_path / "cache"
    assert record["int8"]["serve_int8"] is False
    refused = make_predictor(
        served, "onnxruntime", quantize="auto", cache_dir=cache, folder=folder, graphs=record
    )
    assert refused.runtime == "onnxruntime" and refused.onnx_path == folder / "model.onnx"
    assert "fp32" in refused.runtime_reason and "not measured" in refused.runtime_reason
    allowed = {**record, "int8": {"serve_int8": True, "reason": "int8 loses at most 0.005 mean AUROC"}}
    chosen = make_predictor(
        served, "onnxruntime", quantize="auto", cache_dir=cache, folder=folder, graphs=allowed
    )
    assert chosen.runtime == "onnxruntime-int8" and chosen.onnx_path == folder / "model.int8.onnx"
    assert "stored model.int8.onnx" in chosen.runtime_reason
    forced = make_predictor(
        served, "onnxruntime", quantize="int8", cache_dir=cache, folder=folder, graphs=record
    )
    assert forced.onnx_path == folder / "model.int8.onnx"  # an explicit int8 ignores the verdict
    assert not cache.exists()  # nothing was exported at load


def test_a_changed_or_missing_graph_is_exported_at_load(tmp_path):
    folder, record = stored_version(tmp_path)
    served = load_served_model(folder, device="cpu")
    (folder / "model.onnx").write_bytes(b"not the exported graph")
    predictor = make_predictor(
        served, "onnxruntime", cache_dir=tmp_path / "cache", folder=folder, graphs=record
    )
    assert predictor.onnx_path.parent == tmp_path / "cache" and "exported at load" in predictor.runtime_reason
    plain = make_predictor(served, "onnxruntime", cache_dir=tmp_path / "cache", folder=folder, graphs=None)
    assert "no stored ONNX graphs" in plain.runtime_reason


def test_stored_graphs_match_torch(tmp_path, shared_data):
    from xrayfm.data.images import read_image

    paths = sorted(
        shared_data.glob("chexpert-small-valid/CheXpert-v1.0-small/valid/*/study1/view1_frontal.jpg")
    )
    if len(paths) < 8:
        pytest.skip("CheXpert valid images not found")
    images = [read_image(p.read_bytes()) for p in paths[:8]]
    folder, record = stored_version(tmp_path)
    served = load_served_model(folder, device="cpu")
    torch_predictor = Predictor(served)
    reference = torch_predictor.predict(images)
    batch = torch_predictor.preprocess(images)
    _, torch_maps, _, _ = torch_predictor.run(batch, True, "rollout")
    # the tolerances of test_onnx_runtime.py: fp32 probabilities within 1e-4 and rollout maps correlated
    # >= 0.999; int8 probabilities within 0.05 and maps correlated > 0.9
    for quantize, tolerance, min_corr in (("none", 1e-4, 0.999), ("int8", 0.05, 0.9)):
        predictor = make_predictor(served, "onnxruntime", quantize=quantize, folder=folder, graphs=record)
        assert predictor.onnx_path == folder / GRAPH_FILES[quantize]
        for ref, got in zip(reference, predictor.predict(images), strict=True):
            for label, p in ref.probabilities.items():
                assert abs(got.probabilities[label] - p) <= tolerance, (quantize, label)
        _, maps, _, _ = predictor.run(batch, True, "rollout")
        for t_map, o_map in zip(torch_maps, maps, strict=True):
            assert np.corrcoef(t_map.ravel(), o_map.ravel())[0, 1] >= min_corr, quantize


def test_quantize_auto_is_a_setting():
    assert (
        InferenceSettings.from_env({"XRAYFM_RUNTIME": "onnxruntime", "XRAYFM_QUANTIZE": "auto"}).quantize
        == "auto"
    )
    assert InferenceSettings.from_env({"XRAYFM_QUANTIZE": "auto"}).quantize == "auto"  # torch: fp32 torch
    from xrayfm.errors import XrayfmError

    with pytest.raises(XrayfmError, match="needs XRAYFM_RUNTIME=onnxruntime"):
        InferenceSettings.from_env({"XRAYFM_QUANTIZE": "int8"})
