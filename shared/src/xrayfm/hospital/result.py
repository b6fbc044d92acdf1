"""The one input of the hospital objects: a study's result (:class:`StudyResult`) and checks on its sources.

Independent of the services' pydantic protocol: a service fills a :class:`StudyResult` from its answer
(``probability``, ``threshold``, ``threshold_source``, the model's ``name``/``version``/``sha256`` and
``notice``) and passes the source DICOM datasets (headers suffice) beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from xrayfm.errors import DataError, list_offenders

MANUFACTURER = "xrayfm"  # the Manufacturer of every SR and SC built here: how a PACS feed tells them apart


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise DataError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class StudyResult:
    """One label's answer for one study, and the model that gave it.

    ``image_probabilities`` maps the SOPInstanceUID of each source image to its own probability (a study
    of several images); ``aggregation`` says how ``probability`` was made from them.
    """

    label: str
    probability: float
    threshold: float
    threshold_source: str  # where the threshold comes from, e.g. "default 0.5 (not calibrated)"
    model_name: str
    model_version: str
    model_sha256: str
    notice: str  # the intended-use notice every answer carries (research use only)
    image_probabilities: Mapping[str, float] = field(default_factory=dict)
    aggregation: str | None = None

    def __post_init__(self) -> None:
        _check_probability("probability", self.probability)
        _check_probability("threshold", self.threshold)
        for uid, p in self.image_probabilities.items():
            _check_probability(f"probability of image {uid}", p)
        for name in ("label", "threshold_source", "model_name", "model_version", "model_sha256", "notice"):
            if not str(getattr(self, name)).strip():
                raise DataError(f"{name} must not be empty")

    @property
    def present(self) -> bool:
        """The decision: the finding is present when ``probability >= threshold``."""
        return self.probability >= self.threshold


def check_sources(sources: Sequence[Dataset], result: StudyResult) -> str:
    """The StudyInstanceUID shared by `sources`; raises unless they are one study's distinct instances
    and every key of ``result.image_probabilities`` is one of them."""
    if not sources:
        raise DataError("a study result needs at least one source instance")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise DataError(f"the source instances belong to {len(studies)} studies: {list_offenders(studies)}")
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) != len(uids):
        raise DataError("the source instances repeat a SOPInstanceUID")
    unknown = set(result.image_probabilities) - set(uids)
    if unknown:
        raise DataError(f"image probabilities for instances not among the sources: {list_offenders(unknown)}")
    return studies.pop()
