"""Cheap input checks in front of the domain gate: is this a radiograph of the kind the model knows?

Each check looks at the image or its header, not at the model, and costs well under a millisecond:

- **colour**: a radiograph is grey. Colourfulness (Hasler & Süsstrunk 2003: the spread and mean of the
  red-green and yellow-blue opponent channels) of the upload's colour thumbnail; grey pictures saved as
  RGB JPEGs score under 2 (chroma noise), photographs and screenshots with colour tens.
- **blank**: almost no contrast (the grey level's standard deviation under 4 of 255): an empty, black,
  white or constant picture.
- **noise**: neighbouring pixels unrelated (their correlation under 0.5): radiographs, even downscaled,
  correlate above 0.8; random noise near 0.
- **header**: a DICOM's Modality, BodyPartExamined and ViewPosition against what the version declares
  (:class:`DeclaredDomain`); an absent field is not held against the image.

The thresholds are fixed and documented rather than fitted: they separate grey radiographs from things
that are not radiographs at all. Whether a radiograph is one the model knows is the feature score's job
(:mod:`xrayfm.domain.gate`). Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

COLOURFUL = 12.0  # colourfulness above this: a colour picture, not a radiograph
BLANK_STD = 4.0  # grey standard deviation (0-255) below this: blank or constant
NOISE_CORRELATION = 0.5  # neighbour-pixel correlation below this: noise
CHECK_SIDE = 256  # the statistics are computed on at most this many pixels a side


@dataclass(frozen=True)
class Reason:
    """Why an image is outside a model's domain: a short stable code (also a metrics label) and words."""

    code: str
    message: str


@dataclass(frozen=True)
class InputFacts:
    """What the upload itself says, beyond its grey pixels: no patient data (technical header fields)."""

    colourfulness: float | None = None  # None: a grey image (nothing to measure)
    modality: str | None = None  # DICOM Modality, e.g. CR, DX
    body_part: str | None = None  # DICOM BodyPartExamined, e.g. CHEST
    view: str | None = None  # DICOM ViewPosition, e.g. AP, PA

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InputFacts:
        data = data or {}
        colour = data.get("colourfulness")
        return cls(
            colourfulness=None if colour is None else float(colour),
            **{k: (str(data[k]).strip().upper() or None) if data.get(k) else None
               for k in ("modality", "body_part", "view")},
        )  # fmt: skip


@dataclass(frozen=True)
class DeclaredDomain:
    """What a model version is for: words for people and the DICOM values it accepts (empty: any)."""

    description: str = "radiographs like the model's training images"
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ()
    views: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DeclaredDomain:
        data = dict(data or {})
        upper = {
            k: tuple(str(v).strip().upper() for v in data.get(k) or ())
            for k in ("modalities", "body_parts", "views")
        }
        return cls(description=str(data.get("description") or cls.description), **upper)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk's colourfulness of an RGB uint8 image [H, W, 3] (0 for grey)."""
    arr = np.asarray(rgb, dtype=np.float32)
    rg = arr[..., 0] - arr[..., 1]
    yb = 0.5 * (arr[..., 0] + arr[..., 1]) - arr[..., 2]
    spread = float(np.sqrt(rg.var() + yb.var()))
    mean = float(np.sqrt(rg.mean() ** 2 + yb.mean() ** 2))
    return spread + 0.3 * mean


def _small(image: np.ndarray) -> np.ndarray:
    """`image` subsampled (by striding: statistics, not looks) to at most CHECK_SIDE a side, as float."""
    step = max(1, int(np.ceil(max(image.shape) / CHECK_SIDE)))
    return np.asarray(image[::step, ::step], dtype=np.float32)


def neighbour_correlation(image: np.ndarray) -> float:
    """Mean correlation of horizontally and vertically adjacent pixels (1 for smooth images, ~0 noise)."""
    arr = _small(image)
    values = []
    for a, b in ((arr[:, :-1], arr[:, 1:]), (arr[:-1, :], arr[1:, :])):
        if a.size < 4:
            continue
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
        values.append(float((a * b).sum()) / denom if denom > 0 else 1.0)
    return float(np.mean(values)) if values else 1.0


def upload_facts(
    data: bytes, info: dict[str, Any] | None = None, max_pixels: int | None = None
) -> InputFacts:
    """What an upload (PNG, JPEG or DICOM bytes) says beyond its grey pixels: its colourfulness (colour
    files only: a small second decode) and a DICOM's Modality, BodyPartExamined and ViewPosition. `info`:
    its :func:`~xrayfm.data.images.image_info`, when already read."""
    from xrayfm.data.images import DEFAULT_MAX_PIXELS, colour_thumbnail, image_info

    info = info if info is not None else image_info(data)
    if info.get("format") == "DICOM":
        colour = str(info.get("photometric", "")).upper()
        return InputFacts(
            colourfulness=None if colour.startswith("MONOCHROME") or not colour else COLOURFUL + 1,
            modality=info.get("modality") or None,
            body_part=info.get("body_part") or None,
            view=info.get("view_position") or None,
        )
    if int(info.get("channels", 1)) < 3:
        return InputFacts()
    thumb = colour_thumbnail(data, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    return InputFacts(colourfulness=None if thumb is None else round(colourfulness(thumb), 3))


def input_reasons(image: np.ndarray, facts: InputFacts, declared: DeclaredDomain) -> list[Reason]:
    """The cheap checks' reasons to call `image` (2-D uint8 grey) out of `declared`'s domain; [] if none."""
    reasons: list[Reason] = []
    if facts.colourfulness is not None and facts.colourfulness > COLOURFUL:
        reasons.append(
            Reason("colour", f"a colour picture (colourfulness {facts.colourfulness:.0f} > {COLOURFUL:g}); "
                             "radiographs are grey")
        )  # fmt: skip
    std = float(_small(image).std())
    if std < BLANK_STD:
        reasons.append(Reason("blank", f"a blank or constant image (grey-level spread {std:.1f} of 255)"))
    else:
        corr = neighbour_correlation(image)
        if corr < NOISE_CORRELATION:
            reasons.append(
                Reason("noise", f"noise, not a picture (neighbouring pixels correlate {corr:.2f})")
            )
    for code, value, allowed, what in (
        ("modality", facts.modality, declared.modalities, "Modality"),
        ("body_part", facts.body_part, declared.body_parts, "BodyPartExamined"),
        ("view", facts.view, declared.views, "ViewPosition"),
    ):
        if value and allowed and value not in allowed:
            reasons.append(Reason(code, f"DICOM {what} {value}; this model knows {'/'.join(allowed)}"))
    return reasons


@dataclass
class DomainVerdict:
    """A model's word on whether it can judge an image: ``in_domain``, the feature score against its
    threshold (None without a fitted gate), and every reason it is not (empty when it is)."""

    in_domain: bool
    score: float | None = None
    threshold: float | None = None
    reasons: list[Reason] = field(default_factory=list)
    gate: str | None = None  # the gate's method; None: only the input checks ran

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_domain": self.in_domain,
            "score": None if self.score is None else round(float(self.score), 6),
            "threshold": None if self.threshold is None else round(float(self.threshold), 6),
            "reasons": [asdict(r) for r in self.reasons],
            "gate": self.gate,
        }


__all__ = [
    "BLANK_STD",
    "COLOURFUL",
    "NOISE_CORRELATION",
    "DeclaredDomain",
    "DomainVerdict",
    "InputFacts",
    "Reason",
    "colourfulness",
    "input_reasons",
    "neighbour_correlation",
    "upload_facts",
]
