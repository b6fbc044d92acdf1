"""Drift of what a served model sees and says, against the distributions stored when its gate was fitted.

The reference (``domain_gate.json``: ``reference.score_ratio`` and ``reference.probability``) holds the
decile edges of the held-out in-domain images' domain scores (as a ratio to the threshold) and
probabilities, and the share of those images in each bin. A rolling window of live values is binned the
same way and compared with the Population Stability Index, PSI = sum (a - e) ln(a / e) over the bins:
the usual reading is < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 a real shift. PSI is chosen over a KS
statistic because it is computed from the stored bins alone (no reference sample is kept) and its
thresholds are the convention operations teams already alert on.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

EPSILON = 1e-4  # an empty bin counts as this share (PSI is infinite otherwise)
MIN_VALUES = 50  # fewer live values: no PSI yet (it would be noise)


def psi(reference: dict[str, Any], values: Any) -> float:
    """The PSI of `values` against a reference ``{"edges": [...], "fractions": [...]}``."""
    edges = np.asarray(reference["edges"], dtype=np.float64)
    expected = np.clip(np.asarray(reference["fractions"], dtype=np.float64), EPSILON, None)
    counts = np.bincount(np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="right"),
                         minlength=len(expected))  # fmt: skip
    actual = np.clip(counts / max(counts.sum(), 1), EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class RollingDrift:
    """The last `window` values of one quantity and their PSI against a reference."""

    def __init__(self, reference: dict[str, Any], window: int = 500) -> None:
        self.reference = reference
        self.values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> float | None:
        """Add a value; the window's PSI, or None while it holds fewer than MIN_VALUES."""
        self.values.append(float(value))
        return psi(self.reference, self.values) if len(self.values) >= MIN_VALUES else None


__all__ = ["MIN_VALUES", "RollingDrift", "psi"]
