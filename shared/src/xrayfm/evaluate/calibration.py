"""Post-hoc probability calibration of a binary model to a site: fit a monotone map p -> p' on a labelled
sample of that site's images, choose among methods with evidence, store the result as JSON.

Three methods, from fewest to most parameters:

- ``temperature``: p' = sigmoid(logit(p) / T). One parameter, fitted by minimising the NLL over log T with
  scipy's bounded 1-D search. Hand-written: it is ten lines, and no library offers it for bare probabilities.
- ``platt``: p' = sigmoid(a * logit(p) + b). Logistic regression on the logit, fitted here by Newton's
  method on the (unregularised) NLL: a 2 x 2 system, so owning it avoids the changing ``penalty`` API of
  sklearn's LogisticRegression and its default L2 penalty, which would bias a and b.
- ``isotonic``: sklearn's ``IsotonicRegression(out_of_bounds="clip")`` (pool adjacent violators), stored as
  its breakpoints and applied with ``np.interp``; outputs are clipped to [ISOTONIC_EPS, 1 - ISOTONIC_EPS]
  so that one surprising image cannot cost an infinite log-loss.

Every map is non-decreasing, so rankings (and AUROC) are unchanged; temperature and platt (a > 0) are
strictly increasing, isotonic may tie scores. ``choose_calibration`` picks a method by stratified k-fold
cross-validated NLL on the site sample itself (by default the simplest method within one standard error of
the lowest) and records the evidence. Calibrations are plain JSON
(``calibration.json``), never pickled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.errors import DataError, XrayfmError
from xrayfm.evaluate.metrics import (
    check_binary,
    check_probabilities,
    expected_calibration_error,
    summarise_bootstrap,
)
from xrayfm.utils import atomic_write_json, read_json

METHODS = ("temperature", "platt", "isotonic")
CALIBRATION_FILE = "calibration.json"
FORMAT = "xrayfm.calibration"
FORMAT_VERSION = 1
MIN_IMAGES = 20
LOGIT_EPS = 1e-7  # probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before the logit and for NLL
ISOTONIC_EPS = 1e-3  # isotonic outputs are kept in [ISOTONIC_EPS, 1 - ISOTONIC_EPS]
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))  # temperature searched in [0.01, 100]
SELECTION_RULES = {
    "one_se": "fewest parameters within one standard error of the lowest mean cross-validated NLL",
    "min_nll": "lowest mean cross-validated NLL (ties: fewer parameters)",
}

# Elements of one bootstrap chunk (resamples x samples), as in metrics.py: bounds memory.
_CHUNK_ELEMENTS = 2_000_000


# ------------------------------------------------------------------------------------------------ helpers
def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _nll_logits(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary log-loss of logits `z` against 1/0 labels (stable: log(1 + e^z) - y z)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log-loss of probabilities `p` (clipped to [LOGIT_EPS, 1 - LOGIT_EPS])."""
    q = np.clip(np.asarray(p, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probabilities and 1/0 labels."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def _labelled(p: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated float arrays of probabilities and 1/0 labels; [N] or [N, 1]; rows with a NaN label dropped."""
    p_arr = np.asarray(p, dtype=np.float64)
    y_arr = np.asarray(y, dtype=np.float64)
    p_arr = p_arr.reshape(-1) if p_arr.ndim == 2 and p_arr.shape[1] == 1 else p_arr
    y_arr = y_arr.reshape(-1) if y_arr.ndim == 2 and y_arr.shape[1] == 1 else y_arr
    y_arr, p_arr = check_binary(y_arr, p_arr)
    keep = ~np.isnan(y_arr)
    y_arr, p_arr = y_arr[keep], p_arr[keep]
    check_probabilities(p_arr)
    return p_arr, y_arr


def _check_fit_data(y: np.ndarray) -> None:
    if y.size < MIN_IMAGES:
        raise DataError(f"calibration needs at least {MIN_IMAGES} labelled images; got {y.size}")
    positives = int(y.sum())
    if positives in (0, y.size):
        only = "positive" if positives else "negative"
        raise DataError(f"calibration needs both classes; all {y.size} labelled images are {only}")


# --------------------------------------------------------------------------------------- the calibration
def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise XrayfmError(f"calibration field {name!r} must be a finite number; got {value!r}")
    return float(value)


def _breakpoints(value: Any, name: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise XrayfmError(f"calibration field {name!r} must be a non-empty list of numbers")
    out = [_number(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if any(v < 0 or v > 1 for v in out):
        raise XrayfmError(f"calibration field {name!r} has values outside [0, 1]")
    return out


def _check_params(method: Any, params: Any) -> dict[str, Any]:
    """Validated, normalised parameters of `method` (XrayfmError naming the bad field)."""
    if method not in METHODS:
        raise XrayfmError(f"calibration field 'method' must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(params, dict):
        raise XrayfmError(f"calibration field 'params' must be an object; got {type(params).__name__}")
    expected = {"temperature": {"temperature"}, "platt": {"a", "b"}, "isotonic": {"x", "y"}}[method]
    if set(params) != expected:
        raise XrayfmError(
            f"calibration field 'params' of method {method!r} must have keys {sorted(expected)}; "
            f"got {sorted(params)}"
        )
    if method == "temperature":
        t = _number(params["temperature"], "params.temperature")
        if t <= 0:
            raise XrayfmError(f"calibration field 'params.temperature' must be > 0; got {t}")
        return {"temperature": t}
    if method == "platt":
        a, b = _number(params["a"], "params.a"), _number(params["b"], "params.b")
        if a <= 0:
            raise XrayfmError(f"calibration field 'params.a' must be > 0 (an increasing map); got {a}")
        return {"a": a, "b": b}
    x, y = _breakpoints(params["x"], "params.x"), _breakpoints(params["y"], "params.y")
    if len(x) != len(y):
        raise XrayfmError(
            f"calibration fields 'params.x' and 'params.y' differ in length ({len(x)}, {len(y)})"
        )
    if any(b <= a for a, b in zip(x, x[1:], strict=False)):
        raise XrayfmError("calibration field 'params.x' must be strictly increasing")
    if any(b < a for a, b in zip(y, y[1:], strict=False)):
        raise XrayfmError("calibration field 'params.y' must be non-decreasing")
    return {"x": x, "y": y}


def _apply(method: str, params: dict[str, Any], p: np.ndarray) -> np.ndarray:
    if method == "temperature":
        return _sigmoid(_logit(p) / params["temperature"])
    if method == "platt":
        return _sigmoid(params["a"] * _logit(p) + params["b"])
    out = np.interp(p, np.asarray(params["x"]), np.asarray(params["y"]))
    return np.clip(out, ISOTONIC_EPS, 1 - ISOTONIC_EPS)


@dataclass(frozen=True)
class Calibration:
    """A fitted map from the model's probability of the positive label to a calibrated one.

    ``params``: temperature {"temperature": T}; platt {"a", "b"} (on the logit); isotonic {"x", "y"}
    breakpoints. ``source`` says where it was fitted, ``n`` on how many labelled images, ``fitted_at`` when
    (seconds since the epoch), ``evidence`` why (the selection scores of :func:`choose_calibration`).
    """

    method: str
    params: dict[str, Any]
    source: str = ""
    n: int = 0
    fitted_at: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _check_params(self.method, self.params))

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the positive label, same shape as the input ([N] or [N, 1])."""
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim not in (0, 1) and not (p.ndim == 2 and p.shape[1] == 1):
            raise DataError(f"apply takes probabilities of shape [N] or [N, 1]; got {p.shape}")
        check_probabilities(p)
        return _apply(self.method, self.params, p)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (see :meth:`from_dict`)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "params": dict(self.params),
            "source": self.source,
            "n": self.n,
            "fitted_at": self.fitted_at,
            "evidence": self.evidence,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Rebuild from :meth:`to_dict`'s form; XrayfmError naming the field that is missing or wrong."""
        if not isinstance(data, dict):
            raise XrayfmError(f"a calibration must be a JSON object; got {type(data).__name__}")
        if data.get("format", FORMAT) != FORMAT:
            raise XrayfmError(f"calibration field 'format' must be {FORMAT!r}; got {data.get('format')!r}")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise XrayfmError(f"calibration field 'version' must be {FORMAT_VERSION}; got {version!r}")
        for key in ("method", "params"):
            if key not in data:
                raise XrayfmError(f"calibration field {key!r} is missing")
        source = data.get("source", "")
        if not isinstance(source, str):
            raise XrayfmError(f"calibration field 'source' must be a string; got {type(source).__name__}")
        n = data.get("n", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise XrayfmError(f"calibration field 'n' must be a non-negative integer; got {n!r}")
        fitted_at = _number(data.get("fitted_at", 0.0), "fitted_at")
        evidence = data.get("evidence", {})
        if not isinstance(evidence, dict):
            raise XrayfmError(
                f"calibration field 'evidence' must be an object; got {type(evidence).__name__}"
            )
        return cls(data["method"], data["params"], source, n, fitted_at, evidence)


# ------------------------------------------------------------------------------------------------ fitting
def _fit_temperature(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from scipy.optimize import minimize_scalar

    z = _logit(p)
    res = minimize_scalar(
        lambda log_t: _nll_logits(z / math.exp(log_t), y),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return {"temperature": float(math.exp(res.x))}


def _fit_platt(p: np.ndarray, y: np.ndarray, max_iter: int = 100) -> dict[str, float]:
    """Newton's method with step halving on the NLL of sigmoid(a * logit(p) + b); starts at (1, 0)."""
    z = _logit(p)
    design = np.stack([z, np.ones_like(z)], axis=1)
    w = np.array([1.0, 0.0])
    loss = _nll_logits(design @ w, y)
    for _ in range(max_iter):
        q = _sigmoid(design @ w)
        grad = design.T @ (q - y) / y.size
        if np.max(np.abs(grad)) < 1e-10:
            break
        hess = (design * (q * (1 - q))[:, None]).T @ design / y.size + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        trial = w - step
        trial_loss = _nll_logits(design @ trial, y)
        while trial_loss > loss and scale > 1e-10:  # step halving: never increase the loss
            scale /= 2
            trial = w - scale * step
            trial_loss = _nll_logits(design @ trial, y)
        if trial_loss > loss:
            break
        converged = loss - trial_loss < 1e-15
        w, loss = trial, trial_loss
        if converged:
            break
    if not np.all(np.isfinite(w)):
        raise DataError("platt scaling did not converge (are the classes perfectly separated?)")
    return {"a": float(w[0]), "b": float(w[1])}


def _fit_isotonic(p: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
    x = np.asarray(iso.X_thresholds_, dtype=np.float64)
    fx = np.clip(np.asarray(iso.y_thresholds_, dtype=np.float64), ISOTONIC_EPS, 1 - ISOTONIC_EPS)
    keep = np.concatenate([[True], np.diff(x) > 0])  # strictly increasing x, for np.interp and validation
    return {"x": x[keep].tolist(), "y": np.maximum.accumulate(fx[keep]).tolist()}


_FITTERS = {"temperature": _fit_temperature, "platt": _fit_platt, "isotonic": _fit_isotonic}


def fit_calibration(p: Any, y: Any, method: str, *, source: str = "") -> Calibration:
    """Fit `method` (one of METHODS) on probabilities of the positive label and 1/0 labels (NaN: dropped).

    Refuses (DataError, an XrayfmError) fewer than MIN_IMAGES labelled images or a single class; a Platt
    slope a <= 0 (the scores are anti-related to the labels here) is refused rather than inverting them.
    """
    if method not in METHODS:
        raise XrayfmError(f"calibration method must be one of {', '.join(METHODS)}; got {method!r}")
    p_arr, y_arr = _labelled(p, y)
    _check_fit_data(y_arr)
    params = _FITTERS[method](p_arr, y_arr)
    if method == "platt" and params["a"] <= 0:
        raise DataError(
            f"platt slope a = {params['a']:.4g} <= 0: the model's scores are anti-related to the labels "
            "in this sample; calibrating would invert its ranking"
        )
    return Calibration(method, params, source=source, n=int(y_arr.size), fitted_at=time.time())


def _scores(y: np.ndarray, p: np.ndarray, n_bins: int) -> dict[str, float]:
    ece = expected_calibration_error(y, p, n_bins=n_bins)["ece"]
    return {"nll": log_loss(y, p), "brier": brier_score(y, p), "ece": float(ece)}


def _pick(summary: dict[str, Any], rule: str) -> tuple[str, dict[str, Any]]:
    """The method `rule` picks from the cross-validation summary, and the numbers it decided on."""
    lowest = min(METHODS, key=lambda m: (summary[m]["nll_mean"], METHODS.index(m)))
    best_folds = np.array([f["nll"] for f in summary[lowest]["folds"]])
    margins = {}
    for method in METHODS:
        diff = np.array([f["nll"] for f in summary[method]["folds"]]) - best_folds
        margins[method] = {
            "nll_minus_lowest": float(diff.mean()),
            "standard_error": float(diff.std(ddof=1) / math.sqrt(diff.size)),
        }
    if rule == "min_nll":
        return lowest, {"lowest_nll": lowest, "margins": margins}
    # METHODS runs from fewest to most parameters: the first within one standard error wins.
    chosen = next(
        m for m in METHODS if margins[m]["nll_minus_lowest"] <= margins[m]["standard_error"] or m == lowest
    )
    return chosen, {"lowest_nll": lowest, "margins": margins}


def choose_calibration(
    p: Any,
    y: Any,
    *,
    folds: int = 5,
    seed: int = 0,
    source: str = "",
    rule: str = "one_se",
    n_bins: int = 15,
) -> Calibration:
    """Choose a method by stratified, seeded `folds`-fold cross-validation on this labelled set, then refit
    the winner on all of it. NaN labels are dropped.

    ``rule``: ``"one_se"`` (default) takes the method with the fewest parameters (temperature < platt <
    isotonic) whose mean CV NLL is within one standard error of the lowest (the standard error of the
    per-fold paired differences); ``"min_nll"`` takes the lowest mean CV NLL. The one-SE rule exists because
    platt nests temperature: on 40 simulated sets of 300 images miscalibrated by a temperature only,
    min_nll picked platt 17 times by noise alone, one_se 9 times (at 1,000 images: 13 and 3 of 40). ``evidence``
    holds each method's per-fold and mean (std) NLL / Brier / ECE, those of the uncalibrated probabilities
    for reference, the margins the rule compared, the method of lowest NLL, folds, seed and rule.
    """
    from sklearn.model_selection import StratifiedKFold

    if rule not in SELECTION_RULES:
        raise XrayfmError(f"rule must be one of {', '.join(SELECTION_RULES)}; got {rule!r}")
    p_arr, y_arr = _labelled(p, y)
    _check_fit_data(y_arr)
    minority = int(min(y_arr.sum(), y_arr.size - y_arr.sum()))
    k = min(folds, minority)
    if k < 2:
        raise DataError(f"cross-validation needs at least 2 images of each class; the smaller has {minority}")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    per_fold: dict[str, list[dict[str, float]]] = {name: [] for name in ("uncalibrated", *METHODS)}
    for train, test in splitter.split(p_arr, y_arr):
        per_fold["uncalibrated"].append(_scores(y_arr[test], p_arr[test], n_bins))
        for method in METHODS:
            params = _FITTERS[method](p_arr[train], y_arr[train])
            per_fold[method].append(_scores(y_arr[test], _apply(method, params, p_arr[test]), n_bins))
    summary: dict[str, Any] = {}
    for name, rows in per_fold.items():
        summary[name] = {
            **{f"{m}_mean": float(np.mean([r[m] for r in rows])) for m in ("nll", "brier", "ece")},
            **{f"{m}_std": float(np.std([r[m] for r in rows], ddof=1)) for m in ("nll", "brier", "ece")},
            "folds": rows,
        }
    best, decided_on = _pick(summary, rule)
    chosen = fit_calibration(p_arr, y_arr, best, source=source)
    evidence = {
        "rule": SELECTION_RULES[rule],
        "chosen": best,
        **decided_on,
        "folds": k,
        "seed": seed,
        "n_bins": n_bins,
        "n": int(y_arr.size),
        "n_pos": int(y_arr.sum()),
        "cv": summary,
    }
    return Calibration(chosen.method, chosen.params, source, chosen.n, chosen.fitted_at, evidence)


# ------------------------------------------------------------------------------------------- measurement
def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """The bin of each probability, exactly as ``expected_calibration_error`` assigns it."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)


def bootstrap_ece(y: np.ndarray, p: np.ndarray, n_bins: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """ECE of `n_bootstrap` resamples (rows drawn with replacement) of 1/0 labels `y` and probabilities `p`."""
    n = y.size
    out = np.full(n_bootstrap, np.nan)
    if n == 0 or n_bootstrap <= 0:
        return out
    idx = _bin_index(p, n_bins)
    one_hot = np.zeros((n, n_bins))
    one_hot[np.arange(n), idx] = 1.0
    conf, pos = one_hot * p[:, None], one_hot * y[:, None]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for first in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - first)
        draws = rng.integers(0, n, size=(b, n)) + np.arange(b)[:, None] * n
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        out[first : first + b] = np.abs(counts @ pos - counts @ conf).sum(axis=1) / n
    return out


def ece_with_ci(
    y: Any, p: Any, *, n_bins: int = 15, n_bootstrap: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """ECE (``expected_calibration_error``) with a percentile-bootstrap (1 - alpha) CI, plus Brier and NLL.

    Returns ``ece, ci_low, ci_high, n_bootstrap, n_bootstrap_skipped, n, n_pos, n_bins, alpha, brier, nll``;
    NaN labels are dropped. NLL clips probabilities to [LOGIT_EPS, 1 - LOGIT_EPS].
    """
    p_arr, y_arr = _labelled(p, y)
    if y_arr.size == 0:
        raise DataError("ece_with_ci needs at least one labelled image")
    point = expected_calibration_error(y_arr, p_arr, n_bins=n_bins)["ece"]
    boot = bootstrap_ece(y_arr, p_arr, n_bins, n_bootstrap, seed)
    return {
        "ece": float(point),
        **summarise_bootstrap(float(point), boot, alpha),
        "n": int(y_arr.size),
        "n_pos": int(y_arr.sum()),
        "n_bins": n_bins,
        "alpha": alpha,
        "brier": brier_score(y_arr, p_arr),
        "nll": log_loss(y_arr, p_arr),
    }


# ---------------------------------------------------------------------------------------------- storage
def write_calibration(folder: str | Path, cal: Calibration) -> Path:
    """Write `cal` atomically as ``folder/calibration.json``; returns the path."""
    path = Path(folder) / CALIBRATION_FILE
    atomic_write_json(path, cal.to_dict())
    return path


def read_calibration(folder: str | Path) -> Calibration | None:
    """The calibration stored in `folder`, or None when it has none (XrayfmError when it is broken)."""
    data = read_json(Path(folder) / CALIBRATION_FILE, default=None)
    return None if data is None else Calibration.from_dict(data)
