"""Chest phantoms: patient anatomy, study findings, the rendered frontal image with its masks, and labels.

Findings: Cardiomegaly (enlarged heart shadow), Pleural Effusion (fluid with a meniscus at a lung base),
Lung Opacity (a focal blob in a lung field; a large dense one is also labelled Consolidation). Each is
absent, faint (borderline: "uncertain" in train) or present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xrayfm.data.labels import CHEXPERT_LABELS
from xrayfm.data.synth.draw import expose, grid, sig, smooth_noise

# Chest labels that are drawn (and so get masks); Consolidation = a large dense Lung Opacity.
CHEST_FINDINGS = ("Cardiomegaly", "Lung Opacity", "Pleural Effusion", "Consolidation")
POS, NEG, UNC, BLANK = "1.0", "0.0", "-1.0", ""  # label cells as CheXpert writes them
ABSENT, FAINT, PRESENT = "absent", "faint", "present"  # finding states


@dataclass(frozen=True)
class ChestAnatomy:
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
class ChestFindings:
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


def chest_anatomy(rng: np.random.Generator, female: bool) -> ChestAnatomy:
    scale = rng.uniform(0.9, 1.0) if female else rng.uniform(0.95, 1.05)
    return ChestAnatomy(
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
    return PRESENT if x < p_present else FAINT if x < p_present + p_faint else ABSENT


def chest_findings(rng: np.random.Generator) -> ChestFindings:
    cardio = _state(rng, 0.3, 0.08)
    ctr = {
        PRESENT: rng.uniform(0.56, 0.68),
        FAINT: rng.uniform(0.51, 0.54),
        ABSENT: rng.uniform(0.38, 0.47),
    }
    effusion, opacity = _state(rng, 0.3, 0.08), _state(rng, 0.3, 0.08)
    side = rng.choice([-1, 1, 0], p=[0.4, 0.4, 0.2])
    return ChestFindings(
        ctr=float(ctr[cardio]),
        cardiomegaly=cardio,
        effusion=effusion,
        effusion_side=int(side) if effusion == PRESENT else int(rng.choice([-1, 1])),
        effusion_height=float(rng.uniform(0.12, 0.3) if effusion == PRESENT else rng.uniform(0.07, 0.1)),
        opacity=opacity,
        opacity_side=int(rng.choice([-1, 1])),
        opacity_radius=float(rng.uniform(0.1, 0.2) if opacity == PRESENT else rng.uniform(0.07, 0.1)),
        opacity_amp=float(rng.uniform(0.15, 0.28) if opacity == PRESENT else rng.uniform(0.06, 0.09)),
    )


def is_consolidation(f: ChestFindings) -> bool:
    """Labelling rule: a large, dense opacity is also called Consolidation."""
    return f.opacity == PRESENT and f.opacity_radius > 0.15 and f.opacity_amp > 0.22


def render_chest(
    a: ChestAnatomy, f: ChestFindings, size: int, key: tuple[int, ...]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one frontal (PA-style) chest phantom; returns the uint8 image and a mask per drawn finding.

    Random streams are split by purpose, so the same ``key`` with a finding switched off gives the same
    image except for that finding.
    """
    r_img, r_tex, r_opa = (np.random.default_rng(s) for s in np.random.SeedSequence(list(key)).spawn(3))
    cx, cy = r_img.uniform(-0.05, 0.05, 2)
    u, v = grid(size, size, size, cx, cy, r_img.uniform(-0.05, 0.05))
    au = np.abs(u)
    e = 3.0 / size  # soft edge of ~1.5 px

    neck = 0.24
    half_w = neck + (a.body - neck) * sig((v - a.shoulder) / 0.07)
    body = sig((half_w - au) / 0.03)
    density = (0.32 + 0.03 * smooth_noise(r_tex, size, size, size / 6)) * body

    # Lungs: rounded apex, lateral wall, cut from below by the hemidiaphragm domes.
    thorax = a.lung_x + 1.1 * a.lung_w  # inner margin of the ribs at the bases
    lungs, cores, domes = {}, {}, {}
    for s in (-1, 1):
        lc = s * a.lung_x
        top = a.dome + (a.dome_drop if s > 0 else 0.0)
        dome = top + a.dome_k * (u - 0.7 * lc) ** 2
        t = np.clip((v - a.apex) / (top - a.apex), 0.0, 1.0)
        half = a.lung_w * t**0.45 * (1.0 + 0.1 * t)
        lungs[s] = sig((half - np.abs(u - lc)) / e) * sig((dome - v) / e)
        domes[s] = dome
        cores[s] = (half - np.abs(u - lc) > 0.6 * f.opacity_radius) & (dome - v > 0.6 * f.opacity_radius)
    lung = np.maximum(lungs[-1], lungs[1])
    density -= 0.28 * lung * body
    abdomen = sig((v - np.where(u < 0, domes[-1], domes[1])) / e)
    markings = 0.025 * smooth_noise(r_tex, size, size, size / 12)
    markings += 0.012 * smooth_noise(r_tex, size, size, size / 30)
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
    heart = sig((1.0 - np.hypot(hu / hw, hv / hh)) * min(hw, hh) / e)
    upper = sig((a.mediastinum_w - np.abs(u - 0.02)) / e) * sig((hy - v) / 0.05)
    knob = sig((0.06 - np.hypot(u - a.mediastinum_w - 0.02, v - (hy - hh - 0.1))) / e)
    # Soft-tissue masses do not add up where they meet: the heart's lower border merges with the diaphragm.
    density += np.maximum(0.42 * np.maximum(np.maximum(heart, upper), knob), 0.34 * abdomen) * body

    # Bones: spine with vertebral bodies, posterior and anterior ribs, clavicles.
    spine = sig((a.spine_w - au) / e)
    density += spine * (0.16 + 0.02 * np.cos(2 * np.pi * v / (a.rib_space * 0.95)))
    shape = v + a.rib_rise * au - a.rib_arch * u**2
    spacing = a.rib_space * (1 + 0.2 * (v + 0.5))  # ribs spread out lower down
    ribs = ((1 + np.cos(2 * np.pi * (shape - a.rib_phase) / spacing)) / 2) ** 6
    ant = ((1 + np.cos(2 * np.pi * (v + 0.5 * au - a.rib_phase * 0.7) / (a.rib_space * 1.2))) / 2) ** 8
    cage = sig((thorax + 0.08 - au) / 0.03) * sig((v - a.apex + 0.12) / 0.04) * sig((a.dome + 0.2 - v) / 0.08)
    density += cage * (1 - 0.7 * spine) * (0.1 * ribs + 0.03 * ant)
    clav_line = a.clavicle - 0.13 * (au - 0.05)
    clav = sig((0.028 - np.abs(v - clav_line)) / e) * sig((au - 0.06) / e) * sig((0.62 - au) / 0.04)
    density += 0.15 * clav
    if a.female:
        for s in (-1, 1):
            density += 0.05 * sig((0.3 - np.hypot(u - s * (a.lung_x + 0.05), v - a.dome - 0.1)) / 0.05)
    if a.gastric_bubble:
        density -= 0.12 * sig((0.06 - np.hypot((u - 0.3) / 1.5, v - a.dome - a.dome_drop - 0.13)) / e) * body

    masks: dict[str, np.ndarray] = {}
    if f.cardiomegaly != ABSENT:
        masks["Cardiomegaly"] = (heart > 0.5) & (abdomen < 0.5)  # the heart shadow above the domes

    if f.effusion != ABSENT:
        sides = (-1, 1) if f.effusion_side == 0 else (f.effusion_side,)
        base, rise = (0.35, 1.0) if f.effusion == PRESENT else (0.0, 1.0)
        fluid = np.zeros_like(u)
        for s in sides:  # meniscus: the fluid line climbs the lateral chest wall
            lateral = np.clip((s * u - 0.1) / (thorax - 0.1), 0.0, 1.0)
            level = domes[s] - f.effusion_height * (base + rise * lateral**2)
            fluid = np.maximum(fluid, sig((v - level) / 0.02) * lungs[s])
        density += 0.42 * fluid
        masks["Pleural Effusion"] = fluid > 0.5

    # Draw the opacity's position unconditionally so the other streams stay aligned.
    pick, offsets = r_opa.random(), r_opa.normal(0.0, 0.35, (3, 2))
    sigmas, weights = r_opa.uniform(0.45, 0.8, 3), r_opa.uniform(0.6, 1.0, 3)
    texture = smooth_noise(r_opa, size, size, size / 20)
    if f.opacity != ABSENT:
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
    return expose(density, r_img, size), masks


def chest_labels(f: ChestFindings, drawn: dict[str, bool], split: str, rng: np.random.Generator) -> list[str]:
    """The 14 CheXpert label strings, following what was drawn.

    present -> 1.0; faint -> -1.0 in train (the report labeller's "uncertain"), 1.0 in valid (consensus
    labels are all 0/1); absent -> 0.0 in valid, 0.0 or blank in train. Labels that are not modelled stay
    blank. No Finding is 1.0 only when nothing at all was drawn.
    """
    labels = dict.fromkeys(CHEXPERT_LABELS, BLANK)
    states = {"Cardiomegaly": f.cardiomegaly, "Pleural Effusion": f.effusion, "Lung Opacity": f.opacity}
    valid = split == "valid"
    negatives = rng.random(4) < 0.5
    for (name, state), say_negative in zip(states.items(), negatives[:3], strict=True):
        if not drawn[name]:
            labels[name] = NEG if valid or say_negative else BLANK
        elif state == FAINT and not valid:
            labels[name] = UNC
        else:
            labels[name] = POS
    consolidation = drawn["Lung Opacity"] and is_consolidation(f)
    if consolidation:
        labels["Consolidation"] = POS
        labels["Pneumonia"] = BLANK if valid or rng.random() < 0.5 else UNC
    elif valid or (not drawn["Lung Opacity"] and negatives[3]):
        labels["Consolidation"] = NEG
    any_drawn = any(drawn.values())
    labels["No Finding"] = POS if not any_drawn else NEG if valid else BLANK
    return [labels[name] for name in CHEXPERT_LABELS]


__all__ = [
    "ABSENT",
    "BLANK",
    "CHEST_FINDINGS",
    "FAINT",
    "NEG",
    "POS",
    "PRESENT",
    "UNC",
    "ChestAnatomy",
    "ChestFindings",
    "chest_anatomy",
    "chest_findings",
    "chest_labels",
    "is_consolidation",
    "render_chest",
]
