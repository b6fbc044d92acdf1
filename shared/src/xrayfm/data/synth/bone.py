"""Long-bone phantoms (forearm, humerus): patient anatomy, view geometry, a fracture or lesion, the image.

A finding is placed relative to the joint end of the shaft, so every view of a study shows the same spot
(when it is in the image at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xrayfm.data.synth.draw import expose, grid, sig, smooth_noise, smoothstep

BONE_FINDINGS = ("Fracture", "Lesion")
BONE_PARTS = ("XR_FOREARM", "XR_HUMERUS")


@dataclass(frozen=True)
class BoneAnatomy:
    """Patient-level bone anatomy. Units: half the image width."""

    part: str
    radius: float  # outer radius of the (main) shaft
    cortex: float  # cortical thickness as a fraction of the radius
    flare: float  # metaphyseal widening at the joint end
    sep: float  # forearm: distance between the radius and ulna axes
    soft: float  # soft-tissue half-width
    soft_k: float  # soft-tissue density


@dataclass(frozen=True)
class BoneView:
    """Image-level geometry: how the limb lies in this image."""

    height: int
    angle: float  # direction of the shaft towards the joint, radians from "up"
    u0: float
    v0: float
    a_end: float  # where the shaft ends at the joint, along the axis
    bend: float  # joint angle to the partner bone
    gap: float  # joint space


@dataclass(frozen=True)
class BoneFinding:
    """Study-level abnormality, placed relative to the joint end so every view shows the same spot."""

    kind: str  # "Fracture" or "Lesion"
    bone: int  # forearm: 0 (radius) or 1 (ulna)
    dist: float  # distance from the joint end along the shaft
    tilt: float  # fracture obliquity / lesion offset across the shaft (fraction of the radius)
    width: float  # fracture gap (px) / lesion length (radii)
    shift: float  # fracture displacement (radii) / lesion depth
    angulation: float  # fracture angulation / sclerotic rim strength


def bone_anatomy(rng: np.random.Generator, part: str) -> BoneAnatomy:
    humerus = part == "XR_HUMERUS"
    radius = rng.uniform(0.12, 0.17) if humerus else rng.uniform(0.075, 0.1)
    return BoneAnatomy(
        part=part,
        radius=radius,
        cortex=rng.uniform(0.25, 0.4),
        flare=rng.uniform(0.3, 0.6) if humerus else rng.uniform(0.2, 0.45),
        sep=rng.uniform(2.5, 3.2) * radius,
        soft=rng.uniform(0.45, 0.65) if humerus else rng.uniform(0.38, 0.52),
        soft_k=rng.uniform(0.26, 0.38),
    )


def bone_view(rng: np.random.Generator, size: int) -> BoneView:
    portrait = rng.random() < 0.5
    angle = rng.normal(0.0, 0.3) + (np.pi if rng.random() < 0.5 else 0.0)
    return BoneView(
        height=int(size * 1.3) if portrait else size,
        angle=float(angle),
        u0=float(rng.uniform(-0.2, 0.2)),
        v0=float(rng.uniform(-0.15, 0.15)),
        a_end=float(rng.uniform(0.35, 0.8)),
        bend=float(rng.uniform(-0.6, 0.6)),
        gap=float(rng.uniform(0.04, 0.08)),
    )


def bone_finding(rng: np.random.Generator) -> BoneFinding:
    fracture = rng.random() < 0.5
    return BoneFinding(
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
    grow = smoothstep((a + 0.35) / 0.35)
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
    a: BoneAnatomy,
    f: BoneFinding,
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
    lucent = sig((1 - rr) / 0.12)
    inside = shaft > 0.0
    rim = f.angulation * np.exp(-(((rr - 1.2) / 0.1) ** 2)) * inside  # sclerotic rim, just outside the lesion
    shaft = shaft * (1 - f.shift * lucent) + rim
    return shaft, (lucent > 0.5) & inside


def render_bone(
    a: BoneAnatomy, view: BoneView, f: BoneFinding | None, size: int, key: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one long-bone phantom; returns the uint8 image (height x size) and the finding mask (or None)."""
    r_img, r_tex = (np.random.default_rng(s) for s in np.random.SeedSequence(list(key)).spawn(2))
    h, w = view.height, size
    x, y = grid(h, w, size, view.u0, view.v0, 0.0)
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

    tissue = np.maximum(band(across) * sig((pivot - along) / 0.1), band(p_across) * sig(-p_along / 0.1))
    density = 0.04 + 0.02 * smooth_noise(r_tex, h, w, size / 4)
    density = density + a.soft_k * tissue * (1 + 0.08 * smooth_noise(r_tex, h, w, size / 10))
    trabecular = 0.08 * smooth_noise(r_tex, h, w, size / 40)

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
    return expose(density, r_img, size), mask


__all__ = [
    "BONE_FINDINGS",
    "BONE_PARTS",
    "BoneAnatomy",
    "BoneFinding",
    "BoneView",
    "bone_anatomy",
    "bone_finding",
    "bone_view",
    "render_bone",
]
