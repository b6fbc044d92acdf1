"""The torch-free serving path (xrayfm.inference.onnx_serving) on the shipped model published into a store:
the same answers as OnnxPredictor (probabilities within 1e-5, rollout maps, features, domain verdicts, answer
fields), gradient methods refused with the runtime and the methods it serves, a version without graphs
refused with the way to export them, and the library path and the worker's load serving with torch,
torchvision, timm, peft, scikit-learn, scipy, matplotlib and onnx unimportable (the CPU image has none)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from xrayfm.data.images import read_image  # noqa: E402
from xrayfm.errors import XrayfmError  # noqa: E402
from xrayfm.inference import load_served_model  # noqa: E402
from xrayfm.inference.onnx_serving import (  # noqa: E402
    GraphPredictor,
    GraphsMissing,
    MethodUnavailable,
    load_graph_predictor,
)
from xrayfm.inference.runtime import OnnxPredictor, make_predictor  # noqa: E402
from xrayfm_stack import store as model_store  # noqa: E402
from xrayfm_training.bootstrap import install_shipped  # noqa: E402

SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
BLOCKED = (
    "torch",
    "torchvision",
    "timm",
    "peft",
    "sklearn",
    "scipy",
    "matplotlib",
    "onnx",
)  # none in the CPU image


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    """The shipped model installed into a store as the training worker's first start does (its graphs)."""
    store = tmp_path_factory.mktemp("store")
    ref = install_shipped(store, SHIPPED)
    return model_store.version_dir(store, ref["name"], ref["version"])


def images(shared_data: Path | None = None) -> list[np.ndarray]:
    """Chest X-rays of the model's domain when the data folder has them, and images outside it (a flat
    square, noise, a wide gradient), in several shapes."""
    rng = np.random.default_rng(3)
    made = [
        np.full((90, 90), 128, np.uint8),
        rng.integers(0, 256, (70, 130), dtype=np.uint8),
        np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (60, 1)),
    ]
    if shared_data is None:
        return made
    chest = sorted((shared_data / "kermany-pneumonia" / "chest_xray").rglob("*.jpeg"))[:6]
    return [read_image(p.read_bytes()) for p in chest] + made


def reference(version: Path) -> OnnxPredictor:
    """Today's OnnxPredictor (torch preprocessing, torch model loaded) on the version's stored graph."""
    served = load_served_model(version, device="cpu")
    predictor = make_predictor(
        served, "onnxruntime", quantize="auto", folder=version, graphs=model_store.graphs_record(version)
    )
    assert isinstance(predictor, OnnxPredictor)
    return predictor


def test_answers_like_the_onnx_predictor_on_the_shipped_model(version, shared_data):
    pictures = images(shared_data)
    torch_free = load_graph_predictor(version, model_store.graphs_record(version), quantize="auto")
    before = reference(version)
    assert torch_free.served.model is None and torch_free.runtime == before.runtime == "onnxruntime"
    assert torch_free.runtime_reason == before.runtime_reason
    assert "stored model.onnx" in torch_free.runtime_reason
    assert torch_free.served.info() == before.served.info()
    np.testing.assert_array_equal(torch_free.preprocess(pictures), before.preprocess(pictures).numpy())
    new = torch_free.predict(pictures, method="rollout", draw=True)
    old = before.predict(pictures, method="rollout", draw=True)
    verdicts = set()
    for a, b in zip(new, old, strict=True):
        assert a.prediction == b.prediction and a.explain_method == b.explain_method == "rollout"
        assert a.runtime == b.runtime and a.batch_size == b.batch_size
        for label in b.probabilities:
            assert abs(a.probabilities[label] - b.probabilities[label]) <= 1e-5
        assert abs(a.probability - b.probability) <= 1e-5
        np.testing.assert_allclose(a.features, b.features, atol=1e-5)
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        assert a.domain.to_dict() == b.domain.to_dict()
        verdicts.add(a.domain.in_domain)
    assert False in verdicts  # the made-up images are refused by the gate
    new_maps = torch_free.predict(pictures, method=None, draw=False)
    old_maps = before.predict(pictures, method=None, draw=False)
    for a, b in zip(new_maps, old_maps, strict=True):
        np.testing.assert_allclose(a.model_map, b.model_map, atol=1e-6)
    study = torch_free.decide_study(new)
    assert study == before.decide_study(old)


def test_gradient_methods_are_refused_naming_the_runtime_and_what_it_serves(version):
    predictor = load_graph_predictor(version, model_store.graphs_record(version))
    assert predictor.methods == ("rollout",) and predictor.default_method == "rollout"
    for method in ("grad_rollout", "gradcam", "grad-cam"):
        with pytest.raises(XrayfmError) as caught:
            predictor.predict([np.zeros((64, 64), np.uint8)], method=method)
        message = str(caught.value)
        if method == "grad_rollout":
            assert isinstance(caught.value, MethodUnavailable) and caught.value.kind == "method_unavailable"
            assert "onnxruntime" in message and "serves: rollout" in message
            assert "XRAYFM_RUNTIME=torch" in message
        else:  # a ViT has no Grad-CAM in any runtime
            assert not isinstance(caught.value, MethodUnavailable) and "rollout" in message
    answer = predictor.predict([np.zeros((64, 64), np.uint8)], explain_maps=False)[0]
    assert answer.heatmap is None and answer.explain_method is None


def test_a_version_without_stored_graphs_is_refused_with_the_fix(version, tmp_path):
    copy = shutil.copytree(version, tmp_path / "v", ignore=shutil.ignore_patterns("*.onnx"))
    with pytest.raises(
        GraphsMissing, match=r"model\.onnx is missing.*exports a version's graphs when it publishes"
    ):
        load_graph_predictor(copy, model_store.graphs_record(copy))
    with pytest.raises(GraphsMissing, match="no stored ONNX graphs.*XRAYFM_RUNTIME=torch"):
        load_graph_predictor(copy, None)


def test_a_graph_that_does_not_fit_the_metadata_is_refused(version, tmp_path):
    copy = shutil.copytree(version, tmp_path / "v")
    meta = json.loads((copy / "meta.json").read_text())
    meta["labels"] = ["Pneumonia", "Effusion"]
    (copy / "meta.json").write_text(json.dumps(meta))
    served = load_graph_predictor(version, model_store.graphs_record(version)).served
    with pytest.raises(XrayfmError, match="2 labels"):
        GraphPredictor(type(served)(**{**vars(served), "labels": meta["labels"]}), copy / "model.onnx")


BLOCKER = f"""
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
for name in {BLOCKED!r}:
    sys.modules.pop(name, None)
"""


def run_blocked(code: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter where importing any of BLOCKED raises; the JSON
    it prints last."""
    import os

    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_library_path_serves_without_torch(version):
    out = run_blocked(
        f"""
        import json
        import numpy as np
        from xrayfm.inference.onnx_serving import load_graph_predictor
        from xrayfm_stack.store import graphs_record

        folder = {str(version)!r}
        predictor = load_graph_predictor(folder, graphs_record(folder))
        image = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (100, 1))
        [answer] = predictor.predict([image], method="rollout")
        assert answer.heatmap.shape == image.shape
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        print(json.dumps({{"probabilities": answer.probabilities, "heavy": heavy}}))
        """
    )
    assert out["heavy"] == []
    image = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (100, 1))
    [expected] = reference(version).predict([image], method="rollout")
    for label, p in expected.probabilities.items():
        assert abs(out["probabilities"][label] - p) <= 1e-5


def test_the_worker_loads_and_answers_without_torch(version, tmp_path):
    """The worker's own load (XRAYFM_RUNTIME=onnxruntime) and a batch, with torch unimportable; a version
    without graphs fails to load with the fix in its message."""
    bare = shutil.copytree(version, tmp_path / "bare", ignore=shutil.ignore_patterns("*.onnx"))
    out = run_blocked(
        f"""
        import json
        import numpy as np
        from xrayfm_inference import worker
        from xrayfm_stack.store import ModelRef

        worker._load_model(ModelRef(name="shipped", version="1", path={str(version)!r}))
        [(predictor, result)] = worker._run_batch([np.zeros((64, 64), np.uint8)], True, "rollout")
        try:
            worker._load_model(ModelRef(name="bare", version="1", path={str(bare)!r}))
            error = None
        except Exception as exc:
            error = str(exc)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        info = worker.model_info(predictor)
        print(json.dumps({{"runtime": result.runtime, "reason": info.runtime_reason, "error": error,
                          "map": result.model_map is not None, "heavy": heavy}}))
        """,
        env={"XRAYFM_RUNTIME": "onnxruntime", "XRAYFM_BATCH_MAX": "2", "XRAYFM_WORKER_METRICS_PORT": "0"},
    )
    assert out["heavy"] == [] and out["runtime"] == "onnxruntime" and out["map"]
    assert "stored model.onnx" in out["reason"]
    assert "cannot be served by the onnxruntime runtime" in out["error"]
    assert "XRAYFM_RUNTIME=torch" in out["error"]
