"""The heatmap overlay as a DICOM Secondary Capture image in the study of its source, built by highdicom.

The caller gives the overlay (RGB uint8 on the source image's geometry, e.g. from ``heatmap_on_image``);
the notice is burned in as a black strip under it (the PACS shows pixels, not comments) and also written
as Image Comments. The image names its source (Source Image Sequence, purpose "source image for image
processing operation") and the model (Derivation Description); patient and study come from the source.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from xrayfm.errors import DataError
from xrayfm.hospital.result import MANUFACTURER, StudyResult
from xrayfm.hospital.uids import DEFAULT_ROOT, sc_uid, series_uid

SC_SERIES_NUMBER = 9902
ORIENTATION_LETTERS = {"A", "P", "L", "R", "H", "F"}  # what highdicom accepts as a Patient Orientation value


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(trial) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


def with_notice(rgb: np.ndarray, notice: str) -> np.ndarray:
    """`rgb` with `notice` in white on a black strip added below it (the image itself is not covered)."""
    height, width = rgb.shape[:2]
    size = max(10, height // 40)
    font = ImageFont.load_default(size=size)
    margin, line_height = size // 2, int(size * 1.3)
    lines = _wrap(notice, font, width - 2 * margin)
    strip = Image.new("RGB", (width, len(lines) * line_height + 2 * margin), "black")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill="white", font=font)
    return np.concatenate([rgb, np.asarray(strip)], axis=0)


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = codes.cid7202.SourceImageForImageProcessingOperation
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
    return item


def heatmap_capture(
    source: Dataset,
    overlay: np.ndarray,
    result: StudyResult,
    *,
    root: str = DEFAULT_ROOT,
    series_number: int = SC_SERIES_NUMBER,
    burn_in: bool = True,
) -> hd.sc.SCImage:
    """The Secondary Capture of `overlay` (RGB uint8 [H, W, 3]), the heatmap of `result` on `source`.

    Its series (one per study and model) and instance UIDs are derived (:mod:`xrayfm.hospital.uids`).
    """
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise DataError(f"the overlay must be RGB uint8 [H, W, 3], got {overlay.dtype} {overlay.shape}")
    study_uid = str(source.StudyInstanceUID)
    pixels = with_notice(overlay, result.notice) if burn_in else overlay
    orientation = [str(v) for v in source.get("PatientOrientation") or []]
    simple = len(orientation) == 2 and all(v in ORIENTATION_LETTERS for v in orientation)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid("sc", study_uid, result, root),
        series_number=series_number,
        sop_instance_uid=sc_uid(str(source.SOPInstanceUID), result, root),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        patient_orientation=tuple(orientation) if simple else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI heatmap {result.label} ({result.model_name} {result.model_version})"[:64],
        manufacturer_model_name=result.model_name[:64],
        software_versions=result.model_version[:64],
        content_qualification="RESEARCH",
    )
    if not simple:  # highdicom takes one letter per direction and needs a value; keep the source's, or empty
        image.PatientOrientation = orientation or None
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(image, keyword, source.get(keyword))
    if "Laterality" not in image and "BodyPartExamined" not in image:
        image.Laterality = None  # Type 2C: empty, unknown (a paired body part would need it)
    image.BurnedInAnnotation = "NO"  # the notice burned in does not identify the patient
    image.ImageComments = result.notice
    image.DerivationDescription = (
        f"Heatmap of {result.label} by {result.model_name} {result.model_version} "
        f"(sha256 {result.model_sha256})"
    )[:1024]
    image.SourceImageSequence = [_source_reference(source)]
    return image
