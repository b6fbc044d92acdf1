"""A study's answer as the hospital objects' input: :class:`xrayfm.hospital.StudyResult` from a
:class:`~xrayfm_stack.protocol.StudyPrediction` and the SOP Instance UIDs of the images it answered, in the
order sent. The router (SR and Secondary Captures back into the PACS) and any FHIR export use this one
mapping, so the PACS and the EHR copies say the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

from xrayfm import RESEARCH_USE
from xrayfm.errors import DataError
from xrayfm.hospital.result import StudyResult
from xrayfm.operating_point import DEFAULT_SOURCE, DEFAULT_THRESHOLD
from xrayfm_stack.protocol import StudyPrediction


def result_label(answer: StudyPrediction) -> str:
    """The label the result reports: a one-label model's label, else the study's top label."""
    labels = answer.model.labels
    return labels[0] if len(labels) == 1 else max(answer.probabilities, key=answer.probabilities.__getitem__)


def study_result(answer: StudyPrediction, sop_uids: Sequence[str]) -> StudyResult:
    """The :class:`StudyResult` of `answer`; ``sop_uids[k]`` is the instance of ``answer.images[k]``."""
    if len(sop_uids) != len(answer.images):
        raise DataError(f"{len(sop_uids)} instances for an answer of {len(answer.images)} images")
    label, model = result_label(answer), answer.model
    return StudyResult(
        label=label,
        probability=answer.probabilities[label],
        threshold=model.threshold if model.threshold is not None else DEFAULT_THRESHOLD,
        threshold_source=model.threshold_source or DEFAULT_SOURCE,
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.sha256,
        notice=model.notice or RESEARCH_USE,
        image_probabilities={
            str(uid): image.probabilities[label] for uid, image in zip(sop_uids, answer.images, strict=True)
        },
        aggregation=answer.aggregation,
    )
