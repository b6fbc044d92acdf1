"""DICOM studies made from the real data, for the PACS tests and benchmark (tests/services/test_pacs.py,
tests/containers/test_compose_stack.py, bench/bench_pacs.py): Kermany paediatric chest JPEGs made into DICOM
with dcmtk's ``img2dcm``, the real RG3 tibia as an extra series; pushed with dcmtk's ``storescu``; the
results checked with dicom3tools' ``dciodvfy``. No file of the data is changed: every study is written
into a folder the caller gives.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

KERMANY = "kermany-pneumonia/chest_xray/train"  # under the shared data folder: NORMAL/, PNEUMONIA/
TIBIA = "dicom-radiographs/RG3_J2KI.dcm"  # the real tibia (outside the shipped model's domain)
PACS_AE = "XRAYFMPACS"  # the called AE title of the stack's Orthanc


def kermany_images(shared: Path, label: str | None = None) -> list[Path]:
    """The Kermany training JPEGs (of `label`, NORMAL or PNEUMONIA; both when None), sorted."""
    labels = [label] if label else ["NORMAL", "PNEUMONIA"]
    return [path for name in labels for path in sorted((shared / KERMANY / name).glob("*.jpeg"))]


def uncompressed(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` with its pixels decoded: storescu cannot transcode, and Orthanc asks for an uncompressed
    transfer syntax."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    return ds


def make_study(
    folder: Path,
    jpegs: Sequence[Path],
    *,
    tibia: Path | None = None,
    patient: tuple[str, str] = ("ANONYMOUS^STUDY", "ANON-0"),
    accession: str = "A7001",
) -> list[Path]:
    """One study in `folder`: the `jpegs` as one DX chest series (img2dcm: Secondary Capture, decoded
    here), then, with `tibia`, a copy of that DICOM as a second series (new series and instance UIDs).
    Every file carries `patient` (name, ID). The files' paths, the chest images first."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    name, patient_id = patient
    files = []
    for number, jpeg in enumerate(jpegs, start=1):
        path = folder / f"chest{number}.dcm"
        subprocess.run(["img2dcm", str(jpeg), str(path)], check=True, capture_output=True, timeout=60)
        ds = uncompressed(pydicom.dcmread(path))  # img2dcm writes JPEG baseline
        ds.PatientName, ds.PatientID = name, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, number
        ds.Modality, ds.BodyPartExamined, ds.StudyDate, ds.AccessionNumber = (
            "DX",
            "CHEST",
            "20240105",
            accession,
        )
        ds.save_as(path)
        files.append(path)
    if tibia is not None:
        ds = uncompressed(pydicom.dcmread(tibia))
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID = name, patient_id, study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / "tibia.dcm")
        files.append(folder / "tibia.dcm")
    return files


def study_uid(path: Path) -> str:
    """The Study Instance UID of a DICOM file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def storescu(files: Sequence[Path], port: int, host: str = "127.0.0.1", aec: str = PACS_AE) -> None:
    """C-STORE the files with dcmtk's storescu; AssertionError with its output when it fails."""
    run = subprocess.run(
        ["storescu", "-aec", aec, host, str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"storescu: {run.returncode}\n{run.stdout}\n{run.stderr}"


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's verdict on a DICOM file: its error lines and its warning lines."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    report = (run.stdout + run.stderr).splitlines()
    return [line for line in report if line.startswith("Error")], [
        line for line in report if line.startswith("Warning")
    ]
