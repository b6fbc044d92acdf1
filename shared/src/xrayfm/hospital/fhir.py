"""The result as FHIR resources for an EHR, built and validated with ``fhir.resources``.

FHIR R4 family: fhir.resources 8 has no R4 (4.0.1) package, so the resources are its ``R4B`` (4.3.0)
models; DiagnosticReport, Observation and Device have the same elements in R4 and R4B.

A transaction :class:`Bundle` holds:

- a ``DiagnosticReport`` (status preliminary, category RAD, code LOINC 18748-4) on the ``ImagingStudy``
  of the sources (by its Study Instance UID, ``urn:dicom:uid`` / ``urn:oid:...``), based on the order of
  the accession number when there is one, with the conclusion in words and the notice;
- an ``Observation`` of the finding: the label's concept = Present/Absent (SNOMED CT);
- an ``Observation`` of the probability (DICOM 122157, ``valueQuantity`` in UCUM ``{probability}``), with
  the threshold as a component (DICOM 122411) and its source in a note;
- a ``Device``: the model's name, version and sha256.

The subject is the patient by the sources' Patient ID. Each resource carries a DICOM-UID identifier
derived like the SR's UIDs (the report's is the SR's SOPInstanceUID) and is created with ``ifNoneExist``
on it, so a result sent twice is stored once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from xrayfm.errors import DataError
from xrayfm.hospital import codes as xc
from xrayfm.hospital.result import StudyResult, check_sources
from xrayfm.hospital.uids import DEFAULT_ROOT, derived_uid, device_uid, sr_uid

FHIR_VERSION = "4.3.0"  # R4B
DICOM_UID_SYSTEM = "urn:dicom:uid"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service section
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"


def concept(code: Code, text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept of `code`; a private code has no FHIR system, so it becomes its text alone."""
    if xc.is_private(code):
        return {"text": text or code.meaning}
    coding = {"system": xc.FHIR_SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}
    return {"coding": [coding], "text": text or code.meaning}


def dicom_identifier(uid: str) -> dict[str, str]:
    """A DICOM UID as a FHIR Identifier."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _probability(value: float) -> dict[str, Any]:
    unit = xc.PROBABILITY_UNIT
    return {
        "value": float(value),
        "unit": unit.meaning,
        "system": xc.FHIR_SYSTEMS["UCUM"],
        "code": unit.value,
    }


def _entry(resource: Any, uid: str) -> dict[str, Any]:
    """A transaction entry that creates `resource` unless one with its identifier exists."""
    kind = resource.get_resource_type()
    return {
        "fullUrl": _url(uid),
        "resource": resource,
        "request": {
            "method": "POST",
            "url": kind,
            "ifNoneExist": f"identifier={DICOM_UID_SYSTEM}|urn:oid:{uid}",
        },
    }


def _url(uid: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, uid)}"


def _effective(ds: Dataset) -> str | None:
    """The study date (a FHIR date; a time without a time zone is not a FHIR dateTime)."""
    date = str(ds.get("StudyDate") or "")
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else None


def _subject(ds: Dataset, patient_id_system: str | None) -> dict[str, Any] | None:
    patient_id = str(ds.get("PatientID") or "").strip()
    if not patient_id:
        return None
    identifier: dict[str, Any] = {"value": patient_id}
    if patient_id_system:
        identifier["system"] = patient_id_system
    if ds.get("IssuerOfPatientID"):
        identifier["assigner"] = {"display": str(ds.IssuerOfPatientID)}
    return {"type": "Patient", "identifier": identifier}


def fhir_bundle(
    sources: Sequence[Dataset],
    result: StudyResult,
    *,
    root: str = DEFAULT_ROOT,
    patient_id_system: str | None = None,
    issued: datetime | None = None,
) -> Bundle:
    """The transaction Bundle of the DiagnosticReport, its two Observations and the model's Device.

    `patient_id_system` is the site's URI of Patient IDs (the EHR matches the subject by it); `issued`,
    a time-zone-aware time, is stamped on the report and observations when given.
    """
    study_uid = check_sources(sources, result)
    if issued is not None and issued.utcoffset() is None:
        raise DataError("issued must carry a time zone (a FHIR instant)")
    first = sources[0]
    report_uid = sr_uid((str(ds.SOPInstanceUID) for ds in sources), result, root)
    finding_uid = derived_uid("fhir-finding", report_uid, root=root)
    probability_uid = derived_uid("fhir-probability", report_uid, root=root)
    model_uid = device_uid(result, root)
    study = {"type": "ImagingStudy", "identifier": dicom_identifier(study_uid)}
    finding = xc.finding_code(result.label)
    common: dict[str, Any] = {"status": "preliminary"}
    if subject := _subject(first, patient_id_system):
        common["subject"] = subject
    if effective := _effective(first):
        common["effectiveDateTime"] = effective
    if issued is not None:
        common["issued"] = issued.isoformat()

    device = Device.model_validate(
        {
            "identifier": [dicom_identifier(model_uid)],
            "deviceName": [{"name": result.model_name, "type": "model-name"}],
            "manufacturer": "xrayfm",
            "version": [
                {"type": {"text": "model version"}, "value": result.model_version},
                {"type": {"text": "sha256"}, "value": result.model_sha256},
            ],
            "note": [{"text": result.notice}],
        }
    )
    observation = {
        **common,
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "device": {"reference": _url(model_uid)},
    }
    probability_notes = [{"text": f"Threshold source: {result.threshold_source}"}]
    if result.aggregation:
        probability_notes.append({"text": f"Study probability: {result.aggregation}"})
    probability = Observation.model_validate(
        {
            **observation,
            "identifier": [dicom_identifier(probability_uid)],
            "code": concept(xc.PROBABILITY, f"Probability of {result.label}"),
            "valueQuantity": _probability(result.probability),
            "component": [{"code": concept(xc.THRESHOLD), "valueQuantity": _probability(result.threshold)}],
            "derivedFrom": [study],
            "note": [*probability_notes, {"text": result.notice}],
        }
    )
    present = Observation.model_validate(
        {
            **observation,
            "identifier": [dicom_identifier(finding_uid)],
            "code": concept(finding, result.label),
            "valueCodeableConcept": concept(xc.PRESENT if result.present else xc.ABSENT),
            "derivedFrom": [study, {"reference": _url(probability_uid)}],
            "note": [{"text": result.notice}],
        }
    )
    decision = "present" if result.present else "absent"
    conclusion = (
        f"{result.label}: {decision} (probability {result.probability:.3f}, threshold {result.threshold:.3f}: "
        f"{result.threshold_source}; model {result.model_name} {result.model_version}). {result.notice}"
    )
    report: dict[str, Any] = {
        **common,
        "identifier": [dicom_identifier(report_uid)],
        "category": [{"coding": [{"system": REPORT_CATEGORY, "code": "RAD", "display": "Radiology"}]}],
        "code": concept(xc.DIAGNOSTIC_IMAGING_REPORT),
        "imagingStudy": [study],
        "result": [{"reference": _url(finding_uid)}, {"reference": _url(probability_uid)}],
        "conclusion": conclusion,
    }
    if accession := str(first.get("AccessionNumber") or "").strip():
        accession_type = {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN"}]}
        report["basedOn"] = [
            {"type": "ServiceRequest", "identifier": {"type": accession_type, "value": accession}}
        ]
    if result.present:
        report["conclusionCode"] = [concept(finding, result.label)]
    entries = [
        _entry(DiagnosticReport.model_validate(report), report_uid),
        _entry(present, finding_uid),
        _entry(probability, probability_uid),
        _entry(device, model_uid),
    ]
    return Bundle.model_validate({"type": "transaction", "entry": entries})
