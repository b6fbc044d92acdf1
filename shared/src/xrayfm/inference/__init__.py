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

The :class:`Predictor` here runs the model in torch; ``xrayfm.inference.runtime`` exports it to ONNX
(with the attention of every block, so rollout runs there too) and serves it with ONNX Runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrayfm import RESEARCH_USE
from xrayfm.data.images import RESIZE_MODES, fit_square
from xrayfm.data.transforms import build_transform
from xrayfm.domain import DeclaredDomain, DomainGate, DomainVerdict, InputFacts, input_only_verdict
from xrayfm.domain.features import capture_features
from xrayfm.errors import XrayfmError
from xrayfm.evaluate.calibration import Calibration, read_calibration
from xrayfm.explain import (
    canonical_method,
    explain,
    gradcam,
    heatmap_on_image,
    methods_for,
    predict_with_rollout,
)
from xrayfm.models.checkpoint import load_any
from xrayfm.operating_point import DEFAULT_SOURCE, DEFAULT_THRESHOLD, served_threshold
from xrayfm.registry import resolve_checkpoint_dir
from xrayfm.utils import sha256_folder

# How a study's probability is made from its images' (Predictor.decide_study); answers say so.
STUDY_AGGREGATION = "mean of the image probabilities (as in the MURA paper)"


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

    model: nn.Module
    labels: list[str]
    preprocessing: Preprocessing
    device: torch.device
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

    def retune(self, folder: str | Path | None) -> None:
        """Take the operating point recorded in `folder` now (or the checkpoint's, when none is)."""
        self.threshold, self.threshold_source = served_threshold(folder, self.meta)

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Logits [B, L] -> probabilities [B, L] (softmax for multi-class heads, else per-label sigmoid)."""
        logits = torch.as_tensor(logits).detach().float().cpu()
        probs = (torch.softmax(logits, dim=1) if self.multiclass else torch.sigmoid(logits)).numpy()
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


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device when present, else the CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XrayfmError(f"XRAYFM_DEVICE={requested} but no CUDA device is available")
    return device


def load_served_model(
    path: str | Path, device: str = "auto", *, name: str | None = None, version: str | None = None
) -> ServedModel:
    """Load a checkpoint folder (full or LoRA-adapted) for inference: on `device`, eval mode, frozen.

    `name`/`version` (e.g. from a model store) are used when the metadata does not carry its own.
    """
    path = resolve_checkpoint_dir(path)  # a shipped model's name (xrayfm/...) is its folder in the package
    model, meta = load_any(path)
    meta = dict(meta)
    labels = [str(label) for label in meta.get("labels") or []]
    if not labels:
        raise XrayfmError(f"checkpoint {path} has no label names in its metadata")
    target = pick_device(device)
    model = model.to(target).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    served = ServedModel(
        model=model,
        labels=labels,
        preprocessing=Preprocessing.from_meta(meta),
        device=target,
        name=str(meta.get("name") or name or path.name),
        version=str(meta.get("version") or version or "local"),
        sha256=sha256_folder(path),
        negative_label=str(meta.get("negative_label", "Normal")),
        multiclass=str(meta.get("activation", "sigmoid")) == "softmax",
        meta=meta,
        gate=DomainGate.load(path) if path.is_dir() else None,
        calibration=read_calibration(path) if path.is_dir() and len(labels) == 1 else None,
    )
    served.retune(path)
    _check_outputs(served)
    return served


def _check_outputs(served: ServedModel) -> None:
    """One dummy forward: the head must have one output per label (caught at start, not per request)."""
    pre = served.preprocessing
    dummy = torch.zeros(1, pre.channels, pre.size, pre.size, device=served.device)
    with torch.no_grad():
        out = served.model(dummy)
    if out.ndim != 2 or out.shape[1] != len(served.labels):
        raise XrayfmError(
            f"model {served.name} outputs {tuple(out.shape)}, "
            f"but its metadata lists {len(served.labels)} labels"
        )


class Predictor:
    """Runs the served model on batches; thread-compatible (one batch at a time, from the batcher)."""

    runtime = "torch"  # the name answers carry; subclasses running another runtime override it
    runtime_reason: str | None = None  # why this runtime and graph serve (set by make_predictor)

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        pre = served.preprocessing
        self.transform = build_transform(
            train=False, size=pre.size, mean=pre.mean, std=pre.std, channels=pre.channels
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """The explanation methods this model supports, its default first (ViT: rollout, grad_rollout;
        CNN: gradcam). The others raise an XrayfmError ("rollout needs a ViT" on a CNN)."""
        return methods_for(self.served.model)

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

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 H x W images -> a normalised float batch [B, C, S, S] on the model's device."""
        pre = self.served.preprocessing
        tensors = [self.transform(torch.tensor(fit_square(img, pre.size, pre.mode))[None]) for img in images]
        return torch.stack(tensors).to(self.served.device)

    def forward(
        self, batch: torch.Tensor, explain_maps: bool, method: str | None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits [B, L] and, when asked, explanation maps [B, h, w] in [0, 1] (`method` None: the
        model's default)."""
        model = self.served.model
        if not explain_maps:
            with torch.inference_mode():
                return model(batch), None
        method = self.method(method)
        if method == "rollout":
            logits, maps = predict_with_rollout(model, batch)  # one pass gives both
            return logits, maps.detach().cpu().numpy()
        with torch.no_grad():
            logits = model(batch)
        if method == "gradcam" and len(self.served.labels) == 1 and not self.served.multiclass:
            # One output: map the evidence for the decision shown, the label's when it is predicted,
            # against it (the negated logit) when the answer is the negative label. The label's own map
            # is often all zero for a negative answer (Grad-CAM keeps positive evidence only).
            positive = self.served.probabilities(logits)[:, 0] >= self.served.threshold
            sign = torch.where(torch.as_tensor(positive), 1.0, -1.0)
            return logits, gradcam(model, batch, 0, sign=sign).detach().cpu().numpy()
        return logits, explain(model, batch, method=method)  # class-specific: each image's top class

    def run(
        self, batch: torch.Tensor, explain_maps: bool, method: str | None
    ) -> tuple[torch.Tensor | np.ndarray, np.ndarray | None, str, np.ndarray | None]:
        """:meth:`forward` plus the name of the runtime that ran it (a subclass may fall back to torch)
        and the features [B, D] the domain gate scores (captured from the same forward pass)."""
        with capture_features(self.served.model) as record:
            logits, maps = self.forward(batch, explain_maps, method)
        features = None if record.features is None else record.features.detach().float().cpu().numpy()
        return logits, maps, self.runtime, features

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
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
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
