"""Label vocabularies and uncertainty policies.

Raw labels keep what the files say: 1 (positive), 0 (negative), -1 (uncertain), NaN (blank).
A :class:`LabelPolicy` turns them into training targets: 1, 0, or NaN (masked out of loss and metrics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from xrayfm.errors import DataError

# The 14 CheXpert observations, in the official column order.
CHEXPERT_LABELS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]

# CheXpert's five competition tasks (Irvin et al. 2019).
COMPETITION_TASKS: list[str] = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

UNCERTAIN_RULES = ("u-ones", "u-zeros", "u-ignore")
BLANK_RULES = ("zero", "mask")

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


@dataclass(frozen=True)
class LabelPolicy:
    """How raw labels become targets.

    uncertain: one rule for every label (``u-ones``, ``u-zeros``, ``u-ignore``), with optional
        per-label overrides in ``per_label`` (e.g. U-Ones for Atelectasis and Edema only).
    blank: ``zero`` counts a blank as negative (the CheXpert paper's choice); ``mask`` ignores it.
    """

    uncertain: str = "u-ones"
    blank: str = "zero"
    per_label: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rule in (self.uncertain, *self.per_label.values()):
            if rule not in UNCERTAIN_RULES:
                raise DataError(
                    f"unknown uncertainty policy {rule!r}; choose from {', '.join(UNCERTAIN_RULES)}"
                )
        if self.blank not in BLANK_RULES:
            raise DataError(f"unknown blank policy {self.blank!r}; choose from {', '.join(BLANK_RULES)}")

    def rule_for(self, label: str) -> str:
        return self.per_label.get(label, self.uncertain)

    def apply(self, raw: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """Map raw labels [N, L] (1/0/-1/NaN) to float32 targets (1/0/NaN = masked)."""
        raw = np.asarray(raw, dtype=np.float32)
        out = raw.copy()
        blank = np.isnan(raw)
        out[blank] = 0.0 if self.blank == "zero" else np.nan
        for j, name in enumerate(names):
            unc = raw[:, j] == UNCERTAIN
            out[unc, j] = {"u-ones": 1.0, "u-zeros": 0.0, "u-ignore": np.nan}[self.rule_for(name)]
        return out

    def describe(self) -> str:
        """Round-trippable text form, e.g. ``u-zeros;Atelectasis=u-ones;blank=zero``."""
        parts = [
            self.uncertain,
            *(f"{k}={v}" for k, v in sorted(self.per_label.items())),
            f"blank={self.blank}",
        ]
        return ";".join(parts)


def parse_policy(spec: str | LabelPolicy | None, known_labels: Sequence[str] | None = None) -> LabelPolicy:
    """Parse a policy string.

    Forms: ``u-ones``; ``u-zeros;Atelectasis=u-ones;Edema=u-ones``; any of them with ``;blank=mask``.
    ``known_labels`` checks per-label names (a typo is an error, not a silent no-op).
    """
    if spec is None:
        return LabelPolicy()
    if isinstance(spec, LabelPolicy):
        return spec
    default, blank, per_label = "u-ones", "zero", {}
    for part in (p.strip() for p in spec.replace(",", ";").split(";")):
        if not part:
            continue
        if "=" not in part:
            default = part.lower()
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        if key.lower() == "blank":
            blank = value.lower()
        elif key == "*":
            default = value.lower()
        else:
            per_label[key] = value.lower()
    if known_labels is not None:
        unknown = sorted(set(per_label) - set(known_labels))
        if unknown:
            raise DataError(
                f"policy names unknown labels: {', '.join(unknown)}; known: {', '.join(known_labels)}"
            )
    return LabelPolicy(uncertain=default, blank=blank, per_label=per_label)


def count_raw(raw: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per label: positive / negative / uncertain / blank counts of raw labels."""
    raw = np.asarray(raw, dtype=np.float32)
    return {
        name: {
            "positive": int((raw[:, j] == POSITIVE).sum()),
            "negative": int((raw[:, j] == NEGATIVE).sum()),
            "uncertain": int((raw[:, j] == UNCERTAIN).sum()),
            "blank": int(np.isnan(raw[:, j]).sum()),
        }
        for j, name in enumerate(names)
    }


def count_targets(targets: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per label: positive / negative / masked counts of policy-applied targets."""
    targets = np.asarray(targets, dtype=np.float32)
    return {
        name: {
            "positive": int((targets[:, j] == 1).sum()),
            "negative": int((targets[:, j] == 0).sum()),
            "masked": int(np.isnan(targets[:, j]).sum()),
        }
        for j, name in enumerate(names)
    }
