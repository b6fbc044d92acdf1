"""Result objects a hospital accepts: for the PACS a DICOM SR (TID 1500) and a Secondary Capture of the
heatmap in the study of the source images, for the EHR a FHIR DiagnosticReport with its Observations.

    from xrayfm.hospital import StudyResult, structured_report, heatmap_capture, fhir_bundle
    result = StudyResult(label="Pneumonia", probability=0.81, threshold=0.5, threshold_source="...",
                         model_name="vit-chest", model_version="3", model_sha256="...", notice="...")
    sr = structured_report(headers, result)       # highdicom Comprehensive3DSR
    sc = heatmap_capture(headers[0], rgb, result)  # highdicom SCImage
    bundle = fhir_bundle(headers, result)          # fhir.resources R4B Bundle (transaction)

Torch-free; needs the ``hospital`` extra (highdicom, fhir.resources). Names are imported lazily, so that
:class:`StudyResult` alone needs only pydicom. See docs/hospital.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StudyResult": "xrayfm.hospital.result",
    "structured_report": "xrayfm.hospital.sr",
    "heatmap_capture": "xrayfm.hospital.capture",
    "fhir_bundle": "xrayfm.hospital.fhir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xrayfm.hospital' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
