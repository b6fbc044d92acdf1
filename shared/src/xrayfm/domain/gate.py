"""A model version's domain gate: how far an image's features lie from the model's own training images,
against a threshold that passes a stated share of held-out in-domain images.

Two scores, both from the features the served model computes anyway (:mod:`xrayfm.domain.features`):

- ``knn`` (Sun et al. 2022): the distance from the L2-normalised feature vector to its k-th nearest
  neighbour among the normalised training features (a bank of at most ``BANK_MAX`` of them);
- ``mahalanobis`` (Lee et al. 2018): the Mahalanobis distance to the training features' mean under their
  covariance (shrunk towards its diagonal, so that a small or low-rank set still inverts).

Which one a version uses is chosen with evidence: ``bench/domain_gate.py`` measures both, and the model's
own energy and confidence, against real out-of-domain sets. On the shipped pneumonia model Mahalanobis
separated every set best (AUROC 0.98-1.00 against MURA humerus, the tibia DICOM, bone phantoms and
generated non-radiographs; kNN 0.75-0.93 except the DICOMs; energy and confidence near or below chance),
so it is the default. The threshold is the
``pass_rate`` quantile of the scores of held-out in-domain images (images the gate was not fitted on),
so that, on images like them, that share passes. Higher scores are further out.

Stored with the version, never pickled: ``domain_gate.safetensors`` (the arrays, and the held-out
features the threshold was set on, so that :meth:`DomainGate.extend` keeps them passing) and
``domain_gate.json`` (method, threshold, pass rates, declared domain, reference distributions for
drift). Scoring is numpy only, so a worker without torch can gate too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.domain.checks import DeclaredDomain, DomainVerdict, InputFacts, Reason, input_reasons
from xrayfm.errors import XrayfmError
from xrayfm.utils import atomic_write_json, read_json

GATE_JSON = "domain_gate.json"
GATE_TENSORS = "domain_gate.safetensors"
GATE_METHODS = ("mahalanobis", "knn")
DEFAULT_METHOD = "mahalanobis"
DEFAULT_PASS_RATE = 0.97
DEFAULT_K = 10
MIN_HELD_OUT = 20  # held-out in-domain images a threshold is set on at least
BANK_MAX = 4096  # reference features kept for knn (a seeded subsample beyond that)
HELD_OUT_MAX = 2048  # held-out in-domain features kept, so that extending the gate keeps them passing
SHRINKAGE = 0.1  # Mahalanobis: covariance (1 - s) * C + s * diag(C)
DRIFT_BINS = 10  # reference distributions: deciles of the held-out in-domain set
FORMAT = 1


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _check_features(features: Any, what: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise XrayfmError(f"{what}: expected a non-empty [N, D] feature array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise XrayfmError(f"{what}: features have {arr.shape[1]} dimensions, the gate {dim}")
    if not np.isfinite(arr).all():
        raise XrayfmError(f"{what}: features must be finite")
    return arr


def reference_bins(values: np.ndarray, bins: int = DRIFT_BINS) -> dict[str, list[float]]:
    """A reference distribution for drift: interior bin edges at the quantiles of `values` and the share
    of `values` in each bin (about 1/bins each; ties make some bins fuller)."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {"edges": edges.round(6).tolist(), "fractions": (counts / counts.sum()).round(6).tolist()}


@dataclass
class DomainGate:
    """A fitted gate (see the module docstring); :meth:`judge` gives an image's :class:`DomainVerdict`."""

    method: str
    threshold: float
    arrays: dict[str, np.ndarray]
    domain: DeclaredDomain = field(default_factory=DeclaredDomain)
    k: int = DEFAULT_K
    pass_rate: float = DEFAULT_PASS_RATE  # the target share of in-domain images that pass
    facts: dict[str, Any] = field(default_factory=dict)  # sizes, achieved pass rates, sources, references

    # -- scoring -------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(next(iter(self.arrays.values())).shape[-1])

    def score(self, features: Any) -> np.ndarray:
        """Scores [N] of features [N, D]: the larger, the further from the training images."""
        x = _check_features(features, "domain gate", self.dim)
        if self.method == "knn":
            bank = self.arrays["bank"]
            sims = _normalise(x) @ bank.T  # cosine similarity; distance^2 = 2 - 2 sim on the unit sphere
            k = min(self.k, bank.shape[0])
            kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
            return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        centred = x - self.arrays["mean"]
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, self.arrays["precision"], centred), 0.0))

    def judge(self, image: np.ndarray, features: Any, facts: InputFacts | None = None) -> DomainVerdict:
        """The verdict on one image (2-D uint8) given its features [D]: the input checks, then the score."""
        reasons = input_reasons(image, facts or InputFacts(), self.domain)
        score = float(self.score(np.asarray(features, dtype=np.float32)[None])[0])
        if not score <= self.threshold:
            reasons.append(
                Reason("features", f"unlike this model's training images ({self.method} score "
                                   f"{score:.3g} > threshold {self.threshold:.3g})")
            )  # fmt: skip
        return DomainVerdict(not reasons, score, self.threshold, reasons, self.method)

    def pass_rate_of(self, features: Any) -> float:
        """The share of `features` whose score passes the threshold."""
        return float(np.mean(self.score(features) <= self.threshold))

    # -- fitting -------------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        reference: Any,
        held_out: Any,
        *,
        method: str = DEFAULT_METHOD,
        pass_rate: float = DEFAULT_PASS_RATE,
        domain: DeclaredDomain | None = None,
        k: int = DEFAULT_K,
        held_out_probabilities: Any = None,
        sources: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> DomainGate:
        """Fit on `reference` features (the model's training images) and set the threshold on `held_out`
        (in-domain images it was not fitted on) to pass `pass_rate` of them. `held_out_probabilities`
        (the model's positive-class probabilities there) become the reference distribution for drift."""
        if method not in GATE_METHODS:
            raise XrayfmError(f"unknown domain gate method {method!r}; choose one of {GATE_METHODS}")
        if not 0.5 <= pass_rate < 1.0:
            raise XrayfmError(f"pass_rate must lie in [0.5, 1), got {pass_rate}")
        ref = _check_features(reference, "reference features")
        held = _check_features(held_out, "held-out features", ref.shape[1])
        if len(held) < MIN_HELD_OUT:
            raise XrayfmError(
                f"the threshold needs at least {MIN_HELD_OUT} held-out in-domain images, got {len(held)}"
            )
        arrays = {**_fit_arrays(ref, method, seed), "held_out": _subsample(held, HELD_OUT_MAX, seed)}
        gate = cls(method, math.inf, arrays, domain or DeclaredDomain(), int(k), float(pass_rate))
        return gate._calibrated(held, held_out_probabilities, {
            "reference_images": int(len(ref)), "sources": sources or {}, "fitted_at": time.time(),
        })  # fmt: skip

    def extend(
        self, reference: Any, held_out: Any, source: str, held_out_probabilities: Any = None
    ) -> DomainGate:
        """A new gate with `reference` features added (a site's images are in domain by definition) and its
        threshold set again on `held_out` (the site's held-out images) together with the held-out images
        the gate kept from its fit, so that the images it passed before still pass at the stated rate."""
        ref = _check_features(reference, "added reference features", self.dim)
        held = _check_features(held_out, "held-out features", self.dim)
        if self.method == "knn":
            arrays = _fit_arrays(
                np.concatenate([self.arrays["bank"], _normalise(ref)]), "knn", 0, normalised=True
            )
        else:  # pool the two sets' moments, weighted by their sizes
            n_old = int(self.facts.get("reference_images", len(ref)))
            arrays = _merge_gaussian(self.arrays, n_old, ref)
        kept = self.arrays.get("held_out")
        if kept is not None:  # probabilities: the site's only (the kept images' are not stored)
            probs = None if held_out_probabilities is None else np.asarray(held_out_probabilities, np.float64)
            if probs is not None:
                probs = np.concatenate([np.full((len(kept), *probs.shape[1:]), np.nan), probs])
            held, held_out_probabilities = np.concatenate([kept, held]), probs
        arrays["held_out"] = _subsample(held, HELD_OUT_MAX, 0)
        facts = {**self.facts, "reference_images": int(self.facts.get("reference_images", 0)) + len(ref)}
        facts["sources"] = {**(facts.get("sources") or {}), f"added: {source}": int(len(ref))}
        return replace(self, arrays=arrays)._calibrated(held, held_out_probabilities, facts)

    def _calibrated(self, held: np.ndarray, probabilities: Any, facts: dict[str, Any]) -> DomainGate:
        scores = self.score(held)
        # the smallest threshold that passes at least pass_rate of the held-out images
        threshold = float(np.quantile(scores, self.pass_rate, method="higher"))
        facts = {**facts, "held_out_images": int(len(held)),
                 "held_out_pass_rate": round(float(np.mean(scores <= threshold)), 4),
                 "reference": {"score_ratio": reference_bins(scores / max(threshold, 1e-12))}}  # fmt: skip
        if probabilities is not None:
            p = np.asarray(probabilities, dtype=np.float64).reshape(len(held), -1)[:, 0]
            p = p[np.isfinite(p)]  # images without a probability of their own (NaN) are left out
            if len(p) >= 10:
                facts["reference"]["probability"] = reference_bins(p)
        return replace(self, threshold=threshold, facts=facts)

    # -- files ---------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What ``domain_gate.json`` holds (everything but the arrays)."""
        return {
            "format": FORMAT,
            "method": self.method,
            "threshold": self.threshold,
            "k": self.k,
            "pass_rate": self.pass_rate,
            "dim": self.dim,
            "domain": self.domain.to_dict(),
            **self.facts,
        }

    def save(self, folder: str | Path) -> Path:
        """Write the gate into `folder` (safetensors + JSON); returns the JSON's path."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{GATE_TENSORS}.tmp"
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.arrays.items()}, str(tmp))
        tmp.replace(folder / GATE_TENSORS)
        atomic_write_json(folder / GATE_JSON, self.describe())
        for name in (GATE_TENSORS, GATE_JSON):  # readable by the services' unprivileged users
            (folder / name).chmod(0o644)
        return folder / GATE_JSON

    @classmethod
    def load(cls, folder: str | Path) -> DomainGate | None:
        """The gate stored in `folder`, or None when it has none (XrayfmError when it is broken)."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / GATE_JSON).is_file():
            return None
        info = read_json(folder / GATE_JSON)
        try:
            try:
                arrays = load_file(str(folder / GATE_TENSORS))
            except Exception as exc:  # safetensors' own error type for a broken file
                raise ValueError(f"{GATE_TENSORS}: {exc}") from None
            method = str(info["method"])
            if method not in GATE_METHODS:
                raise ValueError(f"unknown method {method!r}")
            known = {"format", "method", "threshold", "k", "pass_rate", "dim", "domain"}
            gate = cls(
                method=method,
                threshold=float(info["threshold"]),
                arrays={k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()},
                domain=DeclaredDomain.from_dict(info.get("domain")),
                k=int(info.get("k", DEFAULT_K)),
                pass_rate=float(info.get("pass_rate", DEFAULT_PASS_RATE)),
                facts={k: v for k, v in info.items() if k not in known},
            )
            gate.dim  # noqa: B018 - an empty tensors file fails here
        except (KeyError, ValueError, TypeError, OSError, StopIteration) as exc:
            raise XrayfmError(f"the domain gate in {folder} is unreadable: {exc}") from None
        return gate


def _fit_arrays(ref: np.ndarray, method: str, seed: int, normalised: bool = False) -> dict[str, np.ndarray]:
    if method == "knn":
        bank = ref if normalised else _normalise(ref)
        if len(bank) > BANK_MAX:
            bank = bank[np.sort(np.random.default_rng(seed).choice(len(bank), BANK_MAX, replace=False))]
        return {"bank": np.ascontiguousarray(bank, dtype=np.float32)}
    return _gaussian(ref.mean(axis=0), np.cov(ref, rowvar=False) if len(ref) > 1 else np.eye(ref.shape[1]))


def _subsample(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of `rows`, a seeded subsample in their order."""
    if len(rows) <= limit:
        return np.ascontiguousarray(rows, dtype=np.float32)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return np.ascontiguousarray(rows[keep], dtype=np.float32)


def _gaussian(mean: np.ndarray, cov: np.ndarray) -> dict[str, np.ndarray]:
    cov = np.atleast_2d(cov)
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(cov))
    return {"mean": mean.astype(np.float32), "cov": shrunk.astype(np.float32),
            "precision": np.linalg.pinv(shrunk).astype(np.float32)}  # fmt: skip


def _merge_gaussian(arrays: dict[str, np.ndarray], n_old: int, ref: np.ndarray) -> dict[str, np.ndarray]:
    n_new = len(ref)
    mean_new, cov_new = (
        ref.mean(axis=0),
        (np.cov(ref, rowvar=False) if n_new > 1 else np.zeros_like(arrays["cov"])),
    )
    total = n_old + n_new
    mean = (n_old * arrays["mean"] + n_new * mean_new) / total
    delta = (mean_new - arrays["mean"])[:, None]
    cov = (n_old * arrays["cov"] + n_new * cov_new + (n_old * n_new / total) * (delta @ delta.T)) / total
    return _gaussian(mean, cov)


def input_only_verdict(
    image: np.ndarray, facts: InputFacts | None, domain: DeclaredDomain | None
) -> DomainVerdict:
    """The verdict of a version without a fitted gate: the input checks alone (``gate`` None says so)."""
    reasons = input_reasons(image, facts or InputFacts(), domain or DeclaredDomain())
    return DomainVerdict(not reasons, None, None, reasons, None)


__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_PASS_RATE",
    "GATE_JSON",
    "GATE_METHODS",
    "GATE_TENSORS",
    "DomainGate",
    "input_only_verdict",
    "reference_bins",
]
