"""The coded concepts of the hospital objects, shared by the DICOM SR and the FHIR resources.

Findings use SNOMED CT where a concept exists (taken from pydicom's DICOM code dictionary where it has
one); a label without one gets a code of the private scheme ``99XRAYFM`` in DICOM (declared in the SR's
Coding Scheme Identification) and a text-only concept in FHIR.
"""

from __future__ import annotations

import hashlib
import re

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99XRAYFM"
PRIVATE_SCHEME_NAME = "xrayfm model labels without a standard code"

# Labels of the project's models (CheXpert, NIH, Kermany, MURA), by lower-case label.
FINDINGS: dict[str, Code] = {
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "edema": codes.SCT.PulmonaryEdema,  # CheXpert's "Edema" is pulmonary edema
    "pleural effusion": codes.SCT.PleuralEffusion,
    "effusion": codes.SCT.PleuralEffusion,
    "pneumothorax": codes.SCT.Pneumothorax,
    "fracture": Code("125605004", "SCT", "Fracture of bone"),
    "abnormal": codes.SCT.Abnormal,  # MURA's study label
}

PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
PROBABILITY = codes.DCM.Probability  # 122157
THRESHOLD = codes.DCM.ThresholdValue  # 122411
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
PROCEDURE = codes.SCT.PlainRadiography  # 168537006
DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging study")

# FHIR code systems of the DICOM coding scheme designators used here.
FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}


def finding_code(label: str) -> Code:
    """The label's SNOMED CT concept, or else a ``99XRAYFM`` code: its upper-case name, or when that is
    longer than a DICOM Code Value (16 characters) its first 11 and 4 hex digits of its hash."""
    name = label.strip()
    known = FINDINGS.get(name.lower())
    if known is not None:
        return known
    value = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    if len(value) > 16:
        value = f"{value[:11]}_{hashlib.sha256(name.encode()).hexdigest()[:4].upper()}"
    return Code(value, PRIVATE_SCHEME, name)


def is_private(code: Code) -> bool:
    """Whether `code` is of the private scheme (it has no standard code)."""
    return code.scheme_designator == PRIVATE_SCHEME
