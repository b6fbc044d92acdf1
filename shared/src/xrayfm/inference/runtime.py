"""Serving runtimes: the served model exported to ONNX once and run with ONNX Runtime, rollout included.

The export (:func:`export_onnx`) wraps the model so that one graph gives the logits, the attention-rollout
maps, the features the domain gate scores (the classifier head's input) and the head-averaged attention
probabilities of every block (outputs ``logits``, ``rollout``, ``features``, ``attn_0`` ... ``attn_{L-1}``): the same maths as :func:`xrayfm.explain.predict_with_rollout` (mean over
heads, no discarding), traced through timm's unfused attention path with the library's own hooks, so the
optimized runtime draws the rollout map too. LoRA adapters are merged into their foundation first (a copy:
the torch model stays as it was, for the methods that need gradients).

Exports are cached in a folder keyed by the checkpoint's sha256 (:func:`cached_onnx`), not written into
the checkpoint's folder: the model store is mounted read-only in the worker containers, identical
checkpoints share one export, and a changed checkpoint can never pick up a stale graph (the key also
holds the input size, the opset, the quantization and the torch version that exported it). A file
appears complete or not at all (written beside, then renamed). A model-store version published by the
training side carries its graphs already (:mod:`xrayfm.inference.graphs`); :func:`make_predictor` serves
those when they are intact and exports only for a version without them.

:class:`OnnxPredictor` is a :class:`~xrayfm.inference.Predictor` whose logits and rollout maps come from
ONNX Runtime; methods that need gradients (``grad_rollout``, ``gradcam``) fall back to the torch model,
and each answer's ``runtime`` says which one served it. A CNN (ResNet, ConvNeXt, DenseNet) is exported
with its logits and features (:class:`LogitsGraph`): ONNX Runtime gives the logits, Grad-CAM (its one method)
runs in torch, and rollout is refused as in torch ("rollout needs a ViT"). Optional int8 dynamic quantization of the weight
matrix products (``quantize="int8"``; the attention products between activations stay in float, so the
attention probabilities stay close).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrayfm.domain.features import capture_features
from xrayfm.errors import XrayfmError
from xrayfm.explain.rollout import (
    attention_modules,
    capture_attention,
    find_vit,
    is_vit,
    rollout_matrix,
    token_relevance_to_map,
)
from xrayfm.inference import Predictor, ServedModel
from xrayfm.inference.graphs import EXPORT_FORMAT
from xrayfm.inference.onnx_serving import ort_session

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
QUANTIZATIONS = ("none", "int8")  # the graphs there are
QUANTIZE_SETTINGS = (*QUANTIZATIONS, "auto")  # what a deployment asks for (auto: the version's verdict)
OPSET = 17


class RolloutGraph(nn.Module):
    """What gets exported: pixels [B, C, S, S] -> (logits [B, L], rollout [B, gh, gw], features [B, D],
    attn_i [B, N, N]...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.vit = find_vit(model)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with (
            capture_attention(self.model, head_fusion="mean") as record,
            capture_features(self.model) as feats,
        ):
            logits = self.model(pixels)
        relevance = rollout_matrix(record.attentions, protect_cls=self.vit.cls_token is not None)
        maps = token_relevance_to_map(relevance, self.vit, (int(pixels.shape[-2]), int(pixels.shape[-1])))
        return (logits, maps, feats.features, *record.attentions)


class LogitsGraph(nn.Module):
    """What gets exported for a model without attention (a CNN): pixels [B, C, S, S] -> (logits [B, L],
    features [B, D])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture_features(self.model) as feats:
            logits = self.model(pixels)
        return logits, feats.features


def mergeable_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` for export: a PEFT (LoRA) model is merged into its base, on the CPU."""
    clone = copy.deepcopy(model).cpu().eval()
    if hasattr(clone, "merge_and_unload"):  # peft.PeftModel: W + BA folded into W, adapters dropped
        clone = clone.merge_and_unload()
    for param in clone.parameters():
        param.requires_grad_(False)
    return clone


def export_onnx(served: ServedModel, path: str | Path, *, opset: int = OPSET) -> Path:
    """Export `served` (merged if LoRA) to an ONNX file at `path`: for a ViT the logits, rollout maps and
    every block's attention as outputs, for a CNN the logits alone; the batch dimension is dynamic."""
    model = mergeable_copy(served.model)
    if is_vit(model):
        graph: nn.Module = RolloutGraph(model).eval()
        blocks = len(attention_modules(model))
        outputs = ["logits", "rollout", "features", *(f"attn_{i}" for i in range(blocks))]
    else:
        graph, outputs = LogitsGraph(model).eval(), ["logits", "features"]
    pre = served.preprocessing
    dummy = torch.zeros(2, pre.channels, pre.size, pre.size)
    path = Path(path)
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the sizes are fixed here
        torch.onnx.export(
            graph,
            (dummy,),
            str(path),
            dynamo=False,  # the TorchScript tracer: runs the library's hooks as they are
            opset_version=opset,
            input_names=["pixels"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["pixels", *outputs]},
            do_constant_folding=True,
        )
    return path


def quantize_int8(source: Path, target: Path) -> Path:
    """int8 dynamic quantization of the products with a weight matrix (MatMul/Gemm whose second input
    is a constant); products between activations (q k^T, attention x v) stay in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    exclude = [
        node.name
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and not (len(node.input) > 1 and node.input[1] in constants)
    ]
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=exclude,
    )
    return target


def cache_key(served: ServedModel, quantize: str = "none", opset: int = OPSET) -> str:
    """The cache file's name: checkpoint sha256, input size, opset, quantization, torch version."""
    torch_version = torch.__version__.split("+")[0]
    pre = served.preprocessing
    return (
        f"{served.sha256[:32]}-s{pre.size}c{pre.channels}-op{opset}-f{EXPORT_FORMAT}-{quantize}"
        f"-torch{torch_version}.onnx"
    )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xrayfm/onnx`` (``~/.cache/xrayfm/onnx``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xrayfm" / "onnx"


def cached_onnx(served: ServedModel, cache_dir: str | Path | None = None, quantize: str = "none") -> Path:
    """The ONNX file for `served` (exported, and quantized, on first use; then read from the cache).

    Written beside its final name and renamed, so concurrent workers exporting the same model at once
    each leave a complete file (the last rename wins; both are the same graph)."""
    if quantize not in QUANTIZATIONS:
        raise XrayfmError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    target = folder / cache_key(served, quantize)
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        fp32 = export_onnx(served, Path(tmp) / "model.onnx")
        made = quantize_int8(fp32, Path(tmp) / "model.int8.onnx") if quantize == "int8" else fp32
        os.replace(made, target)
    facts = {
        "name": served.name,
        "version": served.version,
        "sha256": served.sha256,
        "quantize": quantize,
        "opset": OPSET,
        "torch": torch.__version__,
        "export_s": round(time.perf_counter() - t0, 2),
    }
    target.with_suffix(".json").write_text(json.dumps(facts, indent=2))
    log.info("exported %s/%s to %s in %.1f s", served.name, served.version, target, facts["export_s"])
    return target


class OnnxPredictor(Predictor):
    """Logits and rollout maps from ONNX Runtime; gradient methods (Grad-CAM on a CNN) from the torch model."""

    def __init__(
        self,
        served: ServedModel,
        *,
        cache_dir: str | Path | None = None,
        quantize: str = "none",
        threads: int = 0,
        providers: list[str] | None = None,
        onnx_path: Path | None = None,
    ) -> None:
        """`onnx_path`: a graph exported before (a version's stored one) instead of the cached export."""
        super().__init__(served)
        self.onnx_path = onnx_path or cached_onnx(served, cache_dir, quantize)
        self.session = ort_session(self.onnx_path, threads, providers)
        self.runtime = "onnxruntime" if quantize == "none" else f"onnxruntime-{quantize}"

    def run(
        self, batch: torch.Tensor, explain_maps: bool, method: str | None
    ) -> tuple[torch.Tensor | np.ndarray, np.ndarray | None, str, np.ndarray | None]:
        if explain_maps and self.method(method) != "rollout":
            logits, maps, _, features = super().run(batch, explain_maps, method)  # needs gradients: torch
            return logits, maps, "torch", features
        pixels = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        wanted = ["logits", "features", "rollout"] if explain_maps else ["logits", "features"]
        outputs = self.session.run(wanted, {"pixels": pixels})
        return outputs[0], (outputs[2] if explain_maps else None), self.runtime, outputs[1]


def make_predictor(
    served: ServedModel,
    runtime: str = "torch",
    *,
    quantize: str = "none",
    cache_dir: str | Path | None = None,
    threads: int = 0,
    folder: Path | None = None,
    graphs: dict[str, Any] | None = None,
) -> Predictor:
    """The predictor for a deployment's runtime (``torch`` or ``onnxruntime``) and quantization (``none``,
    ``int8``, or ``auto``: the version's int8 verdict). `folder` and `graphs`: the version's folder and its
    record of stored graphs (:mod:`xrayfm.inference.graphs`), served instead of an export at load when
    intact. The predictor's ``runtime_reason`` says what it serves and why."""
    from xrayfm.inference.graphs import choose_quantize, stored_graph

    if quantize not in QUANTIZE_SETTINGS:
        raise XrayfmError(f"quantize must be one of {QUANTIZE_SETTINGS}, got {quantize!r}")
    if runtime == "torch":
        if quantize not in ("none", "auto"):
            raise XrayfmError(f"quantize={quantize!r} needs the onnxruntime runtime")
        predictor = Predictor(served)
        predictor.runtime_reason = "torch eager (no quantization in torch)"
        return predictor
    if runtime == "onnxruntime":
        if served.device.type != "cpu":
            raise XrayfmError("the onnxruntime runtime runs on the CPU here; set XRAYFM_DEVICE=cpu")
        chosen, why = choose_quantize(quantize, graphs)
        stored, source = (
            stored_graph(folder, graphs, chosen) if folder is not None else (None, "no version folder")
        )
        predictor = OnnxPredictor(
            served, cache_dir=cache_dir, quantize=chosen, threads=threads, onnx_path=stored
        )
        graph = source if stored is not None else f"exported at load ({source})"
        predictor.runtime_reason = f"{why}; graph: {graph}"
        return predictor
    raise XrayfmError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
