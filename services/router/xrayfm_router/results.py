"""The answer back into the study: the TID 1500 SR of the study and one heatmap Secondary Capture per image
(xrayfm.hospital), drawn here from the gateway's answer (each image's heatmap, a base64 grey PNG) over the
image's own pixels (xrayfm.explain.overlay)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from xrayfm.data.images import read_image
from xrayfm.explain.overlay import heatmap_from_base64, render_overlay
from xrayfm.hospital import heatmap_capture, structured_report
from xrayfm.hospital.result import StudyResult
from xrayfm_stack.protocol import ImageAnswer, StudyPrediction
from xrayfm_stack.results import study_result


@dataclass
class Source:
    """One image the answer used: its DICOM bytes and their header."""

    data: bytes
    header: Dataset


@dataclass
class Results:
    """What goes back into the PACS for one answer."""

    result: StudyResult
    report: Dataset  # the SR
    captures: list[Dataset]  # one SC per image that has a heatmap


def heatmap_rgb(pixels: np.ndarray, image: ImageAnswer) -> np.ndarray | None:
    """The image's heatmap (its answer's grey PNG, 255 = most attended) coloured over `pixels`; None when
    the answer has none."""
    if image.attention_map is None:
        return None
    return render_overlay(pixels, heatmap_from_base64(image.attention_map), alpha=0.4)


def build(answer: StudyPrediction, sources: Sequence[Source]) -> Results:
    """The SR and SCs of `answer`; ``sources[k]`` is the instance of ``answer.images[k]``."""
    headers = [s.header for s in sources]
    result = study_result(answer, [str(h.SOPInstanceUID) for h in headers])
    captures = []
    for source, image in zip(sources, answer.images, strict=True):
        rgb = heatmap_rgb(read_image(source.data), image)
        if rgb is not None:
            captures.append(heatmap_capture(source.header, rgb, result))
    return Results(result, structured_report(headers, result), captures)
