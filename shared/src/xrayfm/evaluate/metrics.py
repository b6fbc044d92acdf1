"""Binary metrics with honest edge cases: AUROC with bootstrap CIs, thresholded metrics, calibration.

Labels are 1 / 0, or NaN for "masked" (uncertain under u-ignore, or blank): masked entries are left out.
A metric that is undefined (e.g. AUROC of a single-class label) is ``None`` with a ``reason``, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xrayfm.errors import DataError, list_offenders

SINGLE_CLASS = "single class"
NO_SAMPLES = "no labelled samples"

# Elements of one bootstrap chunk (resamples x samples): bounds memory to a few tens of MB.
_CHUNK_ELEMENTS = 2_000_000


def check_binary(y_true: Any, y_score: Any, allow_masked: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired 1-D labels (1/0, NaN = masked if allowed) and scores; return float64 arrays."""
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise DataError(f"labels and scores must be 1-D of the same length; got {y.shape} and {s.shape}")
    _check_label_values(y, allow_masked)
    bad = np.flatnonzero(~np.isnan(y) & ~np.isfinite(s))
    if bad.size:
        raise DataError(f"{bad.size} scores are NaN or infinite (at indices {list_offenders(bad)})")
    return y, s


def check_probabilities(p: np.ndarray, where: np.ndarray | None = None) -> None:
    """Raise DataError unless every probability (where `where` is True) lies in [0, 1]."""
    mask = np.ones(p.shape, bool) if where is None else where
    bad = np.flatnonzero(mask & ~((p >= 0) & (p <= 1)))
    if bad.size:
        raise DataError(
            f"{bad.size} probabilities outside [0, 1] (flat indices {list_offenders(bad)}): "
            "pass sigmoid outputs, not logits"
        )


def _check_label_values(y: np.ndarray, allow_masked: bool) -> None:
    valid = (y == 0) | (y == 1) | (np.isnan(y) if allow_masked else False)
    if not valid.all():
        bad = np.unique(y[~valid])
        allowed = "1, 0 or NaN (masked)" if allow_masked else "1 or 0"
        raise DataError(f"labels must be {allowed}; found {list_offenders(bad.tolist())}")


def _weighted_auroc(pos: np.ndarray, groups: np.ndarray, n_groups: int, weights: np.ndarray) -> np.ndarray:
    """AUROC of each row of sample weights [B, n] (Mann-Whitney, ties count 1/2); NaN where one class.

    ``pos`` marks positives; ``groups`` index each sample's score among the sorted unique scores.
    Hand-written because calling sklearn's roc_auc_score once per resample is far slower (it re-sorts); with
    integer weights (bootstrap counts) it equals roc_auc_score on the resampled data (tested).
    """
    b = weights.shape[0]
    rows = np.arange(b)[:, None] * n_groups

    def per_group(cols: np.ndarray) -> np.ndarray:  # summed weight of each tie group, per resample
        flat = (rows + groups[cols][None, :]).ravel()
        return np.bincount(flat, weights=weights[:, cols].ravel(), minlength=b * n_groups).reshape(b, -1)

    w_pos, w_neg = per_group(pos), per_group(~pos)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    wins = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1)
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    out = np.full(b, np.nan)
    np.divide(wins, pairs, out=out, where=pairs > 0)
    return out


def _resampling_units(n: int, clusters: Sequence | np.ndarray | None) -> tuple[np.ndarray, int]:
    """The unit a bootstrap draws for each of `n` rows (the row itself, or its cluster: e.g. its study),
    as indices 0..n_units-1, and n_units."""
    if clusters is None:
        return np.arange(n), n
    _, unit = np.unique(np.asarray(clusters), return_inverse=True)
    unit = unit.ravel()
    return unit, int(unit.max()) + 1 if n else 0


def bootstrap_aurocs(
    y_true: np.ndarray,
    y_score: np.ndarray,
    n_bootstrap: int,
    seed: int = 0,
    clusters: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """AUROCs of `n_bootstrap` resamples: [B, L] for labels/scores [N, L] (NaN label = masked).

    All label columns share each resample of rows, so means over labels get joint CIs. With
    ``clusters`` (e.g. study ids per row) whole clusters are resampled, since their rows are correlated.
    Entries are NaN where a resample lacks a class for that label.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    n, n_labels = y.shape
    unit, n_units = _resampling_units(n, clusters)
    out = np.full((n_bootstrap, n_labels), np.nan)
    if n_bootstrap <= 0 or n == 0:
        return out
    prepared = []
    for j in range(n_labels):
        rows = np.flatnonzero(~np.isnan(y[:, j]))
        _, groups = np.unique(s[rows, j], return_inverse=True)
        n_groups = int(groups.max()) + 1 if rows.size else 0
        prepared.append((unit[rows], y[rows, j] == 1, groups.ravel(), n_groups))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, n_units))
    for first in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - first)
        draws = rng.integers(0, n_units, size=(b, n_units)) + np.arange(b)[:, None] * n_units
        counts = np.bincount(draws.ravel(), minlength=b * n_units).reshape(b, n_units).astype(np.float64)
        for j, (units, pos, groups, n_groups) in enumerate(prepared):
            if n_groups:
                out[first : first + b, j] = _weighted_auroc(pos, groups, n_groups, counts[:, units])
    return out


def summarise_bootstrap(point: float | None, boot: np.ndarray, alpha: float) -> dict[str, Any]:
    """Percentile CI of bootstrap values (NaN = skipped resample) around a point estimate."""
    valid = boot[~np.isnan(boot)]
    out: dict[str, Any] = {
        "ci_low": None,
        "ci_high": None,
        "n_bootstrap": int(boot.size),
        "n_bootstrap_skipped": int(boot.size - valid.size),
    }
    if point is None:
        return out
    if valid.size:
        low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
        out["ci_low"], out["ci_high"] = float(low), float(high)
    elif boot.size:
        out["ci_reason"] = "every bootstrap resample lacked a class"
    return out


def label_counts(y: np.ndarray) -> dict[str, int]:
    """n (labelled), positives, negatives and masked counts of a 1-D label vector."""
    return {
        "n": int((~np.isnan(y)).sum()),
        "positives": int((y == 1).sum()),
        "negatives": int((y == 0).sum()),
        "masked": int(np.isnan(y).sum()),
    }


def point_auroc(y: np.ndarray, s: np.ndarray) -> tuple[float | None, str | None]:
    """sklearn's AUROC over the unmasked entries, or (None, reason) when undefined."""
    from sklearn.metrics import roc_auc_score

    keep = ~np.isnan(y)
    if not keep.any():
        return None, NO_SAMPLES
    if np.unique(y[keep]).size < 2:
        return None, SINGLE_CLASS
    return float(roc_auc_score(y[keep], s[keep])), None


def auroc_with_ci(
    y_true: Any,
    y_score: Any,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Sequence | np.ndarray | None = None,
) -> dict[str, Any]:
    """AUROC with a percentile-bootstrap (1 - alpha) CI; NaN labels are masked out.

    Returns ``auroc, ci_low, ci_high, n, n_pos, n_neg, n_bootstrap, n_bootstrap_skipped`` (resamples that
    lacked a class are skipped and counted). When undefined: ``{"auroc": None, "reason": "single class"}``
    plus the counts. ``clusters`` (e.g. study ids) makes the bootstrap resample whole clusters.
    """
    y, s = check_binary(y_true, y_score)
    if clusters is not None and len(clusters) != len(y):
        raise DataError(f"clusters has {len(clusters)} entries for {len(y)} samples")
    counts = label_counts(y)
    base = {"n": counts["n"], "n_pos": counts["positives"], "n_neg": counts["negatives"]}
    point, reason = point_auroc(y, s)
    if point is None:
        return {"auroc": None, "reason": reason, "ci_low": None, "ci_high": None, **base}
    keep = ~np.isnan(y)  # masked rows play no part, so the result equals that of the labelled subset
    kept_clusters = None if clusters is None else np.asarray(clusters)[keep]
    boot = bootstrap_aurocs(y[keep, None], s[keep, None], n_bootstrap, seed, kept_clusters)[:, 0]
    return {"auroc": point, **summarise_bootstrap(point, boot, alpha), **base, "alpha": alpha}


def paired_auroc_difference(
    y_true: Any,
    score_a: Any,
    score_b: Any,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Sequence | np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean AUROC over labels of ``score_a`` minus that of ``score_b`` on the same rows [N, L] (NaN label =
    masked; labels with one class are left out of both means), with a paired percentile-bootstrap (1 - alpha)
    CI: each resample of rows, or of ``clusters``, scores both. ``difference`` is None when no label has
    both classes."""
    y = np.asarray(y_true, dtype=np.float64)
    a, b = (np.asarray(s, dtype=np.float64) for s in (score_a, score_b))
    if not (y.shape == a.shape == b.shape) or y.ndim != 2:
        raise DataError(f"labels {y.shape} and scores {a.shape}, {b.shape} must be [N, L] alike")
    of_a = [point_auroc(y[:, j], a[:, j])[0] for j in range(y.shape[1])]
    defined = [j for j, auroc in enumerate(of_a) if auroc is not None]
    if not defined:
        return {"difference": None, **summarise_bootstrap(None, np.empty(0), alpha)}
    of_b = [point_auroc(y[:, j], b[:, j])[0] for j in defined]
    point = float(np.mean([of_a[j] for j in defined]) - np.mean(of_b))
    y, a, b = y[:, defined], a[:, defined], b[:, defined]
    boot = bootstrap_aurocs(np.hstack([y, y]), np.hstack([a, b]), n_bootstrap, seed, clusters)
    n = len(defined)
    complete = ~np.isnan(boot).any(axis=1)  # a resample that lost a label's class is skipped
    diff = np.full(len(boot), np.nan)
    diff[complete] = boot[complete, :n].mean(axis=1) - boot[complete, n:].mean(axis=1)
    return {"difference": point, **summarise_bootstrap(point, diff, alpha)}


def roc_curves(y_true: Any, y_prob: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """ROC points per label column ({name: {"fpr", "tpr", "auroc"}}) for plotting; undefined labels omitted.

    Accepts [N] (one name) or [N, L] labels with NaN = masked.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[:, None], p[:, None]
    if y.shape != p.shape or y.shape[1] != len(names):
        raise DataError(f"labels {y.shape}, scores {p.shape} and {len(names)} names do not match")
    curves = {}
    for j, name in enumerate(names):
        yj, pj = check_binary(y[:, j], p[:, j])
        auc, _ = point_auroc(yj, pj)
        if auc is None:
            continue
        keep = ~np.isnan(yj)
        fpr, tpr, _ = roc_curve(yj[keep], pj[keep])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auroc": auc}
    return curves


def threshold_metrics(y_true: Any, y_prob: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Confusion counts, Cohen's kappa, sensitivity, specificity, accuracy with ``prob >= threshold``.

    Labels must be 1/0. A metric with a zero denominator is None, with the reason in ``undefined``.
    """
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    y, p = check_binary(y_true, y_prob, allow_masked=False)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y.astype(int), pred, labels=[0, 1]).ravel())
    undefined: dict[str, str] = {}

    def ratio(num: int, den: int, name: str, why: str) -> float | None:
        if den == 0:
            undefined[name] = why
            return None
        return num / den

    out: dict[str, Any] = {
        "threshold": threshold,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "sensitivity": ratio(tp, tp + fn, "sensitivity", "no positives"),
        "specificity": ratio(tn, tn + fp, "specificity", "no negatives"),
        "accuracy": ratio(tp + tn, len(y), "accuracy", "no samples"),
        "kappa": None,
    }
    # Kappa's chance agreement is 1 when labels and predictions are one and the same class: undefined.
    if len(y) and len({*np.unique(y.astype(int)), *np.unique(pred)}) > 1:
        out["kappa"] = float(cohen_kappa_score(y.astype(int), pred, labels=[0, 1]))
    else:
        undefined["kappa"] = "labels and predictions are all one class"
    if undefined:
        out["undefined"] = undefined
    return out


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 15) -> dict[str, Any]:
    """ECE of the positive-class probability over `n_bins` equal-width bins of [0, 1]; NaN labels masked.

    Per bin: ``count``, ``mean_confidence`` (mean predicted probability) and ``accuracy`` (observed
    fraction of positives), None for empty bins. ECE = sum over bins of count/n * |accuracy - confidence|.
    """
    if n_bins < 1:
        raise DataError(f"n_bins must be at least 1, got {n_bins}")
    y, p = check_binary(y_true, y_prob)
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    check_probabilities(p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Left-closed bins [e_k, e_k+1); a probability of exactly 1 joins the last bin.
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=p, minlength=n_bins)
    pos_sum = np.bincount(idx, weights=y, minlength=n_bins)
    bins = []
    for k in range(n_bins):
        c = int(count[k])
        bins.append(
            {
                "lower": float(edges[k]),
                "upper": float(edges[k + 1]),
                "count": c,
                "mean_confidence": float(conf_sum[k] / c) if c else None,
                "accuracy": float(pos_sum[k] / c) if c else None,
            }
        )
    n = int(count.sum())
    if n == 0:
        return {"ece": None, "reason": NO_SAMPLES, "n": 0, "n_bins": n_bins, "bins": bins}
    gaps = np.abs(pos_sum - conf_sum)  # = count * |accuracy - confidence| per bin
    return {"ece": float(gaps.sum() / n), "n": n, "n_bins": n_bins, "bins": bins}


def operating_points(
    y_true: Any,
    y_prob: Any,
    sensitivity: float = 0.95,
    specificity: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Sequence | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Candidate decision thresholds of one label (1/0 labels; NaN rows dropped), each with the
    sensitivity and specificity it gives on these data and their percentile bootstrap CIs:

    - ``youden``: the threshold of largest sensitivity + specificity - 1;
    - ``sensitivity>=S``: the highest threshold whose sensitivity reaches ``sensitivity`` (best specificity);
    - ``specificity>=T``: the lowest threshold whose specificity reaches ``specificity`` (best sensitivity).

    The thresholds are chosen on the same data they are scored on, so the point values are optimistic;
    the CIs (rows, or whole ``clusters`` such as studies, resampled at the fixed threshold) show the
    spread. An empty list when a class is missing.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    units = None if clusters is None else np.asarray(clusters)[keep]
    if len(np.unique(y)) < 2:
        return []
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)  # every distinct score
    thresholds = np.minimum(thresholds, 1.0)  # sklearn's first threshold is inf: nothing is positive
    spec = 1.0 - fpr
    chosen = [("youden", int(np.argmax(tpr - fpr)))]
    reach = np.flatnonzero(tpr >= sensitivity)  # thresholds fall along the curve: the first is the highest
    if reach.size:
        chosen.append((f"sensitivity>={sensitivity:g}", int(reach[0])))
    reach = np.flatnonzero(spec >= specificity)
    if reach.size:
        chosen.append((f"specificity>={specificity:g}", int(reach[-1])))
    # Resample rows (or whole clusters) as weights: row i counts as often as its unit was drawn.
    unit, n_units = _resampling_units(len(y), units)
    draws = np.random.default_rng(seed).integers(0, n_units, size=(n_bootstrap, n_units))
    counts = np.stack([np.bincount(d, minlength=n_units) for d in draws]) if n_bootstrap else None
    weights = counts[:, unit].astype(np.float64) if counts is not None else None
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def ci(hit: np.ndarray, among: np.ndarray) -> list[float] | None:
        """Percentile CI of mean(hit) over the rows `among`, across the resamples that have such rows."""
        if weights is None:
            return None
        den = weights[:, among].sum(axis=1)
        num = weights[:, among & hit].sum(axis=1)
        ok = den > 0
        return [float(v) for v in np.percentile(num[ok] / den[ok], q)] if ok.any() else None

    points = []
    positive = y == 1
    for rule, k in chosen:
        t = float(thresholds[k])
        pred = p >= t
        points.append(
            {
                "rule": rule,
                "threshold": t,
                "sensitivity": float(pred[positive].mean()),
                "specificity": float((~pred[~positive]).mean()),
                "sensitivity_ci": ci(pred, positive),
                "specificity_ci": ci(~pred, ~positive),
            }
        )
    return points
