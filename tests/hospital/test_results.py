"""The hospital objects (xrayfm.hospital): a TID 1500 SR and a heatmap Secondary Capture in the study of real
radiographs, and the FHIR DiagnosticReport. Checked with dciodvfy (dicom3tools), read back with highdicom and
fhir.resources; building twice gives the same UIDs.

Studies: RG1 (a real CR chest, two instances of one study: uncompressed and JPEG 2000), RG3 (a CR tibia)
and two real Kermany chest X-rays of one patient made into a study of Secondary Capture images here.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from xrayfm.data.images import read_image
from xrayfm.errors import DataError
from xrayfm.hospital import StudyResult, fhir_bundle, heatmap_capture, structured_report
from xrayfm.hospital.codes import PRIVATE_SCHEME, finding_code

# RG1's Referring Physician's Name is the single-component "ward"; highdicom warns on copying it.
pytestmark = pytest.mark.filterwarnings('ignore:The string "ward":UserWarning')

NOTICE = "Research use only: not a medical device, not for diagnosis or any clinical decision."
KERMANY = "kermany-pneumonia/chest_xray/train/PNEUMONIA"


def make_result(sources: list[Dataset], label: str = "Pneumonia", **changes) -> StudyResult:
    """A study result with a probability per image and their mean for the study."""
    per_image = {str(ds.SOPInstanceUID): p for ds, p in zip(sources, (0.71, 0.77, 0.6), strict=False)}
    result = StudyResult(
        label=label,
        probability=float(np.mean(list(per_image.values()))),
        threshold=0.62,
        threshold_source="operating point set by site: youden on 270 site images",
        model_name="vit-chest",
        model_version="3",
        model_sha256="0f" * 32,
        notice=NOTICE,
        image_probabilities=per_image,
        aggregation="mean of the image probabilities",
    )
    return dataclasses.replace(result, **changes)


def overlay_of(grey: np.ndarray) -> np.ndarray:
    """A heatmap-like RGB overlay on `grey`: a red blob blended over the image."""
    h, w = grey.shape
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.exp(-(((yy - 0.4 * h) / (0.2 * h)) ** 2 + ((xx - 0.3 * w) / (0.2 * w)) ** 2))
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(float)
    rgb[..., 0] = (1 - 0.5 * heat) * rgb[..., 0] + 0.5 * heat * 255
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def rg1(shared_data) -> list[Dataset]:
    folder = shared_data / "dicom-radiographs"
    return [pydicom.dcmread(folder / f"RG1_{kind}.dcm", stop_before_pixels=True) for kind in ("UNCR", "J2KI")]


@pytest.fixture(scope="module")
def rg1_overlay(shared_data) -> np.ndarray:
    grey = read_image(shared_data / "dicom-radiographs" / "RG1_UNCR.dcm")
    return overlay_of(grey[::4, ::4])


@pytest.fixture(scope="module")
def kermany(shared_data) -> list[Dataset]:
    """Two real chest X-rays of Kermany's patient person1 as one study of Secondary Capture images."""
    study, series = (
        generate_uid(entropy_srcs=[f"test kermany person1 {kind}"]) for kind in ("study", "series")
    )
    images = []
    for number, name in enumerate(("person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg"), start=1):
        grey = np.asarray(Image.open(shared_data / KERMANY / name).convert("L"))
        images.append(
            hd.sc.SCImage(
                pixel_array=grey,
                photometric_interpretation="MONOCHROME2",
                bits_allocated=8,
                coordinate_system="PATIENT",
                study_instance_uid=study,
                series_instance_uid=series,
                series_number=1,
                sop_instance_uid=generate_uid(entropy_srcs=[f"test kermany {name}"]),
                instance_number=number,
                manufacturer="test",
                patient_id="person1",
                patient_name="Kermany^person1",
                patient_orientation=("L", "F"),
                study_date="20180222",
                accession_number="K0001",
            )
        )
    return images


@pytest.fixture(params=["rg1", "kermany"])
def study(request) -> list[Dataset]:
    return request.getfixturevalue(request.param)


def study_group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    (group,) = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "study"]
    return group


def probability_of(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> float:
    (measurement,) = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.Probability)
    return measurement.value


def texts(dataset: Dataset) -> list[str]:
    """Every TEXT value of an SR content tree."""
    found = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found.extend(texts(item))
    return found


@pytest.mark.real_data
def test_sr_reads_back_with_the_probabilities_and_the_study(study, tmp_path):
    result = make_result(study)
    path = tmp_path / "sr.dcm"
    structured_report(study, result).save_as(path, enforce_file_format=True)
    sr = hd.sr.srread(path)

    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    group = study_group(sr)
    assert probability_of(group) == pytest.approx(result.probability)
    (threshold,) = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.ThresholdValue)
    assert threshold.value == pytest.approx(result.threshold)
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == "233604007" and evaluation.value.meaning == "Present"  # 0.74 >= 0.62
    assert {ref.referenced_sop_instance_uid for ref in group.source_images} == set(result.image_probabilities)
    per_image = {
        g.source_images[0].referenced_sop_instance_uid: probability_of(g)
        for g in sr.content.get_image_measurement_groups()
        if g.tracking_identifier != "study"
    }
    assert per_image == pytest.approx(dict(result.image_probabilities))

    source = study[0]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName and sr.AccessionNumber == source.AccessionNumber
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {ref.ReferencedSOPInstanceUID for ref in evidence.ReferencedSOPSequence} == set(
        result.image_probabilities
    )
    assert NOTICE in texts(sr)
    assert f"sha256: {result.model_sha256}" in texts(sr)
    assert f"threshold source: {result.threshold_source}" in texts(sr)
    assert sr.ContentQualification == "RESEARCH" and sr.VerificationFlag == "UNVERIFIED"


@pytest.mark.real_data
def test_capture_is_in_the_study_of_its_source_and_of_the_sr(rg1, rg1_overlay, tmp_path):
    result = make_result(rg1)
    sr = structured_report(rg1, result)
    path = tmp_path / "sc.dcm"
    heatmap_capture(rg1[0], rg1_overlay, result).save_as(path, enforce_file_format=True)
    sc = pydicom.dcmread(path)

    assert sc.StudyInstanceUID == sr.StudyInstanceUID == rg1[0].StudyInstanceUID
    assert sc.PatientID == sr.PatientID == rg1[0].PatientID
    assert sc.SeriesInstanceUID not in {sr.SeriesInstanceUID, rg1[0].SeriesInstanceUID}
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == rg1[0].SOPInstanceUID
    assert sc.ImageComments == NOTICE and "0f0f" in sc.DerivationDescription
    assert sc.PhotometricInterpretation == "RGB" and list(sc.PatientOrientation) == ["L", "F"]
    pixels = sc.pixel_array
    h, w, _ = rg1_overlay.shape
    assert pixels.shape[1] == w and pixels.shape[0] > h  # the notice is a strip below the heatmap
    np.testing.assert_array_equal(pixels[:h], rg1_overlay)
    assert pixels[h:].max() == 255 and np.median(pixels[h:]) == 0  # white text on black


@pytest.mark.real_data
def test_building_again_gives_the_same_uids_and_another_model_other_ones(rg1, rg1_overlay):
    result = make_result(rg1)

    def uids(sources: list[Dataset], result: StudyResult) -> tuple[str, ...]:
        sr = structured_report(sources, result)
        sc = heatmap_capture(sources[0], rg1_overlay, result)
        return sr.SOPInstanceUID, sr.SeriesInstanceUID, sc.SOPInstanceUID, sc.SeriesInstanceUID

    first = uids(rg1, result)
    assert uids(rg1, result) == first
    assert uids(rg1[::-1], result)[0] == first[0]  # the order of the sources does not matter
    assert len(set(first)) == 4
    other_version = uids(rg1, dataclasses.replace(result, model_version="4"))
    assert not set(other_version) & set(first)
    other_weights = uids(rg1, dataclasses.replace(result, model_sha256="1e" * 32))
    assert not set(other_weights) & set(first)
    # A new operating point is a new document in the same series; the heatmap does not change.
    retuned = uids(rg1, dataclasses.replace(result, threshold=0.8, threshold_source="set by site"))
    assert retuned[0] != first[0] and retuned[1:] == first[1:]
    assert uids(rg1[:1], make_result(rg1[:1]))[0] != first[0]  # other sources, other document


@pytest.mark.real_data
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("label", ["Pneumonia", "Lung Opacity"])  # a SNOMED CT code and a private one
def test_dciodvfy_finds_no_errors(study, label, tmp_path):
    result = make_result(study, label)
    grey = np.full((256, 300), 90, np.uint8)
    unoriented, oblique = copy.deepcopy(study[0]), copy.deepcopy(study[0])
    del unoriented.PatientOrientation
    oblique.PatientOrientation = ["LP", "FA"]  # two letters a direction: kept as the source has it
    objects = {
        "sr": structured_report(study, result),
        "sc": heatmap_capture(study[0], overlay_of(grey), result),
        "sc-unoriented": heatmap_capture(unoriented, overlay_of(grey), result),
        "sc-oblique": heatmap_capture(oblique, overlay_of(grey), result),
    }
    assert (
        "PatientOrientation" in objects["sc-unoriented"] and not objects["sc-unoriented"].PatientOrientation
    )
    assert list(objects["sc-oblique"].PatientOrientation) == ["LP", "FA"]
    for name, dataset in objects.items():
        path = tmp_path / f"{name}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        report = (run.stdout + run.stderr).splitlines()
        errors = [line for line in report if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"
        print(f"dciodvfy {name} ({label}):", *report, sep="\n  ")


@pytest.mark.real_data
def test_fhir_bundle_validates_and_points_at_the_study_and_patient(study):
    result = make_result(study)
    bundle = fhir_bundle(study, result, patient_id_system="urn:oid:1.2.3.4")
    again = Bundle.model_validate_json(bundle.model_dump_json())
    assert again == bundle
    resources = {entry.resource.get_resource_type(): entry.resource for entry in again.entry}
    report = DiagnosticReport.model_validate(resources["DiagnosticReport"].model_dump())
    source = study[0]

    assert report.status == "preliminary"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{source.StudyInstanceUID}"
    assert report.subject.identifier.value == source.PatientID
    assert report.identifier[0].value == f"urn:oid:{structured_report(study, result).SOPInstanceUID}"
    assert report.basedOn[0].identifier.value == source.AccessionNumber
    assert NOTICE in report.conclusion and "present" in report.conclusion
    observations = [
        Observation.model_validate(entry.resource.model_dump())
        for entry in again.entry
        if entry.resource.get_resource_type() == "Observation"
    ]
    (probability,) = [o for o in observations if o.valueQuantity is not None]
    (finding,) = [o for o in observations if o.valueCodeableConcept is not None]
    assert float(probability.valueQuantity.value) == pytest.approx(result.probability)
    assert float(probability.component[0].valueQuantity.value) == pytest.approx(result.threshold)
    assert any(result.threshold_source in note.text for note in probability.note)
    assert finding.code.coding[0].code == "233604007" and finding.valueCodeableConcept.text == "Present"
    assert {entry.fullUrl for entry in again.entry} >= {ref.reference for ref in report.result}
    assert fhir_bundle(study, result, patient_id_system="urn:oid:1.2.3.4") == bundle  # idempotent


@pytest.mark.real_data
def test_a_single_tibia_image_is_abnormal_with_no_image_groups(shared_data, tmp_path):
    source = pydicom.dcmread(shared_data / "dicom-radiographs" / "RG3_UNCR.dcm", stop_before_pixels=True)
    result = make_result([source], "Abnormal", probability=0.9)
    path = tmp_path / "sr.dcm"
    structured_report([source], result).save_as(path, enforce_file_format=True)
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()  # one image: the study's group only
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.name.scheme_designator) == ("263654008", "SCT")
    assert evaluation.value.meaning == "Present" and probability_of(group) == pytest.approx(0.9)
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        assert "Error" not in run.stdout + run.stderr


def test_a_label_without_a_code_gets_a_private_one():
    assert finding_code("Pneumonia").value == "233604007"
    code = finding_code("Enlarged Cardiomediastinum")
    assert code.scheme_designator == PRIVATE_SCHEME and len(code.value) <= 16
    assert code.meaning == "Enlarged Cardiomediastinum"


def header(study: str, instance: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, instance
    return ds


def test_results_and_sources_are_checked():
    sources = [header("1.2.3", "1.2.3.1"), header("1.2.3", "1.2.3.2")]
    with pytest.raises(DataError, match="probability"):
        make_result(sources, probability=1.5)
    with pytest.raises(DataError, match="notice"):
        make_result(sources, notice=" ")
    assert (
        make_result(sources, probability=0.62).present and not make_result(sources, probability=0.61).present
    )
    with pytest.raises(DataError, match="2 studies"):
        structured_report([*sources, header("9.9", "9.9.1")], make_result(sources))
    with pytest.raises(DataError, match="not among the sources"):
        structured_report(sources[:1], make_result(sources))
    with pytest.raises(DataError, match="RGB uint8"):
        heatmap_capture(sources[0], np.zeros((4, 4), np.uint8), make_result(sources[:1]))


def test_the_library_needs_no_torch():
    code = "import sys, xrayfm.hospital as h; h.fhir_bundle, h.heatmap_capture; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
