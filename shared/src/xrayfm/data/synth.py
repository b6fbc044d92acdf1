"""Synthetic phantom radiographs with drawn-in findings and a ground-truth mask per finding.

Two seeded generators write complete datasets in the real on-disk layouts, so demos and tests go through
the real readers:

- :func:`synth_chest`: frontal chest phantoms in the CheXpert v1.0 layout (``train.csv``, ``valid.csv``,
  ``train/patientNNNNN/studyN/view1_frontal.jpg``). Findings: Cardiomegaly (enlarged heart shadow),
  Pleural Effusion (fluid with a meniscus at a lung base), Lung Opacity (a focal blob in a lung field; a
  large dense one is also labelled Consolidation).
- :func:`synth_bone`: long-bone phantoms in the MURA v1.1 layout (``XR_FOREARM`` and ``XR_HUMERUS``).
  An abnormal study shows a cortical fracture or a lucent lesion in at least one of its images.

Both write ``findings.csv`` (``Path,finding,mask_path,x0,y0,x1,y1``; one row per positive finding, box
``x1,y1`` exclusive), a binary PNG mask per row under ``masks/``, and ``SYNTHETIC.md`` saying plainly that
the images are phantoms, not medical data. The label rule is honest: a label is positive exactly when the
finding was drawn and is visible (its mask has pixels in the image).

Everything is drawn with numpy + PIL from analytic shapes: a projected "density" map (soft tissue, air,
bone) is built, then exposed (gain, gamma, blur, noise) into 8-bit grey. Every random draw comes from a
generator keyed by (seed, patient, study, image), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from xrayfm.data.base import SYNTHETIC_MARKER
from xrayfm.data.labels import CHEXPERT_LABELS
from xrayfm.errors import DataError

GENERATOR_VERSION = "2"  # 2: stronger bone findings, shown in more views of an abnormal study
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
FINDINGS_COLUMNS = ["Path", "finding", "mask_path", "x0", "y0", "x1", "y1"]
# Chest labels that are drawn (and so get masks); Consolidation = a large dense Lung Opacity.
CHEST_FINDINGS = ("Cardiomegaly", "Lung Opacity", "Pleural Effusion", "Consolidation")
BONE_FINDINGS = ("Fracture", "Lesion")
BONE_PARTS = ("XR_FOREARM", "XR_HUMERUS")
SPLITS = ("train", "valid")

_CHEST, _BONE = 1, 2  # seed-stream tags, so chest and bone of one seed are unrelated
_POS, _NEG, _UNC, _BLANK = "1.0", "0.0", "-1.0", ""
_ABSENT, _FAINT, _PRESENT = "absent", "faint", "present"

__all__ = [
    "BONE_FINDINGS",
    "BONE_PARTS",
    "CHEST_FINDINGS",
    "CHEXPERT_COLUMNS",
    "FINDINGS_COLUMNS",
    "GENERATOR_VERSION",
    "SYNTHETIC_MARKER",
    "synth_bone",
    "synth_chest",
]


# -- small numeric helpers ---------------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _sig(x: np.ndarray) -> np.ndarray:
    """Logistic step, used for soft (anti-aliased) shape edges."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float image.

    Hand-written as a sum of shifted copies because PIL's GaussianBlur only takes 8-bit images (we blur the
    float density before quantising) and scipy is not a dependency of the library.
    """
    if sigma <= 0:
        return a
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if ax == axis else (0, 0) for ax in range(2)]
        p = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        a = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return a.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean noise, smooth over ``cell`` pixels (bicubic upsampling of a coarse random grid)."""
    gh, gw = max(3, int(h / cell) + 3), max(3, int(w / cell) + 3)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _grid(h: int, w: int, size: int, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of half of ``size``, origin at (cx, cy), rotated by ``angle``."""
    half = size / 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x + 0.5 - w / 2) / half - float(cx)
    y = (y + 0.5 - h / 2) / half - float(cy)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return c * x + s * y, -s * x + c * y


def _expose(density: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Density map -> 8-bit radiograph: exposure (gain, offset, gamma), detector blur and noise."""
    gain, bias, gamma = rng.uniform(0.78, 1.0), rng.uniform(0.0, 0.07), rng.uniform(0.8, 1.25)
    blur_px, noise = rng.uniform(0.3, 0.8) * size / 128, rng.uniform(0.008, 0.03)
    img = np.clip(bias + gain * density, 0.0, 1.0) ** gamma
    img = _blur(img, blur_px)
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _min_pixels(h: int, w: int) -> int:
    """Smallest mask (in pixels) that counts as a visible finding."""
    return max(4, int(round(0.0008 * h * w)))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


# -- chest phantoms ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ChestAnatomy:
    """Patient-level anatomy (shared by a patient's studies). Units: half the image side."""

    body: float  # half-width of the thorax soft tissue
    shoulder: float  # where the neck widens into the shoulders (v)
    lung_x: float  # lung centre distance from the midline
    lung_w: float  # lung half-width at the base
    apex: float  # lung apex (v)
    dome: float  # top of the right hemidiaphragm (v)
    dome_drop: float  # how much lower the left dome sits
    dome_k: float  # dome curvature
    rib_space: float
    rib_phase: float
    rib_arch: float  # posterior ribs rise from the spine, then arch down laterally
    rib_rise: float
    spine_w: float
    mediastinum_w: float
    clavicle: float  # clavicle height at the midline (v)
    female: bool
    gastric_bubble: bool


@dataclass(frozen=True)
class _ChestFindings:
    """Study-level findings; each is absent, faint (borderline -> uncertain in train) or present."""

    ctr: float  # cardiothoracic ratio; > 0.5 is drawn as an (enlarged) finding
    cardiomegaly: str
    effusion: str
    effusion_side: int  # -1 right (image left), +1 left, 0 both
    effusion_height: float
    opacity: str
    opacity_side: int
    opacity_radius: float
    opacity_amp: float


def _chest_anatomy(rng: np.random.Generator, female: bool) -> _ChestAnatomy:
    scale = rng.uniform(0.9, 1.0) if female else rng.uniform(0.95, 1.05)
    return _ChestAnatomy(
        body=rng.uniform(0.86, 0.98) * scale,
        shoulder=rng.uniform(-0.98, -0.82),
        lung_x=rng.uniform(0.38, 0.44) * scale,
        lung_w=rng.uniform(0.27, 0.32) * scale,
        apex=rng.uniform(-0.82, -0.68),
        dome=rng.uniform(0.32, 0.48),
        dome_drop=rng.uniform(0.02, 0.08),
        dome_k=rng.uniform(1.6, 2.6),
        rib_space=rng.uniform(0.13, 0.18),
        rib_phase=rng.uniform(0.0, 1.0),
        rib_arch=rng.uniform(0.9, 1.4),
        rib_rise=rng.uniform(0.45, 0.7),
        spine_w=rng.uniform(0.06, 0.085),
        mediastinum_w=rng.uniform(0.1, 0.15),
        clavicle=rng.uniform(-0.78, -0.66),
        female=female,
        gastric_bubble=bool(rng.random() < 0.5),
    )


def _state(rng: np.random.Generator, p_present: float, p_faint: float) -> str:
    x = rng.random()
    return _PRESENT if x < p_present else _FAINT if x < p_present + p_faint else _ABSENT


def _chest_findings(rng: np.random.Generator) -> _ChestFindings:
    cardio = _state(rng, 0.3, 0.08)
    ctr = {
        _PRESENT: rng.uniform(0.56, 0.68),
        _FAINT: rng.uniform(0.51, 0.54),
        _ABSENT: rng.uniform(0.38, 0.47),
    }
    effusion, opacity = _state(rng, 0.3, 0.08), _state(rng, 0.3, 0.08)
    side = rng.choice([-1, 1, 0], p=[0.4, 0.4, 0.2])
    return _ChestFindings(
        ctr=float(ctr[cardio]),
        cardiomegaly=cardio,
        effusion=effusion,
        effusion_side=int(side) if effusion == _PRESENT else int(rng.choice([-1, 1])),
        effusion_height=float(rng.uniform(0.12, 0.3) if effusion == _PRESENT else rng.uniform(0.07, 0.1)),
        opacity=opacity,
        opacity_side=int(rng.choice([-1, 1])),
        opacity_radius=float(rng.uniform(0.1, 0.2) if opacity == _PRESENT else rng.uniform(0.07, 0.1)),
        opacity_amp=float(rng.uniform(0.15, 0.28) if opacity == _PRESENT else rng.uniform(0.06, 0.09)),
    )


def _is_consolidation(f: _ChestFindings) -> bool:
    """Labelling rule: a large, dense opacity is also called Consolidation."""
    return f.opacity == _PRESENT and f.opacity_radius > 0.15 and f.opacity_amp > 0.22


def _render_chest(
    a: _ChestAnatomy, f: _ChestFindings, size: int, key: tuple[int, ...]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one frontal (PA-style) chest phantom; returns the uint8 image and a mask per drawn finding.

    Random streams are split by purpose, so the same ``key`` with a finding switched off gives the same
    image except for that finding.
    """
    r_img, r_tex, r_opa = (np.random.default_rng(s) for s in np.random.SeedSequence(list(key)).spawn(3))
    cx, cy = r_img.uniform(-0.05, 0.05, 2)
    u, v = _grid(size, size, size, cx, cy, r_img.uniform(-0.05, 0.05))
    au = np.abs(u)
    e = 3.0 / size  # soft edge of ~1.5 px

    neck = 0.24
    half_w = neck + (a.body - neck) * _sig((v - a.shoulder) / 0.07)
    body = _sig((half_w - au) / 0.03)
    density = (0.32 + 0.03 * _smooth_noise(r_tex, size, size, size / 6)) * body

    # Lungs: rounded apex, lateral wall, cut from below by the hemidiaphragm domes.
    thorax = a.lung_x + 1.1 * a.lung_w  # inner margin of the ribs at the bases
    lungs, cores, domes = {}, {}, {}
    for s in (-1, 1):
        lc = s * a.lung_x
        top = a.dome + (a.dome_drop if s > 0 else 0.0)
        dome = top + a.dome_k * (u - 0.7 * lc) ** 2
        t = np.clip((v - a.apex) / (top - a.apex), 0.0, 1.0)
        half = a.lung_w * t**0.45 * (1.0 + 0.1 * t)
        lungs[s] = _sig((half - np.abs(u - lc)) / e) * _sig((dome - v) / e)
        domes[s] = dome
        cores[s] = (half - np.abs(u - lc) > 0.6 * f.opacity_radius) & (dome - v > 0.6 * f.opacity_radius)
    lung = np.maximum(lungs[-1], lungs[1])
    density -= 0.28 * lung * body
    abdomen = _sig((v - np.where(u < 0, domes[-1], domes[1])) / e)
    markings = 0.025 * _smooth_noise(r_tex, size, size, size / 12)
    markings += 0.012 * _smooth_noise(r_tex, size, size, size / 30)
    for s in (-1, 1):  # vessels fan out from the hila
        markings += 0.08 * np.exp(-((u - s * 0.16) ** 2 + (v + 0.02) ** 2) / 0.03)
    density += markings * lung

    # Cardiomediastinal silhouette: heart 1/3 right of the midline, 2/3 left, sitting on the left dome.
    hw = f.ctr * thorax
    hh = 0.24 + 0.2 * hw
    hx, hy = hw / 3.0, a.dome + a.dome_drop - 0.5 * hh
    rot = 0.15
    du, dv = u - hx, v - hy
    hu, hv = np.cos(rot) * du + np.sin(rot) * dv, -np.sin(rot) * du + np.cos(rot) * dv
    heart = _sig((1.0 - np.hypot(hu / hw, hv / hh)) * min(hw, hh) / e)
    upper = _sig((a.mediastinum_w - np.abs(u - 0.02)) / e) * _sig((hy - v) / 0.05)
    knob = _sig((0.06 - np.hypot(u - a.mediastinum_w - 0.02, v - (hy - hh - 0.1))) / e)
    # Soft-tissue masses do not add up where they meet: the heart's lower border merges with the diaphragm.
    density += np.maximum(0.42 * np.maximum(np.maximum(heart, upper), knob), 0.34 * abdomen) * body

    # Bones: spine with vertebral bodies, posterior and anterior ribs, clavicles.
    spine = _sig((a.spine_w - au) / e)
    density += spine * (0.16 + 0.02 * np.cos(2 * np.pi * v / (a.rib_space * 0.95)))
    shape = v + a.rib_rise * au - a.rib_arch * u**2
    spacing = a.rib_space * (1 + 0.2 * (v + 0.5))  # ribs spread out lower down
    ribs = ((1 + np.cos(2 * np.pi * (shape - a.rib_phase) / spacing)) / 2) ** 6
    ant = ((1 + np.cos(2 * np.pi * (v + 0.5 * au - a.rib_phase * 0.7) / (a.rib_space * 1.2))) / 2) ** 8
    cage = (
        _sig((thorax + 0.08 - au) / 0.03) * _sig((v - a.apex + 0.12) / 0.04) * _sig((a.dome + 0.2 - v) / 0.08)
    )
    density += cage * (1 - 0.7 * spine) * (0.1 * ribs + 0.03 * ant)
    clav_line = a.clavicle - 0.13 * (au - 0.05)
    clav = _sig((0.028 - np.abs(v - clav_line)) / e) * _sig((au - 0.06) / e) * _sig((0.62 - au) / 0.04)
    density += 0.15 * clav
    if a.female:
        for s in (-1, 1):
            density += 0.05 * _sig((0.3 - np.hypot(u - s * (a.lung_x + 0.05), v - a.dome - 0.1)) / 0.05)
    if a.gastric_bubble:
        density -= 0.12 * _sig((0.06 - np.hypot((u - 0.3) / 1.5, v - a.dome - a.dome_drop - 0.13)) / e) * body

    masks: dict[str, np.ndarray] = {}
    if f.cardiomegaly != _ABSENT:
        masks["Cardiomegaly"] = (heart > 0.5) & (abdomen < 0.5)  # the heart shadow above the domes

    if f.effusion != _ABSENT:
        sides = (-1, 1) if f.effusion_side == 0 else (f.effusion_side,)
        base, rise = (0.35, 1.0) if f.effusion == _PRESENT else (0.0, 1.0)
        fluid = np.zeros_like(u)
        for s in sides:  # meniscus: the fluid line climbs the lateral chest wall
            lateral = np.clip((s * u - 0.1) / (thorax - 0.1), 0.0, 1.0)
            level = domes[s] - f.effusion_height * (base + rise * lateral**2)
            fluid = np.maximum(fluid, _sig((v - level) / 0.02) * lungs[s])
        density += 0.42 * fluid
        masks["Pleural Effusion"] = fluid > 0.5

    # Draw the opacity's position unconditionally so the other streams stay aligned.
    pick, offsets = r_opa.random(), r_opa.normal(0.0, 0.35, (3, 2))
    sigmas, weights = r_opa.uniform(0.45, 0.8, 3), r_opa.uniform(0.6, 1.0, 3)
    texture = _smooth_noise(r_opa, size, size, size / 20)
    if f.opacity != _ABSENT:
        cand = np.argwhere(cores[f.opacity_side] & (heart < 0.3))
        if len(cand):
            y0, x0 = cand[int(pick * len(cand))]
            r = f.opacity_radius
            blob = np.zeros_like(u)
            for (ou, ov), sg, w in zip(offsets, sigmas, weights, strict=True):
                d2 = (u - u[y0, x0] - ou * r) ** 2 + (v - v[y0, x0] - ov * r) ** 2
                blob += w * np.exp(-d2 / (2 * (sg * r) ** 2))
            blob = blob / blob.max() * np.clip(1 + 0.2 * texture, 0.6, 1.4) * lung
            density += f.opacity_amp * blob
            masks["Lung Opacity"] = blob > 0.5
    return _expose(density, r_img, size), masks


def _chest_labels(
    f: _ChestFindings, drawn: dict[str, bool], split: str, rng: np.random.Generator
) -> list[str]:
    """The 14 CheXpert label strings, following what was drawn.

    present -> 1.0; faint -> -1.0 in train (the report labeller's "uncertain"), 1.0 in valid (consensus
    labels are all 0/1); absent -> 0.0 in valid, 0.0 or blank in train. Labels that are not modelled stay
    blank. No Finding is 1.0 only when nothing at all was drawn.
    """
    labels = dict.fromkeys(CHEXPERT_LABELS, _BLANK)
    states = {"Cardiomegaly": f.cardiomegaly, "Pleural Effusion": f.effusion, "Lung Opacity": f.opacity}
    valid = split == "valid"
    negatives = rng.random(4) < 0.5
    for (name, state), say_negative in zip(states.items(), negatives[:3], strict=True):
        if not drawn[name]:
            labels[name] = _NEG if valid or say_negative else _BLANK
        elif state == _FAINT and not valid:
            labels[name] = _UNC
        else:
            labels[name] = _POS
    consolidation = drawn["Lung Opacity"] and _is_consolidation(f)
    if consolidation:
        labels["Consolidation"] = _POS
        labels["Pneumonia"] = _BLANK if valid or rng.random() < 0.5 else _UNC
    elif valid or (not drawn["Lung Opacity"] and negatives[3]):
        labels["Consolidation"] = _NEG
    any_drawn = any(drawn.values())
    labels["No Finding"] = _POS if not any_drawn else _NEG if valid else _BLANK
    return [labels[name] for name in CHEXPERT_LABELS]


# -- bone phantoms -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BoneAnatomy:
    """Patient-level bone anatomy. Units: half the image width."""

    part: str
    radius: float  # outer radius of the (main) shaft
    cortex: float  # cortical thickness as a fraction of the radius
    flare: float  # metaphyseal widening at the joint end
    sep: float  # forearm: distance between the radius and ulna axes
    soft: float  # soft-tissue half-width
    soft_k: float  # soft-tissue density


@dataclass(frozen=True)
class _BoneView:
    """Image-level geometry: how the limb lies in this image."""

    height: int
    angle: float  # direction of the shaft towards the joint, radians from "up"
    u0: float
    v0: float
    a_end: float  # where the shaft ends at the joint, along the axis
    bend: float  # joint angle to the partner bone
    gap: float  # joint space


@dataclass(frozen=True)
class _BoneFinding:
    """Study-level abnormality, placed relative to the joint end so every view shows the same spot."""

    kind: str  # "Fracture" or "Lesion"
    bone: int  # forearm: 0 (radius) or 1 (ulna)
    dist: float  # distance from the joint end along the shaft
    tilt: float  # fracture obliquity / lesion offset across the shaft (fraction of the radius)
    width: float  # fracture gap (px) / lesion length (radii)
    shift: float  # fracture displacement (radii) / lesion depth
    angulation: float  # fracture angulation / sclerotic rim strength


def _bone_anatomy(rng: np.random.Generator, part: str) -> _BoneAnatomy:
    humerus = part == "XR_HUMERUS"
    radius = rng.uniform(0.12, 0.17) if humerus else rng.uniform(0.075, 0.1)
    return _BoneAnatomy(
        part=part,
        radius=radius,
        cortex=rng.uniform(0.25, 0.4),
        flare=rng.uniform(0.3, 0.6) if humerus else rng.uniform(0.2, 0.45),
        sep=rng.uniform(2.5, 3.2) * radius,
        soft=rng.uniform(0.45, 0.65) if humerus else rng.uniform(0.38, 0.52),
        soft_k=rng.uniform(0.26, 0.38),
    )


def _bone_view(rng: np.random.Generator, size: int) -> _BoneView:
    portrait = rng.random() < 0.5
    angle = rng.normal(0.0, 0.3) + (np.pi if rng.random() < 0.5 else 0.0)
    return _BoneView(
        height=int(size * 1.3) if portrait else size,
        angle=float(angle),
        u0=float(rng.uniform(-0.2, 0.2)),
        v0=float(rng.uniform(-0.15, 0.15)),
        a_end=float(rng.uniform(0.35, 0.8)),
        bend=float(rng.uniform(-0.6, 0.6)),
        gap=float(rng.uniform(0.04, 0.08)),
    )


def _bone_finding(rng: np.random.Generator) -> _BoneFinding:
    fracture = rng.random() < 0.5
    return _BoneFinding(
        kind="Fracture" if fracture else "Lesion",
        bone=int(rng.integers(2)),
        dist=float(rng.uniform(0.25, 1.1)),
        tilt=float(rng.uniform(-0.6, 0.6) if fracture else rng.uniform(-0.25, 0.25)),
        # Strong enough for a small ViT to learn in minutes on a CPU: a 3-5 px gap with a clearly
        # displaced fragment, or a lesion that removes most of the bone's density over 2-3 radii.
        width=float(rng.uniform(4.0, 6.0) if fracture else rng.uniform(2.5, 4.0)),
        shift=float(rng.choice([-1, 1]) * rng.uniform(0.5, 0.9) if fracture else rng.uniform(0.9, 1.0)),
        angulation=float(rng.uniform(-0.12, 0.12) if fracture else rng.uniform(0.0, 0.12)),
    )


def _tube(a: np.ndarray, c: np.ndarray, radius: float, cortex: float, flare: float) -> np.ndarray:
    """Projected density of a hollow long bone lying along ``a``, ending flared and rounded at ``a = 0``.

    A hollow cylinder seen from the side: chord lengths through the cortex (bright edges) plus the medulla.
    """
    grow = _smoothstep((a + 0.35) / 0.35)
    outer_r = radius * (1.0 + flare * grow)
    inner_r = outer_r - radius * cortex * (1.0 - 0.55 * grow)
    d2 = c**2 + (1.5 * np.maximum(a, 0.0)) ** 2  # a flattened, rounded joint surface
    outer = 2 * np.sqrt(np.maximum(outer_r**2 - d2, 0.0))
    inner = 2 * np.sqrt(np.maximum(inner_r**2 - d2, 0.0))
    return (outer - inner) * 3.0 + inner * (0.3 + 0.6 * grow)


def _bone_finding_draw(
    along: np.ndarray,
    c: np.ndarray,
    shaft: np.ndarray,
    radius: float,
    a: _BoneAnatomy,
    f: _BoneFinding,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a fracture or lucent lesion into one shaft's density; returns it and the finding's mask."""
    at = -f.dist
    if f.kind == "Fracture":
        sd = (along - at) * np.cos(f.tilt) + c * np.sin(f.tilt)  # signed distance to the fracture line
        # The joint-side fragment is displaced across the shaft and angulated about the break.
        ca, sa = np.cos(f.angulation), np.sin(f.angulation)
        ra, rc = along - at, c - f.shift * radius
        distal = _tube(ca * ra + sa * rc + at, -sa * ra + ca * rc, radius, a.cortex, a.flare)
        joined = np.where(sd > 0, distal, shaft)
        gap = f.width * 2.0 / size
        mask = (np.abs(sd) < 1.5 * gap + 1.0 / size) & (joined > 0.0)
        return joined * (1 - 0.98 * np.exp(-((sd / gap) ** 2))), mask
    # Wide enough across the shaft to erode both cortices: a lesion inside the (dark) medulla alone is faint.
    rr = np.hypot((along - at) / (f.width * radius), (c - f.tilt * radius) / (1.15 * radius))
    lucent = _sig((1 - rr) / 0.12)
    inside = shaft > 0.0
    rim = f.angulation * np.exp(-(((rr - 1.2) / 0.1) ** 2)) * inside  # sclerotic rim, just outside the lesion
    shaft = shaft * (1 - f.shift * lucent) + rim
    return shaft, (lucent > 0.5) & inside


def _render_bone(
    a: _BoneAnatomy, view: _BoneView, f: _BoneFinding | None, size: int, key: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one long-bone phantom; returns the uint8 image (height x size) and the finding mask (or None)."""
    r_img, r_tex = (np.random.default_rng(s) for s in np.random.SeedSequence(list(key)).spawn(2))
    h, w = view.height, size
    x, y = _grid(h, w, size, view.u0, view.v0, 0.0)
    # Coordinates along the shaft (towards the joint; 0 = end of the shaft) and across it.
    sin, cos = float(np.sin(view.angle)), float(np.cos(view.angle))
    along = x * sin - y * cos - view.a_end
    across = x * cos + y * sin

    forearm = a.part == "XR_FOREARM"
    end_r = a.radius * (1 + a.flare)
    partner_r = a.radius * (1.5 if forearm else 0.8)
    pivot = end_r + view.gap + partner_r * 1.35  # the partner bone's end, across the joint space
    cb, sb = float(np.cos(view.bend)), float(np.sin(view.bend))
    p_along = cb * (pivot - along) + sb * across
    p_across = -sb * (pivot - along) + cb * across

    def band(d: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(1 - (d / a.soft) ** 2, 0.0))

    tissue = np.maximum(band(across) * _sig((pivot - along) / 0.1), band(p_across) * _sig(-p_along / 0.1))
    density = 0.04 + 0.02 * _smooth_noise(r_tex, h, w, size / 4)
    density = density + a.soft_k * tissue * (1 + 0.08 * _smooth_noise(r_tex, h, w, size / 10))
    trabecular = 0.08 * _smooth_noise(r_tex, h, w, size / 40)

    shafts = [(0.0, a.radius)] if not forearm else [(-a.sep / 2, a.radius), (a.sep / 2, a.radius * 0.85)]
    target = (f.bone % len(shafts)) if f is not None else -1
    bone, mask = np.zeros_like(x), None
    for i, (offset, radius) in enumerate(shafts):
        c = across - offset * (1 - 0.12 * along)  # the two forearm bones converge slightly
        shaft = _tube(along, c, radius, a.cortex, a.flare)
        if i == target:
            shaft, mask = _bone_finding_draw(along, c, shaft, radius, a, f, size)
        bone += shaft
    bone += _tube(p_along, p_across, partner_r, a.cortex, 0.35)
    density = density + 0.45 * bone * (1 + trabecular)

    # Collimation: some images have a bright unexposed band along one edge, as on real plates.
    collimate, edge, depth = r_img.random() < 0.3, int(r_img.integers(4)), r_img.uniform(0.04, 0.12) * size
    if collimate:
        yy, xx = np.mgrid[0:h, 0:w]
        covered = [yy, h - 1 - yy, xx, w - 1 - xx][edge] < depth
        density = np.where(covered, 0.6, density)
        if mask is not None:
            mask &= ~covered
    return _expose(density, r_img, size), mask


# -- planning: patients, studies, splits ---------------------------------------------------------------------
@dataclass
class _Patient:
    index: int  # planning index: the patient's seed key, independent of split and numbering
    studies: list[int]  # images per study
    split: str = "train"
    number: int = 0  # the NNNNN of patientNNNNN

    @property
    def images(self) -> int:
        return sum(self.studies)


def _plan_chest(rng: np.random.Generator, n: int) -> list[_Patient]:
    """n single-image studies; about 8% of patients (at least one when n >= 4) have two studies."""
    twice = max(1, round(0.08 * n)) if n >= 4 else 0
    counts = [[1, 1]] * twice + [[1]] * (n - 2 * twice)
    order = rng.permutation(len(counts))
    return [_Patient(index=i, studies=list(counts[j])) for i, j in enumerate(order)]


def _plan_bone(rng: np.random.Generator, n: int, need_two: bool) -> list[_Patient]:
    """Studies of 1-3 images; about 15% of patients have two studies; n images in all."""
    patients: list[_Patient] = []
    total = 0
    while total < n:
        room = n - total - (1 if need_two and not patients else 0)
        studies = []
        for _ in range(2 if rng.random() < 0.15 else 1):
            k = min(int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])), room - sum(studies))
            if k > 0:
                studies.append(k)
        patients.append(_Patient(index=len(patients), studies=studies))
        total += sum(studies)
    return patients


def _assign_splits(rng: np.random.Generator, patients: list[_Patient], valid_fraction: float) -> None:
    """Patient-level split: whole patients go to valid until it holds ~valid_fraction of the images."""
    n = sum(p.images for p in patients)
    target = 0 if valid_fraction == 0 else min(n - 1, max(1, round(n * valid_fraction)))
    got = 0
    for i in rng.permutation(len(patients)):
        if got >= target:
            break
        if got + patients[i].images <= n - 1:  # keep at least one training image
            patients[i].split = "valid"
            got += patients[i].images
    number = 0
    for split in SPLITS:
        for p in patients:
            if p.split == split:
                number += 1
                p.number = number


# -- writing ----------------------------------------------------------------------------------------------
_GENERATED = (
    "train", "valid", "masks", "train.csv", "valid.csv", "findings.csv", "train_image_paths.csv",
    "valid_image_paths.csv", "train_labeled_studies.csv", "valid_labeled_studies.csv", SYNTHETIC_MARKER,
)  # fmt: skip


def _check_args(n: int, seed: int, size: int, valid_fraction: float) -> None:
    problems = []
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"n must be a positive integer (got {n!r})")
    elif valid_fraction > 0 and n < 2:
        problems.append(f"n must be at least 2 to have both splits (got {n}; or set valid_fraction=0)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"seed must be a non-negative integer (got {seed!r})")
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 1024:
        problems.append(f"size must be an integer from 32 to 1024 pixels (got {size!r})")
    if not 0 <= valid_fraction < 1:
        problems.append(f"valid_fraction must be in [0, 1) (got {valid_fraction!r})")
    if problems:
        raise DataError("; ".join(problems))


def _prepare_root(out: str | Path) -> Path:
    """Create the dataset root; clear an earlier synthetic one; refuse any other non-empty folder."""
    root = Path(out).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder")
    if root.exists() and any(root.iterdir()):
        if not (root / SYNTHETIC_MARKER).exists():
            raise DataError(
                f"{root} is not empty and has no {SYNTHETIC_MARKER}: refusing to write synthetic data "
                "into it (choose a new or empty folder)"
            )
        for name in _GENERATED:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _save(img: np.ndarray, path: Path, **options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **options)


def _save_mask(mask: np.ndarray, root: Path, rel: str) -> list[str]:
    """Write a binary (0/255) PNG mask; returns the findings.csv cells mask_path, x0, y0, x1, y1."""
    _save(mask.astype(np.uint8) * 255, root / rel, format="PNG")
    return [rel, *map(str, _bbox(mask))]


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


_LABEL_NOTES = {
    "chest": (
        "Labels: Cardiomegaly (cardiothoracic ratio above 0.5), Pleural Effusion (fluid with a\n"
        "meniscus at a lung base), Lung Opacity (a focal blob in a lung field) and Consolidation (a\n"
        "large, dense Lung Opacity) follow what was drawn. Borderline findings (ratio 0.51-0.54, a\n"
        "small blunted angle, a faint blob) are -1.0 (uncertain) in train.csv and have no mask; in\n"
        "valid.csv every visible finding is 1.0 and has one. No Finding is 1.0 only when nothing was\n"
        "drawn. Labels that are not modelled are blank (Pneumonia is sometimes -1.0 next to a\n"
        "Consolidation, with no mask)."
    ),
    "bone": (
        "Labels: a study is abnormal (1, `studyN_positive`) exactly when at least one of its images\n"
        "shows a drawn cortical fracture or lucent lesion. An image of an abnormal study with no row in\n"
        "`findings.csv` does not show it (another view, as in real studies)."
    ),
}


def _write_marker(
    root: Path, kind: str, layout: str, seed: int, n: int, size: int, valid_fraction: float
) -> None:
    text = f"""# SYNTHETIC DATA - these are not medical images

Every image in this folder is a synthetic phantom generated by the xrayfm library
(`xrayfm.data.synth`, generator version {GENERATOR_VERSION}). They are drawn from simple geometric shapes and
random numbers. No patient, no scanner and no real radiograph was involved. These are not medical data:
do not use them for any clinical purpose, and do not report results on them as results on real data.

- kind: {kind} ({layout} layout)
- seed: {seed}
- n (images): {n}
- size: {size}
- valid_fraction: {valid_fraction}
- generator version: {GENERATOR_VERSION}

The same seed, n, size, valid_fraction and generator version give byte-identical files.

Ground truth: `findings.csv` (`Path,finding,mask_path,x0,y0,x1,y1`) has one row per positive finding in
an image; `mask_path` (relative to this folder) is a binary PNG (255 = finding) of the image's size, and
the box is in pixels with x1, y1 exclusive.

{_LABEL_NOTES[kind]}
"""
    (root / SYNTHETIC_MARKER).write_text(text, encoding="utf-8")


def synth_chest(
    out: str | Path,
    n: int = 400,
    seed: int = 0,
    size: int = 128,
    valid_fraction: float = 0.2,
    progress: bool = True,
) -> dict:
    """Write ``n`` synthetic frontal chest phantoms in the CheXpert v1.0 layout; ``out`` is the dataset root.

    Returns a summary: root, images / patients per split, label counts and mask counts per split.
    """
    _check_args(n, seed, size, valid_fraction)
    root = _prepare_root(out)
    patients = _plan_chest(_rng(seed, _CHEST), n)
    _assign_splits(_rng(seed, _CHEST, 2**31), patients, valid_fraction)
    fields = {"Cardiomegaly": "cardiomegaly", "Pleural Effusion": "effusion", "Lung Opacity": "opacity"}
    min_px = _min_pixels(size, size)
    rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    findings: list[list[str]] = []
    masks_written = {s: dict.fromkeys(CHEST_FINDINGS, 0) for s in SPLITS}
    bar = tqdm(total=n, desc="synth chest", unit="img", disable=not progress)
    for p in sorted(patients, key=lambda p: p.number):
        prng = _rng(seed, _CHEST, p.index)
        female = bool(prng.random() < 0.5)
        anatomy, age = _chest_anatomy(prng, female), int(prng.integers(18, 86))
        for s in range(1, len(p.studies) + 1):
            srng = _rng(seed, _CHEST, p.index, s)
            f = _chest_findings(srng)
            key = (seed, _CHEST, p.index, s, 1)
            img, masks = _render_chest(anatomy, f, size, key)
            drawn = {name: name in masks and int(masks[name].sum()) >= min_px for name in fields}
            hidden = {fields[name]: _ABSENT for name, ok in drawn.items() if not ok}
            if any(getattr(f, attr) != _ABSENT for attr in hidden):  # too small to see: do not draw it
                f = replace(f, **hidden)
                img, masks = _render_chest(anatomy, f, size, key)
            labels = _chest_labels(f, drawn, p.split, srng)
            rel = f"{p.split}/patient{p.number:05d}/study{s}/view1_frontal.jpg"
            _save(img, root / rel, format="JPEG", quality=95)
            path = f"{root.name}/{rel}"
            projection = "AP" if srng.random() < 0.4 else "PA"
            sex = "Female" if female else "Male"
            rows[p.split].append([path, sex, str(age + s - 1), "Frontal", projection, *labels])
            for name in CHEST_FINDINGS:
                if labels[CHEXPERT_LABELS.index(name)] == _POS:
                    mask = masks["Lung Opacity" if name == "Consolidation" else name]
                    mask_rel = f"masks/{rel[: -len('.jpg')]}_{_slug(name)}.png"
                    findings.append([path, name, *_save_mask(mask, root, mask_rel)])
                    masks_written[p.split][name] += 1
            bar.update(1)
    bar.close()
    for split in SPLITS:
        _write_csv(root / f"{split}.csv", rows[split], CHEXPERT_COLUMNS)
    _write_csv(root / "findings.csv", findings, FINDINGS_COLUMNS)
    _write_marker(root, "chest", "CheXpert v1.0", seed, n, size, valid_fraction)

    def label_counts(split_rows: list[list[str]]) -> dict[str, dict[str, int]]:
        names = ["No Finding", *CHEST_FINDINGS, "Pneumonia"]
        values = {"positive": _POS, "negative": _NEG, "uncertain": _UNC, "blank": _BLANK}
        return {
            name: {
                k: sum(r[5 + CHEXPERT_LABELS.index(name)] == val for r in split_rows)
                for k, val in values.items()
            }
            for name in names
        }

    return {
        "root": str(root),
        "kind": "chest",
        "synthetic": True,
        "seed": seed,
        "size": size,
        "images": {s: len(rows[s]) for s in SPLITS},
        "patients": {s: sum(p.split == s for p in patients) for s in SPLITS},
        "studies": {s: sum(len(p.studies) for p in patients if p.split == s) for s in SPLITS},
        "labels": {s: label_counts(rows[s]) for s in SPLITS},
        "masks": masks_written,
    }


def synth_bone(
    out: str | Path,
    n: int = 400,
    seed: int = 0,
    size: int = 128,
    valid_fraction: float = 0.2,
    progress: bool = True,
) -> dict:
    """Write ``n`` synthetic long-bone phantoms in the MURA v1.1 layout; ``out`` is the dataset root.

    Images are ``size`` wide and ``size`` or ``int(1.3 * size)`` tall. Returns a summary: root, images,
    patients and positive/negative studies per split, finding (mask) counts per split, body parts.
    """
    _check_args(n, seed, size, valid_fraction)
    root = _prepare_root(out)
    patients = _plan_bone(_rng(seed, _BONE), n, need_two=valid_fraction > 0)
    _assign_splits(_rng(seed, _BONE, 2**31), patients, valid_fraction)
    image_rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    study_rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    findings: list[list[str]] = []
    studies = {s: {"positive": 0, "negative": 0} for s in SPLITS}
    masks_written = {s: dict.fromkeys(BONE_FINDINGS, 0) for s in SPLITS}
    parts = {s: dict.fromkeys(BONE_PARTS, 0) for s in SPLITS}
    bar = tqdm(total=n, desc="synth bone", unit="img", disable=not progress)
    for p in sorted(patients, key=lambda p: p.number):
        prng = _rng(seed, _BONE, p.index)
        part = BONE_PARTS[int(prng.integers(len(BONE_PARTS)))]
        anatomy = _bone_anatomy(prng, part)
        for s, count in enumerate(p.studies, 1):
            srng = _rng(seed, _BONE, p.index, s)
            abnormal, required, show = (
                srng.random() < 0.45,
                int(srng.integers(count)),
                srng.random(count) < 0.85,
            )
            keys = [(seed, _BONE, p.index, s, i) for i in range(1, count + 1)]
            views = [_bone_view(_rng(*k), size) for k in keys]
            min_px = [_min_pixels(v.height, size) for v in views]
            rendered: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
            finding = None
            if abnormal:  # place the finding so that the required view shows it (a few tries)
                for _ in range(30):
                    candidate = _bone_finding(srng)
                    img, mask = _render_bone(anatomy, views[required], candidate, size, keys[required])
                    if mask is not None and int(mask.sum()) >= min_px[required]:
                        finding, rendered[required] = candidate, (img, mask)
                        break
            for i in range(count):
                if i in rendered:
                    continue
                img, mask = None, None
                if finding is not None and show[i]:
                    img, mask = _render_bone(anatomy, views[i], finding, size, keys[i])
                if mask is None or int(mask.sum()) < min_px[i]:
                    img, mask = _render_bone(anatomy, views[i], None, size, keys[i])
                rendered[i] = (img, mask)
            label = "positive" if finding is not None else "negative"
            study_rel = f"{p.split}/{part}/patient{p.number:05d}/study{s}_{label}"
            study_rows[p.split].append([f"{root.name}/{study_rel}/", "1" if finding is not None else "0"])
            studies[p.split][label] += 1
            for i in range(count):
                img, mask = rendered[i]
                rel = f"{study_rel}/image{i + 1}.png"
                _save(img, root / rel, format="PNG")
                image_rows[p.split].append([f"{root.name}/{rel}"])
                parts[p.split][part] += 1
                if finding is not None and mask is not None:
                    mask_rel = f"masks/{rel[: -len('.png')]}_{_slug(finding.kind)}.png"
                    findings.append([f"{root.name}/{rel}", finding.kind, *_save_mask(mask, root, mask_rel)])
                    masks_written[p.split][finding.kind] += 1
                bar.update(1)
    bar.close()
    for split in SPLITS:
        _write_csv(root / f"{split}_image_paths.csv", image_rows[split])
        _write_csv(root / f"{split}_labeled_studies.csv", study_rows[split])
    _write_csv(root / "findings.csv", findings, FINDINGS_COLUMNS)
    _write_marker(root, "bone", "MURA v1.1", seed, n, size, valid_fraction)
    return {
        "root": str(root),
        "kind": "bone",
        "synthetic": True,
        "seed": seed,
        "size": size,
        "images": {s: len(image_rows[s]) for s in SPLITS},
        "patients": {s: sum(p.split == s for p in patients) for s in SPLITS},
        "studies": studies,
        "body_parts": parts,
        "masks": masks_written,
    }
