"""Deterministic UIDs: the same sources and model give the same SR and SC, so a result sent twice is one
object in the PACS, not two.

Every UID is ``pydicom.uid.generate_uid(prefix=root, entropy_srcs=[...])``: the root followed by the
decimal SHA-512 of the inputs. The root must not be None (pydicom then ignores the entropy and returns a
random ``2.25`` UID); the default is pydicom's own root, and a site passes its organisation's root. The
inputs go in as one JSON list, since pydicom joins its entropy sources without a separator.

What each UID depends on:

- SR/SC series: the study and the model (name, version, sha256): one series per study and model version.
- SR instance: the source instances, the model, the label and the operating point (threshold and its
  source), since a new operating point makes a different document.
- SC instance: its source instance, the model and the label.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

from xrayfm.hospital.result import StudyResult

DEFAULT_ROOT = PYDICOM_ROOT_UID


def derived_uid(kind: str, *parts: str, root: str = DEFAULT_ROOT) -> UID:
    """The UID of `kind` made from `parts` under `root` (same inputs, same UID)."""
    return generate_uid(prefix=root, entropy_srcs=[json.dumps([kind, *parts])])


def _model(result: StudyResult) -> list[str]:
    return [result.model_name, result.model_version, result.model_sha256]


def series_uid(kind: str, study_uid: str, result: StudyResult, root: str = DEFAULT_ROOT) -> UID:
    """The series of `kind` ("sr" or "sc") that the model's results in this study go to."""
    return derived_uid(f"{kind}-series", study_uid, *_model(result), root=root)


def sr_uid(source_uids: Iterable[str], result: StudyResult, root: str = DEFAULT_ROOT) -> UID:
    """The SR document's SOPInstanceUID (the order of the source instances does not matter)."""
    operating_point = [result.label, repr(float(result.threshold)), result.threshold_source]
    return derived_uid("sr", *sorted(source_uids), *_model(result), *operating_point, root=root)


def sc_uid(source_uid: str, result: StudyResult, root: str = DEFAULT_ROOT) -> UID:
    """The SOPInstanceUID of the heatmap capture of one source instance."""
    return derived_uid("sc", source_uid, *_model(result), result.label, root=root)


def device_uid(result: StudyResult, root: str = DEFAULT_ROOT) -> UID:
    """The model as an SR device observer (Device Observer UID)."""
    return derived_uid("device", *_model(result), root=root)
