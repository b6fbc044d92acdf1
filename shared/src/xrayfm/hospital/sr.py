"""The result as a DICOM Comprehensive 3D SR following TID 1500 (Measurement Report), built by highdicom.

Content (see docs/hospital.md):

- observation context: the model as the device observer (its name, version and a UID of its identity);
- image library: the source instances;
- one study measurement group (TID 1501): finding type = the label's concept, the probability (DCM
  122157) and the threshold (DCM 122411) as measurements in UCUM ``{probability}``, the decision as the
  qualitative evaluation label = Present/Absent (SNOMED), and the algorithm (TID 4019: name, version,
  parameters ``sha256``, ``threshold source`` and ``study probability``);
- for a study of several images, one group per image with its probability and the image as its source;
- the notice as a text in the report's Qualitative Evaluations (TID 1500 rows 12 and 14).

The patient and study modules are copied from the sources by highdicom, which also lists them as the
evidence; the document is complete, preliminary and unverified (no person has read it), and its
Content Qualification is RESEARCH.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from xrayfm.hospital import codes as xc
from xrayfm.hospital.result import MANUFACTURER, StudyResult, check_sources
from xrayfm.hospital.uids import DEFAULT_ROOT, derived_uid, device_uid, series_uid, sr_uid

SR_SERIES_NUMBER = 9901
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
# The modalities for which highdicom's Image Library adds projection radiography descriptors (TID 1603).
PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def algorithm(result: StudyResult, study: bool = True) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for the model: name, version and its parameters as ``key: value`` texts (the sha256;
    for the study's group also the threshold's source and how the study's probability was made)."""
    parameters = [f"sha256: {result.model_sha256}"]
    if study:
        parameters.append(f"threshold source: {result.threshold_source}")
    if study and result.aggregation:
        parameters.append(f"study probability: {result.aggregation}")
    return hd.sr.AlgorithmIdentification(
        name=result.model_name, version=result.model_version, parameters=parameters
    )


def _probability(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=xc.PROBABILITY, value=float(value), unit=xc.PROBABILITY_UNIT)


def _source(ds: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _library_entry(ds: Dataset) -> Dataset:
    """What highdicom's Image Library (TID 1600) should read of `ds`.

    highdicom describes a projection image by its Imager Pixel Spacing and Patient Orientation and fails
    without them, which many CR headers lack; such an image is entered with what it has (the modality of
    its SOP class, rows, columns) and no projection descriptors.
    """
    described = "ImagerPixelSpacing" in ds and len(ds.get("PatientOrientation") or []) == 2
    if ds.get("Modality") not in PROJECTION_MODALITIES or described:
        return ds
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in ds:
            setattr(entry, keyword, ds[keyword].value)
    entry.Modality = ""  # not a projection modality to highdicom: no projection descriptors
    return entry


def notice_item(notice: str) -> hd.sr.ContainerContentItem:
    """TID 1500 rows 12 and 14: the report's Qualitative Evaluations, holding the notice as a text.

    highdicom builds no such container, so it is made of highdicom's content items here.
    """
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=notice, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        ]
    )
    return container


def measurement_groups(
    sources: Sequence[Dataset], result: StudyResult, document_uid: str, root: str = DEFAULT_ROOT
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The study's group and, for several sources, one group per image that has a probability."""
    finding = xc.finding_code(result.label)
    study = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", document_uid, "study", root=root), identifier="study"
        ),
        finding_type=finding,
        algorithm_id=algorithm(result),
        measurements=[
            _probability(result.probability),
            hd.sr.Measurement(name=xc.THRESHOLD, value=float(result.threshold), unit=xc.PROBABILITY_UNIT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding, value=xc.PRESENT if result.present else xc.ABSENT)
        ],
        source_images=[_source(ds) for ds in sources],
    )
    groups = [study]
    if len(sources) > 1:
        for ds in sources:
            uid = str(ds.SOPInstanceUID)
            if uid not in result.image_probabilities:
                continue
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=derived_uid("tracking", document_uid, uid, root=root), identifier=f"image {uid}"
                    ),
                    finding_type=finding,
                    algorithm_id=algorithm(result, study=False),
                    measurements=[_probability(result.image_probabilities[uid])],
                    source_images=[_source(ds)],
                )
            )
    return groups


def structured_report(
    sources: Sequence[Dataset],
    result: StudyResult,
    *,
    root: str = DEFAULT_ROOT,
    series_number: int = SR_SERIES_NUMBER,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 SR of `result` in the study of `sources` (the images it came from; headers suffice).

    Its series and instance UIDs are derived (:mod:`xrayfm.hospital.uids`), so building it again from
    the same sources and model gives the same UIDs.
    """
    study_uid = check_sources(sources, result)
    uid = sr_uid((str(ds.SOPInstanceUID) for ds in sources), result, root)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(result, root),
            name=result.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{result.model_name} {result.model_version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=xc.PROCEDURE,
        imaging_measurements=measurement_groups(sources, result, uid, root),
        referenced_images=[_library_entry(ds) for ds in sources],
    )
    report[0].ContentSequence.append(notice_item(result.notice))
    private = xc.is_private(xc.finding_code(result.label))
    schemes = (
        [CodingSchemeIdentificationItem(xc.PRIVATE_SCHEME, name=xc.PRIVATE_SCHEME_NAME)] if private else None
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report[0],
        series_instance_uid=series_uid("sr", study_uid, result, root),
        series_number=series_number,
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        content_qualification="RESEARCH",
        coding_schemes=schemes,
        series_description=f"AI {result.label} ({result.model_name} {result.model_version})"[:64],
        manufacturer_model_name=result.model_name[:64],
        software_versions=result.model_version[:64],
    )
