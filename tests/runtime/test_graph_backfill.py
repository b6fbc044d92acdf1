"""Versions published without ONNX graphs get them where torch is (xrayfm_training.graphs), so that the
torch-free CPU worker can serve them: the backfill exports into the version folder, records the graphs in
version.json, leaves intact versions and failed exports alone, and the torch-free path then serves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from xrayfm.inference.graphs import GRAPH_FILES  # noqa: E402
from xrayfm.inference.onnx_serving import GraphsMissing, load_graph_predictor  # noqa: E402
from xrayfm_stack import store as model_store  # noqa: E402
from xrayfm_training import graphs  # noqa: E402
from xrayfm_training.bootstrap import install_shipped  # noqa: E402

SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"


def strip_graphs(folder: Path) -> None:
    """What a release that did not export graphs at publish left: no files, no record."""
    for name in GRAPH_FILES.values():
        (folder / name).unlink()
    info = json.loads((folder / model_store.VERSION_FILE).read_text())
    info.pop("onnx")
    (folder / model_store.VERSION_FILE).write_text(json.dumps(info))


@pytest.mark.slow
def test_a_version_without_graphs_gets_them_and_is_served_without_torch(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ref = install_shipped(store, SHIPPED)
    folder = model_store.version_dir(store, ref["name"], ref["version"])
    exported = load_graph_predictor(folder, model_store.graphs_record(folder)).predict(
        [np.full((64, 64), 120, np.uint8)]
    )
    assert graphs.backfill(store) == []  # intact graphs: nothing to do

    strip_graphs(folder)
    with pytest.raises(GraphsMissing):
        load_graph_predictor(folder, model_store.graphs_record(folder))
    listed = graphs.backfill(store, dry_run=True)
    assert [o["version"] for o in listed] == [f"{ref['name']}/{ref['version']}"] and "error" not in listed[0]
    assert not (folder / GRAPH_FILES["none"]).exists()  # a dry run exports nothing

    outcome = graphs.backfill(store)
    assert len(outcome) == 1 and "error" not in outcome[0], outcome
    assert not list(folder.glob(".graphs-*"))  # the work folder is gone
    record = model_store.graphs_record(folder)
    assert record is not None and record["int8"]["reason"]
    again = load_graph_predictor(folder, record).predict([np.full((64, 64), 120, np.uint8)])
    assert again[0].probabilities == pytest.approx(exported[0].probabilities, abs=1e-5)
    assert graphs.backfill(store) == []


def test_a_version_whose_export_failed_at_publish_is_left_alone(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "store" / model_store.MODELS_DIR / "m" / "1"
    folder.mkdir(parents=True)
    (folder / model_store.VERSION_FILE).write_text(
        json.dumps({"onnx": {"error": "RuntimeError: unsupported"}})
    )
    assert graphs.needs_graphs(folder) is None
    (folder / model_store.VERSION_FILE).write_text(json.dumps({}))
    assert graphs.needs_graphs(folder)  # no record at all: it needs them
