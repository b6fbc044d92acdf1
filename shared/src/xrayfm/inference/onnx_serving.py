"""Serving without torch: a model version's stored ONNX graph run with ONNX Runtime, read with numpy, PIL,
safetensors' numpy API and onnxruntime only.

A version published by the training side carries its graphs (``model.onnx``, ``model.int8.onnx``;
:mod:`xrayfm.inference.graphs`): the LoRA adapter merged in, outputs ``logits``, ``rollout``, ``features``
and ``attn_i``. :func:`load_graph_predictor` reads the version folder's ``meta.json`` (labels,
preprocessing, activation), its calibration, operating point and domain gate with the library's own
torch-free readers, picks the graph as :func:`~xrayfm.inference.graphs.choose_quantize` says and
answers like :class:`~xrayfm.inference.runtime.OnnxPredictor` (same probabilities, rollout maps, domain
verdicts and answer fields). What it cannot do: methods that need gradients (``grad_rollout``,
``gradcam``) raise :class:`MethodUnavailable`, naming the runtime and the methods it serves; a version
without intact stored graphs raises :class:`GraphsMissing`, saying how to export them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.data.images import fit_square
from xrayfm.errors import XrayfmError
from xrayfm.explain.methods import CLASS_SPECIFIC_METHODS, canonical_method
from xrayfm.inference import PredictorBase, Preprocessing, ServedModel
from xrayfm.inference.graphs import GRAPH_FILES, choose_quantize, stored_graph
from xrayfm.registry import resolve_checkpoint_dir

RUNTIME = "onnxruntime"
GRADIENT_METHODS = CLASS_SPECIFIC_METHODS  # grad_rollout, gradcam: they need torch's autograd
CHECKPOINT_FORMATS = ("xrayfm.checkpoint", "xrayfm.adapted")
EXPORT_HINT = (
    "the training worker exports a version's graphs when it publishes it, and for versions without them "
    "when it starts (or `python -m xrayfm_training.graphs` in its container; a failed export is in its "
    "log); or serve {folder} with XRAYFM_RUNTIME=torch (the torch image of docker-compose.gpu.yml)"
)


class MethodUnavailable(XrayfmError):
    """An explanation method the model has but this runtime cannot compute (it needs gradients)."""

    kind = "method_unavailable"  # the rejection's type (the gateway answers 422 with it)


class GraphsMissing(XrayfmError):
    """A version this torch-free runtime cannot serve: it has no intact stored ONNX graph."""


def ort_session(path: str | Path, threads: int = 0, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session with every graph optimisation, `threads` intra-op threads (0 = ORT's
    default) and one inter-op thread (the graph is a chain; the batcher runs one batch at a time)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(0, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's ``meta.json`` (a full or an adapted checkpoint), checked for its format."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise XrayfmError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") not in CHECKPOINT_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise XrayfmError(f"{path} is not a checkpoint's metadata (format: {found!r})")
    return meta


def read_served(path: str | Path, *, name: str | None = None, version: str | None = None) -> ServedModel:
    """A version folder's facts as a :class:`ServedModel` without its torch model (``model`` None, on the
    CPU): labels, preprocessing, activation, operating point, calibration and domain gate, read as
    :func:`~xrayfm.inference.eager.load_served_model` reads them."""
    folder = resolve_checkpoint_dir(path)
    return ServedModel.from_checkpoint(folder, read_meta(folder), None, "cpu", name, version)


def normalization(pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(gain, offset) [C, 1, 1] float32 with ``pixels = uint8 * gain + offset``: the arithmetic of
    :class:`xrayfm.data.transforms.GreyToNormalized` (one mean/std value repeats over the channels)."""

    def per_channel(values: tuple[float, ...], what: str) -> np.ndarray:
        if len(values) == pre.channels or len(values) == 1:
            return np.broadcast_to(np.asarray(values, np.float32), (pre.channels,)).copy()
        if pre.channels == 1:
            return np.asarray([sum(values) / len(values)], np.float32)
        raise XrayfmError(f"{what} has {len(values)} values but the model takes {pre.channels} channels")

    mean, std = per_channel(pre.mean, "mean"), per_channel(pre.std, "std")
    if (std <= 0).any():
        raise XrayfmError(f"std must be positive, got {std.tolist()}")
    gain = (np.float32(1.0) / std) / np.float32(255.0)
    offset = -mean / std
    return gain.reshape(-1, 1, 1), offset.reshape(-1, 1, 1)


class GraphPredictor(PredictorBase):
    """Answers from a stored ONNX graph with ONNX Runtime: logits, features and, for a ViT, rollout maps.
    No torch: gradient methods raise :class:`MethodUnavailable`."""

    def __init__(
        self,
        served: ServedModel,
        path: str | Path,
        *,
        quantize: str = "none",
        threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__(served)
        self.onnx_path = Path(path)
        self.session = ort_session(self.onnx_path, threads, providers)
        self.runtime = RUNTIME if quantize == "none" else f"{RUNTIME}-{quantize}"
        self.outputs = [output.name for output in self.session.get_outputs()]
        # what the model has (a ViT's graph carries its rollout; a CNN's does not), its default first
        self.model_methods = ("rollout", "grad_rollout") if "rollout" in self.outputs else ("gradcam",)
        self.gain, self.offset = normalization(served.preprocessing)
        self._check_graph()

    def _check_graph(self) -> None:
        """The graph takes the metadata's input size and gives one logit per label (caught at load)."""
        pre, served = self.served.preprocessing, self.served
        shape = list(self.session.get_inputs()[0].shape)
        if shape[1:] != [pre.channels, pre.size, pre.size]:
            raise XrayfmError(
                f"{self.onnx_path.name} takes {shape[1:]}, but {served.name}'s metadata says "
                f"{[pre.channels, pre.size, pre.size]}"
            )
        logits = self.session.get_outputs()[self.outputs.index("logits")].shape
        if len(logits) != 2 or (isinstance(logits[1], int) and logits[1] != len(served.labels)):
            raise XrayfmError(
                f"{self.onnx_path.name} outputs logits {logits}, but its metadata lists {len(served.labels)} labels"
            )

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods served here: the model's that need no gradients (a ViT: rollout; a CNN: none)."""
        return tuple(m for m in self.model_methods if m not in GRADIENT_METHODS)

    @property
    def default_method(self) -> str:
        """The model's own default (rollout for a ViT, gradcam for a CNN, which this runtime refuses)."""
        return self.model_methods[0]

    def method(self, method: str | None) -> str:
        """As :meth:`PredictorBase.method`; a method the model has but that needs gradients raises
        :class:`MethodUnavailable`, naming this runtime and what it serves."""
        name = self.default_method if method is None else canonical_method(method)
        if name in self.model_methods and name not in self.methods:
            served = ", ".join(self.methods) or "no explanation maps for this model (ask with explain=false)"
            raise MethodUnavailable(
                f"{name} needs gradients, which this worker's runtime ({RUNTIME}, without torch) does not "
                f"compute; it serves: {served}. A worker with XRAYFM_RUNTIME=torch serves {name}"
            )
        return super().method(method)

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 H x W images -> a normalised float32 batch [B, C, S, S] (numpy)."""
        pre = self.served.preprocessing
        grey = np.stack([fit_square(img, pre.size, pre.mode) for img in images])[:, None]
        return grey.astype(np.float32) * self.gain + self.offset

    def run(
        self, batch: np.ndarray, explain_maps: bool, method: str | None
    ) -> tuple[np.ndarray, np.ndarray | None, str, np.ndarray | None]:
        if explain_maps:
            self.method(method)
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        wanted = ["logits", "features", "rollout"] if explain_maps else ["logits", "features"]
        outputs = self.session.run(wanted, {"pixels": pixels})
        return outputs[0], (outputs[2] if explain_maps else None), self.runtime, outputs[1]


def load_graph_predictor(
    folder: str | Path,
    graphs: dict[str, Any] | None,
    *,
    quantize: str = "auto",
    threads: int = 0,
    providers: list[str] | None = None,
    name: str | None = None,
    version: str | None = None,
) -> GraphPredictor:
    """The torch-free predictor of a version `folder` whose record of stored graphs is `graphs` (the
    store's ``version.json`` ``onnx``): ``quantize`` none, int8 or auto (the version's int8 verdict).
    :class:`GraphsMissing` when the graph it needs is absent or changed. ``runtime_reason`` says which
    graph serves and why."""
    if quantize not in (*GRAPH_FILES, "auto"):
        raise XrayfmError(f"quantize must be one of {(*GRAPH_FILES, 'auto')}, got {quantize!r}")
    folder = resolve_checkpoint_dir(folder)
    served = read_served(folder, name=name, version=version)
    chosen, why = choose_quantize(quantize, graphs)
    path, source = stored_graph(folder, graphs, chosen)
    if path is None:
        raise GraphsMissing(
            f"model {served.name}/{served.version} cannot be served by the {RUNTIME} runtime (no torch): "
            f"{source}. To fix: {EXPORT_HINT.format(folder=folder)}"
        )
    predictor = GraphPredictor(served, path, quantize=chosen, threads=threads, providers=providers)
    predictor.runtime_reason = f"{why}; graph: {source}"
    return predictor


__all__ = [
    "GraphPredictor",
    "GraphsMissing",
    "MethodUnavailable",
    "load_graph_predictor",
    "ort_session",
    "read_served",
]
