"""Writing phantom datasets in the real on-disk layouts: CheXpert v1.0 (chest) and MURA v1.1 (bone).

:func:`synth_chest` and :func:`synth_bone` plan the patients (:mod:`~xrayfm.data.synth.plan`), draw each
image (:mod:`~xrayfm.data.synth.chest`, :mod:`~xrayfm.data.synth.bone`), and write the images, the label
files, ``findings.csv`` with a PNG mask per finding, and ``SYNTHETIC.md``.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from xrayfm.data.base import SYNTHETIC_MARKER
from xrayfm.data.labels import CHEXPERT_LABELS
from xrayfm.data.synth.bone import (
    BONE_FINDINGS,
    BONE_PARTS,
    bone_anatomy,
    bone_finding,
    bone_view,
    render_bone,
)
from xrayfm.data.synth.chest import (
    ABSENT,
    BLANK,
    CHEST_FINDINGS,
    NEG,
    POS,
    UNC,
    chest_anatomy,
    chest_findings,
    chest_labels,
    render_chest,
)
from xrayfm.data.synth.draw import keyed_rng
from xrayfm.data.synth.plan import SPLITS, assign_splits, plan_bone, plan_chest
from xrayfm.errors import DataError

GENERATOR_VERSION = "2"  # 2: stronger bone findings, shown in more views of an abnormal study
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
FINDINGS_COLUMNS = ["Path", "finding", "mask_path", "x0", "y0", "x1", "y1"]
_CHEST, _BONE = 1, 2  # seed-stream tags, so chest and bone of one seed are unrelated


def _min_pixels(h: int, w: int) -> int:
    """Smallest mask (in pixels) that counts as a visible finding."""
    return max(4, int(round(0.0008 * h * w)))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) of a mask's pixels, x1 and y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _slug(name: str) -> str:
    """A label as a file-name part: "Lung Opacity" -> "lung_opacity"."""
    return name.lower().replace(" ", "_")


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
    patients = plan_chest(keyed_rng(seed, _CHEST), n)
    assign_splits(keyed_rng(seed, _CHEST, 2**31), patients, valid_fraction)
    fields = {"Cardiomegaly": "cardiomegaly", "Pleural Effusion": "effusion", "Lung Opacity": "opacity"}
    min_px = _min_pixels(size, size)
    rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    findings: list[list[str]] = []
    masks_written = {s: dict.fromkeys(CHEST_FINDINGS, 0) for s in SPLITS}
    bar = tqdm(total=n, desc="synth chest", unit="img", disable=not progress)
    for p in sorted(patients, key=lambda p: p.number):
        prng = keyed_rng(seed, _CHEST, p.index)
        female = bool(prng.random() < 0.5)
        anatomy, age = chest_anatomy(prng, female), int(prng.integers(18, 86))
        for s in range(1, len(p.studies) + 1):
            srng = keyed_rng(seed, _CHEST, p.index, s)
            f = chest_findings(srng)
            key = (seed, _CHEST, p.index, s, 1)
            img, masks = render_chest(anatomy, f, size, key)
            drawn = {name: name in masks and int(masks[name].sum()) >= min_px for name in fields}
            hidden = {fields[name]: ABSENT for name, ok in drawn.items() if not ok}
            if any(getattr(f, attr) != ABSENT for attr in hidden):  # too small to see: do not draw it
                f = replace(f, **hidden)
                img, masks = render_chest(anatomy, f, size, key)
            labels = chest_labels(f, drawn, p.split, srng)
            rel = f"{p.split}/patient{p.number:05d}/study{s}/view1_frontal.jpg"
            _save(img, root / rel, format="JPEG", quality=95)
            path = f"{root.name}/{rel}"
            projection = "AP" if srng.random() < 0.4 else "PA"
            sex = "Female" if female else "Male"
            rows[p.split].append([path, sex, str(age + s - 1), "Frontal", projection, *labels])
            for name in CHEST_FINDINGS:
                if labels[CHEXPERT_LABELS.index(name)] == POS:
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
        values = {"positive": POS, "negative": NEG, "uncertain": UNC, "blank": BLANK}
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
    patients = plan_bone(keyed_rng(seed, _BONE), n, need_two=valid_fraction > 0)
    assign_splits(keyed_rng(seed, _BONE, 2**31), patients, valid_fraction)
    image_rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    study_rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    findings: list[list[str]] = []
    studies = {s: {"positive": 0, "negative": 0} for s in SPLITS}
    masks_written = {s: dict.fromkeys(BONE_FINDINGS, 0) for s in SPLITS}
    parts = {s: dict.fromkeys(BONE_PARTS, 0) for s in SPLITS}
    bar = tqdm(total=n, desc="synth bone", unit="img", disable=not progress)
    for p in sorted(patients, key=lambda p: p.number):
        prng = keyed_rng(seed, _BONE, p.index)
        part = BONE_PARTS[int(prng.integers(len(BONE_PARTS)))]
        anatomy = bone_anatomy(prng, part)
        for s, count in enumerate(p.studies, 1):
            srng = keyed_rng(seed, _BONE, p.index, s)
            abnormal, required, show = (
                srng.random() < 0.45,
                int(srng.integers(count)),
                srng.random(count) < 0.85,
            )
            keys = [(seed, _BONE, p.index, s, i) for i in range(1, count + 1)]
            views = [bone_view(keyed_rng(*k), size) for k in keys]
            min_px = [_min_pixels(v.height, size) for v in views]
            rendered: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
            finding = None
            if abnormal:  # place the finding so that the required view shows it (a few tries)
                for _ in range(30):
                    candidate = bone_finding(srng)
                    img, mask = render_bone(anatomy, views[required], candidate, size, keys[required])
                    if mask is not None and int(mask.sum()) >= min_px[required]:
                        finding, rendered[required] = candidate, (img, mask)
                        break
            for i in range(count):
                if i in rendered:
                    continue
                img, mask = None, None
                if finding is not None and show[i]:
                    img, mask = render_bone(anatomy, views[i], finding, size, keys[i])
                if mask is None or int(mask.sum()) < min_px[i]:
                    img, mask = render_bone(anatomy, views[i], None, size, keys[i])
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


__all__ = ["CHEXPERT_COLUMNS", "FINDINGS_COLUMNS", "GENERATOR_VERSION", "synth_bone", "synth_chest"]
