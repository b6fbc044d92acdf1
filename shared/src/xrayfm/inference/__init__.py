"""Inference with a trained checkpoint: load it once, preprocess grey images as its metadata says, predict,
explain (one forward pass for rollout) and turn outputs into typed answers (:class:`PredictionResult`):
probabilities, the decision and a heatmap on the image's own geometry. Shared by `xrayfm explain` and the
inference worker service (which encodes the heatmap for its transport).

Checkpoints are read with ``xrayfm.models.checkpoint`` (safetensors + JSON, never unpickled): a full model
or a LoRA adapter over its foundation. From ``meta.json`` inference reads ``labels``, ``preprocessing``
{size, mean, std, channels, mode} and, optionally, ``threshold`` (0.5; an ``operating_point.json`` in the
folder takes precedence, see :mod:`xrayfm.operating_point`), ``negative_label`` ("Normal"),
``activation`` ("sigmoid" | "softmax"), ``name``/``version``, ``synthetic`` (true for models trained on
phantoms), ``intended_use`` (the notice every answer carries; :data:`RESEARCH_USE` when absent).

This module is torch-free: the answers' types, the served model's facts (:class:`ServedModel`) and what
every predictor shares (:class:`PredictorBase`: images into answers, decisions, drawing). The torch
predictor (:class:`Predictor`, :func:`load_served_model`, :func:`pick_device`) lives in
:mod:`xrayfm.inference.eager` and is imported from here on first use; ``xrayfm.inference.runtime``
exports it to ONNX, and :mod:`xrayfm.inference.onnx_serving` serves a version's stored graph with ONNX
Runtime alone (no torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm import RESEARCH_USE
from xrayfm.data.images import RESIZE_MODES
from xrayfm.domain import DeclaredDomain, DomainGate, DomainVerdict, InputFacts, input_only_verdict
from xrayfm.errors import XrayfmError
from xrayfm.evaluate.calibration import Calibration
from xrayfm.explain.methods import canonical_method
from xrayfm.explain.overlay import heatmap_on_image
from xrayfm.operating_point import DEFAULT_SOURCE, DEFAULT_THRESHOLD, served_threshold

# How a study's probability is made from its images' (Predictor.decide_study); answers say so.
STUDY_AGGREGATION = "mean of the image probabilities (as in the MURA paper)"
_EAGER = ("Predictor", "load_served_model", "pick_device")  # torch: xrayfm.inference.eager


def __getattr__(name: str) -> Any:
    """The torch predictor's names, imported (with torch) on first use."""
    if name in _EAGER:
        from xrayfm.inference import eager

        return getattr(eager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the model's input tensor (from the checkpoint's metadata)."""

    size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    mode: str = "pad"

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        """Read ``meta['preprocessing']`` (missing keys take the defaults above)."""
        pre = dict(meta.get("preprocessing") or {})
        out = cls(
            size=int(pre.get("size", cls.size)),
            mean=tuple(float(v) for v in pre.get("mean", cls.mean)),
            std=tuple(float(v) for v in pre.get("std", cls.std)),
            channels=int(pre.get("channels", cls.channels)),
            mode=str(pre.get("mode", cls.mode)),
        )
        if out.mode not in RESIZE_MODES:
            raise XrayfmError(f"checkpoint preprocessing mode {out.mode!r} is not one of {RESIZE_MODES}")
        return out


@dataclass
class ServedModel:
    """A loaded model with its labels, preprocessing, decision threshold and identity."""

    model: Any  # the torch module (None where a stored ONNX graph serves, xrayfm.inference.onnx_serving)
    labels: list[str]
    preprocessing: Preprocessing
    device: Any  # torch.device, or "cpu" for ONNX Runtime
    name: str
    version: str
    sha256: str
    threshold: float = DEFAULT_THRESHOLD
    negative_label: str = "Normal"
    multiclass: bool = False  # softmax over labels instead of one sigmoid per label
    meta: dict[str, Any] = field(default_factory=dict)
    threshold_source: str = DEFAULT_SOURCE  # where `threshold` comes from (xrayfm.operating_point)
    gate: DomainGate | None = None  # the version's domain gate (xrayfm.domain); None: input checks only
    calibration: Calibration | None = None  # fitted to a site (calibration.json); one-label models only

    @property
    def domain(self) -> DeclaredDomain:
        """What the version is for: its gate's declared domain, else ``meta["domain"]``, else the default."""
        return (
            self.gate.domain if self.gate is not None else DeclaredDomain.from_dict(self.meta.get("domain"))
        )

    def judge(
        self, image: np.ndarray, features: np.ndarray | None, facts: InputFacts | None = None
    ) -> DomainVerdict:
        """Whether this model can judge `image` (2-D uint8), from its `features` and the upload's `facts`."""
        if self.gate is None or features is None:
            return input_only_verdict(image, facts, self.domain)
        return self.gate.judge(image, features, facts)

    @classmethod
    def from_checkpoint(
        cls,
        folder: Path,
        meta: dict[str, Any],
        model: Any,
        device: Any,
        name: str | None,
        version: str | None,
    ) -> ServedModel:
        """A checkpoint folder's facts (labels, preprocessing, activation, identity, domain gate, site
        calibration, operating point) around `model` on `device`; `name`/`version` (e.g. from a model
        store) are used when the metadata does not carry its own."""
        from xrayfm.evaluate.calibration import read_calibration
        from xrayfm.utils import sha256_folder

        labels = [str(label) for label in meta.get("labels") or []]
        if not labels:
            raise XrayfmError(f"checkpoint {folder} has no label names in its metadata")
        served = cls(
            model=model,
            labels=labels,
            preprocessing=Preprocessing.from_meta(meta),
            device=device,
            name=str(meta.get("name") or name or folder.name),
            version=str(meta.get("version") or version or "local"),
            sha256=sha256_folder(folder),
            negative_label=str(meta.get("negative_label", "Normal")),
            multiclass=str(meta.get("activation", "sigmoid")) == "softmax",
            meta=meta,
            gate=DomainGate.load(folder) if folder.is_dir() else None,
            calibration=read_calibration(folder) if folder.is_dir() and len(labels) == 1 else None,
        )
        served.retune(folder)
        return served

    def retune(self, folder: str | Path | None) -> None:
        """Take the operating point recorded in `folder` now (or the checkpoint's, when none is)."""
        self.threshold, self.threshold_source = served_threshold(folder, self.meta)

    def probabilities(self, logits: Any) -> np.ndarray:
        """Logits [B, L] (a numpy array or a torch tensor) -> probabilities [B, L] (softmax for multi-class
        heads, else per-label sigmoid), in float32."""
        if hasattr(logits, "detach"):  # a torch tensor (maybe on a GPU): torch's own, as the model computes
            t = logits.detach().float().cpu()
            probs = (t.softmax(dim=1) if self.multiclass else t.sigmoid()).numpy()
        else:  # ONNX Runtime's numpy logits (no torch on that path)
            x = np.asarray(logits, dtype=np.float32)
            with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x gives 0, as it should
                if self.multiclass:
                    e = np.exp(x - x.max(axis=1, keepdims=True))
                    probs = e / e.sum(axis=1, keepdims=True)
                else:
                    probs = np.float32(1.0) / (np.float32(1.0) + np.exp(-x))
            probs = probs.astype(np.float32, copy=False)
        if self.calibration is not None and probs.shape[1] == 1:
            probs = self.calibration.apply(probs).astype(np.float32)
        return probs

    def info(self) -> dict[str, Any]:
        """The model's identity as reported in every answer and in the worker heartbeat."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "labels": list(self.labels),
            "negative_label": self.negative_label,
            "input_size": self.preprocessing.size,
            "device": str(self.device),
            # Training writes meta["data"]["synthetic"]; a hand-made checkpoint may say it at the top level.
            "synthetic": bool(self.meta.get("synthetic") or (self.meta.get("data") or {}).get("synthetic")),
            "untrained": bool(self.meta.get("untrained", False)),
            "notice": str(self.meta.get("intended_use") or RESEARCH_USE),
            # one label: `threshold` decides it; several: the most probable label wins, no threshold
            "threshold": self.threshold if len(self.labels) == 1 else None,
            "threshold_source": self.threshold_source if len(self.labels) == 1 else "the most probable label",
            "calibrated": self.calibration is not None,
            "calibration_source": self._calibration_source(),
            "domain": self.domain.description,
            "domain_gate": self.gate_summary(),
        }

    def _calibration_source(self) -> str | None:
        cal = self.calibration
        return None if cal is None else f"{cal.method} scaling fitted on {cal.source or f'{cal.n} images'}"

    def gate_summary(self) -> dict[str, Any] | None:
        """The gate's method, threshold and pass rates (None without a gate), for answers and listings."""
        if self.gate is None:
            return None
        facts = self.gate.facts
        return {
            "method": self.gate.method,
            "threshold": round(self.gate.threshold, 6),
            "pass_rate": self.gate.pass_rate,
            "validation_pass_rate": facts.get("validation_pass_rate"),
        }


@dataclass(frozen=True)
class Decision:
    """The decision for one image: one label -> that label vs. the negative one at the threshold;
    several labels -> the most probable one. ``probability`` is that of the predicted label (binary:
    of the positive label)."""

    prediction: str
    probability: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class PredictionResult(Decision):
    """One image's answer: the decision, its heatmap (uint8 H x W on the image's own geometry, 255 = most
    attended; None when not asked for), the method that drew it, timings (ms: preprocessing and inference
    for the whole batch, postprocessing this image's decision and heatmap) and the size of the batch it
    ran in."""

    heatmap: np.ndarray | None = None
    explain_method: str | None = None
    # predict(judge=False) leaves the verdict to the caller (who has the upload's facts)
    domain: DomainVerdict | None = None
    features: np.ndarray | None = None  # what the domain gate scores: the classifier head's input [D]
    model_map: np.ndarray | None = None  # predict(draw=False): the map over the model's input, for draw()
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    runtime: str = "torch"  # what computed the logits and the map ("onnxruntime", "onnxruntime-int8", ...)


class PredictorBase:
    """What every predictor shares: images -> answers (:meth:`predict`), decisions, drawing. A subclass
    gives :meth:`preprocess`, :meth:`run` and :attr:`methods` (:class:`Predictor`: torch;
    :class:`~xrayfm.inference.onnx_serving.GraphPredictor`: a stored ONNX graph). Thread-compatible (one
    batch at a time, from the batcher)."""

    runtime = "torch"  # the name answers carry; subclasses running another runtime override it
    runtime_reason: str | None = None  # why this runtime and graph serve (set by make_predictor)

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    @property
    def methods(self) -> tuple[str, ...]:
        """The explanation methods this predictor serves, its default first."""
        raise NotImplementedError

    @property
    def default_method(self) -> str:
        """The method used when a caller names none (``method=None``): rollout for a ViT, gradcam for a CNN."""
        return self.methods[0]

    def method(self, method: str | None) -> str:
        """`method` in canonical form (the model's default for None), refused when the model lacks it."""
        name = self.default_method if method is None else canonical_method(method)
        if name not in self.methods:
            if name in ("rollout", "grad_rollout"):
                what = "attention rollout" if name == "rollout" else "gradient rollout"
                raise XrayfmError(
                    f"{what} needs a ViT: model {self.served.name} is a convolutional network; "
                    f"use method='gradcam'"
                )
            raise XrayfmError(
                f"{name} is not available for model {self.served.name} (a Vision Transformer); "
                f"use one of {', '.join(self.methods)}"
            )
        return name

    def preprocess(self, images: list[np.ndarray]) -> Any:
        """uint8 H x W images -> the runtime's normalised float batch [B, C, S, S]."""
        raise NotImplementedError

    def run(
        self, batch: Any, explain_maps: bool, method: str | None
    ) -> tuple[Any, np.ndarray | None, str, np.ndarray | None]:
        """Logits [B, L], the maps [B, h, w] in [0, 1] when asked (else None), the name of the runtime
        that ran it and the features [B, D] the domain gate scores (from the same forward pass)."""
        raise NotImplementedError

    def synchronize(self, batch: Any) -> None:
        """Wait for the device's work on `batch` to finish (timings; a GPU runs asynchronously)."""

    def predict(
        self,
        images: list[np.ndarray],
        explain_maps: bool = True,
        method: str | None = "rollout",
        draw: bool = True,
        judge: bool = True,
        facts: list[InputFacts | None] | None = None,
    ) -> list[PredictionResult]:
        """Answers for a batch of grey uint8 images, in order.

        `method` None draws the model's default map (rollout for a ViT, Grad-CAM for a CNN); a method
        the model does not support raises an XrayfmError before any work ("rollout needs a ViT").
        `judge` gives each result its domain verdict (``domain``; `facts`: what each upload said beyond its
        pixels); False leaves that to the caller, with each result's ``features``. `draw` False leaves
        each heatmap over the model's input (`model_map`) for :meth:`draw`: the inference worker sends it
        as it is, and the gateway draws it with :func:`heatmap_on_image`."""
        if explain_maps:
            method = self.method(method)
        t0 = time.perf_counter()
        batch = self.preprocess(images)
        t1 = time.perf_counter()
        logits, maps, runtime, features = self.run(batch, explain_maps, method)
        self.synchronize(batch)
        t2 = time.perf_counter()
        probs = self.served.probabilities(logits)
        timings = {
            "preprocess_ms": 1000 * (t1 - t0),
            "inference_ms": 1000 * (t2 - t1),
            "postprocess_ms": 1000 * (time.perf_counter() - t2),
        }
        drawn_with = method if maps is not None else None
        facts = facts or [None] * len(images)
        results = [
            PredictionResult(
                **vars(self.decide(probs[i])),
                explain_method=drawn_with,
                timings=dict(timings),
                batch_size=len(images),
                runtime=runtime,
                model_map=maps[i] if maps is not None else None,
                features=None if features is None else features[i],
                domain=self.served.judge(images[i], None if features is None else features[i], facts[i])
                if judge else None,
            )
            for i in range(len(images))
        ]  # fmt: skip
        return (
            [self.draw(r, image.shape) for r, image in zip(results, images, strict=True)] if draw else results
        )

    def features(
        self, images: list[np.ndarray], batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The domain gate's features [N, D] and the probabilities [N, L] of grey uint8 `images`, by the
        serving path (same preprocessing and runtime), in batches."""
        from tqdm.auto import tqdm

        feats, probs = [], []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, disable=not progress, desc="features", unit="batch"):
            batch = self.preprocess(images[start : start + batch_size])
            logits, _, _, features = self.run(batch, False, None)
            feats.append(np.asarray(features, dtype=np.float32))
            probs.append(self.served.probabilities(logits))
        if not feats:
            raise XrayfmError("no images to compute features of")
        return np.concatenate(feats), np.concatenate(probs)

    def features_of_files(
        self, paths: list[Path], batch_size: int = 64, progress: bool = False, chunk: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`features` of image files, decoded `chunk` at a time (memory stays bounded)."""
        from xrayfm.data.images import read_image

        parts = [
            self.features([read_image(p) for p in paths[first : first + chunk]], batch_size, progress)
            for first in range(0, len(paths), chunk)
        ]
        if not parts:
            raise XrayfmError("no images to compute features of")
        return np.concatenate([f for f, _ in parts]), np.concatenate([p for _, p in parts])

    def draw(self, result: PredictionResult, image_shape: tuple[int, ...]) -> PredictionResult:
        """`result` with its heatmap drawn on the image's own geometry from its `model_map` (the time
        added to its postprocess_ms); a result without one is returned as it is."""
        if result.model_map is None:
            return result
        t0 = time.perf_counter()
        pre = self.served.preprocessing
        heatmap = heatmap_on_image(result.model_map, image_shape, pre.size, pre.mode)
        ms = result.timings.get("postprocess_ms", 0.0) + 1000 * (time.perf_counter() - t0)
        return replace(
            result, heatmap=heatmap, model_map=None, timings={**result.timings, "postprocess_ms": ms}
        )

    def decide(self, probs: np.ndarray) -> Decision:
        """The decision for one image's probabilities (see :class:`Decision`)."""
        labels = self.served.labels
        probabilities = {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)}
        if len(labels) == 1:
            p = float(probs[0])
            prediction = labels[0] if p >= self.served.threshold else self.served.negative_label
        else:
            top = int(np.argmax(probs))
            prediction, p = labels[top], float(probs[top])
        return Decision(prediction=prediction, probability=round(p, 6), probabilities=probabilities)

    def decide_study(self, images: list[Decision]) -> Decision:
        """The decision for a study of several images: each label's probability is the mean over the
        images (:data:`STUDY_AGGREGATION`, as the MURA paper does), decided as for one image."""
        if not images:
            raise XrayfmError("a study needs at least one image")
        means = [float(np.mean([d.probabilities[label] for d in images])) for label in self.served.labels]
        return self.decide(np.asarray(means))
