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

Modules: :mod:`~xrayfm.data.synth.draw` (drawing primitives), :mod:`~xrayfm.data.synth.chest` and
:mod:`~xrayfm.data.synth.bone` (the phantoms), :mod:`~xrayfm.data.synth.plan` (patients, studies, splits)
and :mod:`~xrayfm.data.synth.writers` (the datasets on disk).
"""

from __future__ import annotations

from xrayfm.data.base import SYNTHETIC_MARKER
from xrayfm.data.synth.bone import BONE_FINDINGS, BONE_PARTS
from xrayfm.data.synth.chest import CHEST_FINDINGS
from xrayfm.data.synth.writers import (
    CHEXPERT_COLUMNS,
    FINDINGS_COLUMNS,
    GENERATOR_VERSION,
    synth_bone,
    synth_chest,
)

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
