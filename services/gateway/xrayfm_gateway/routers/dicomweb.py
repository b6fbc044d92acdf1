"""``POST /dicomweb/studies`` (and ``/dicomweb/studies/{study}``): STOW-RS into the study predictor.

A PACS, a modality or the router (``xrayfm_router``) sends DICOM instances as ``multipart/related;
type="application/dicom"`` (DICOM PS3.18 10.5). They are taken within the limits of ``/predict/study``
(``XRAYFM_MAX_UPLOAD_MB`` a part, ``XRAYFM_MAX_STUDY_IMAGES`` parts, ``XRAYFM_MAX_STUDY_MB`` in all),
grouped by study and series, and each study goes the way of ``/predict/study`` (decode, queue, wait,
answer: :mod:`xrayfm_gateway.routers.predict`). The domain gate judges each series on its own: a series it
refuses (another body part, a scout), one that holds no image (a report) and the stack's own results are
skipped, and each skip is an audit record (``series_skipped``, with the gate's verdict). The images of the
series left are answered together as the study.

The answer is the standard STOW-RS response (DICOM JSON): Referenced SOP Sequence (00081199) for the
instances answered, Failed SOP Sequence (00081198) with a Failure Reason (00081197) for the others, and a
Retrieve URL (00081190) naming the job whose answer used them: ``GET`` it for the JSON answer with its
heatmaps. An instance of a series the domain gate refused has the Retrieve URL of the refusing job in its
Failed SOP item too (not in the standard; a client may ignore it): ``GET`` it for the gate's verdict. 200
when every instance was answered, 202 when some were not, 409 when none was. The DICOM headers are read
here (pydicom, pixels left unread) and never logged, queued or echoed; the pixels are decoded in the decoder
processes as any upload's.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydicom
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from python_multipart.multipart import parse_options_header

from xrayfm.hospital.result import MANUFACTURER
from xrayfm_gateway.audit import actor
from xrayfm_gateway.deps import API_KEY_HEADER, require_api_key
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.routers.predict import (
    ERRORS,
    UploadDeps,
    UploadDepsDep,
    answer_request,
    decode_one,
    submit_images,
)
from xrayfm_gateway.uploads import DecodedImage, Upload, receive_uploads, reject
from xrayfm_stack.protocol import StudyPrediction
from xrayfm_stack.studies import series_tag

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_api_key)])

DICOM_JSON = "application/dicom+json"
# Failure Reason (0008,1197) values, as STOW-RS responses use them (DICOM PS3.18 10.5)
PROCESSING_FAILURE = 0x0110  # decoding the pixels failed
SOP_CLASS_NOT_SUPPORTED = 0x0122  # no image: a report, a presentation state
DOES_NOT_MATCH = 0xA900  # not in the study the request named
CANNOT_UNDERSTAND = 0xC000  # skipped: outside the model's domain, or the stack's own result


@dataclass
class Instance:
    """One part of the request: its bytes and its header (pixels unread)."""

    upload: Upload
    header: Dataset

    @property
    def sop(self) -> tuple[str, str]:
        return str(self.header.SOPClassUID), str(self.header.SOPInstanceUID)


@dataclass
class Outcome:
    """What became of each instance of the request, and the job that answered each study."""

    base_url: str
    referenced: list[tuple[Instance, str]] = field(default_factory=list)  # (instance, job id)
    failed: list[tuple[Instance, int]] = field(default_factory=list)  # (instance, failure reason)
    jobs: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # SOP instance UID -> the gate's refusing job

    def job_url(self, job_id: str) -> str:
        return f"{self.base_url}jobs/{job_id}"

    def response(self) -> JSONResponse:
        """The STOW-RS response: 200 all answered, 202 some, 409 none."""
        body: dict[str, Any] = {}
        if len(self.jobs) == 1:
            body["00081190"] = {"vr": "UR", "Value": [self.job_url(self.jobs[0])]}
        if self.referenced:
            body["00081199"] = {"vr": "SQ", "Value": [
                {**_sop_item(inst), "00081190": {"vr": "UR", "Value": [self.job_url(job)]}}
                for inst, job in self.referenced
            ]}  # fmt: skip
        if self.failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [self._failed_item(inst, reason) for inst, reason in self.failed],
            }
        status = 409 if not self.referenced else 202 if self.failed else 200
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON)

    def _failed_item(self, inst: Instance, reason: int) -> dict[str, Any]:
        """A Failed SOP item: the instance, the reason, and the job of the gate's refusal when it was one."""
        item = {**_sop_item(inst), "00081197": {"vr": "US", "Value": [reason]}}
        job_id = self.refused.get(inst.sop[1])
        if job_id is not None:
            item["00081190"] = {"vr": "UR", "Value": [self.job_url(job_id)]}
        return item


def _sop_item(inst: Instance) -> dict[str, Any]:
    sop_class, sop_uid = inst.sop
    return {"00081150": {"vr": "UI", "Value": [sop_class]}, "00081155": {"vr": "UI", "Value": [sop_uid]}}


def read_headers(uploads: Sequence[Upload]) -> list[Instance]:
    """Each part's DICOM header (a Part 10 file, read up to its pixels); 400 ``bad_dicom`` naming the part
    by position when one is not DICOM or lacks the UIDs a study needs."""
    instances = []
    for k, upload in enumerate(uploads):
        try:
            header = pydicom.dcmread(io.BytesIO(upload.data), stop_before_pixels=True)
            uids = [
                header.get(k)
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
            ]
        except Exception:  # pydicom raises more than InvalidDicomError on hostile bytes (struct.error...)
            uids = None
        if not uids or not all(uid and str(uid).strip() for uid in uids):
            raise reject(
                400, "bad_dicom", f"part {k + 1} of {len(uploads)} is not a DICOM instance with study, series "
                "and SOP instance UIDs",
            )  # fmt: skip
        instances.append(Instance(upload, header))
    return instances


def grouped(instances: Sequence[Instance], key: str) -> dict[str, list[Instance]]:
    """`instances` by the value of their header's `key` (a UID), in the order first seen."""
    groups: dict[str, list[Instance]] = {}
    for inst in instances:
        groups.setdefault(str(inst.header.get(key)), []).append(inst)
    return groups


def not_for_the_model(series: Sequence[Instance]) -> str | None:
    """Why a series is skipped before any decoding: the stack's own results, or no image at all."""
    if any(inst.header.get("Manufacturer") == MANUFACTURER for inst in series):
        return "own_result"
    if all(inst.header.get("Rows") is None for inst in series):
        return "not_an_image"
    return None


def audit_skip(
    request: Request,
    series: str,
    reason: str,
    n: int,
    job_id: str | None = None,
    domain: dict[str, Any] | None = None,
) -> None:
    """The ``series_skipped`` record: why, and the gate's verdict when it judged the series (no patient
    data: the series by :func:`series_tag`)."""
    verdict = None
    if domain is not None:
        keep = ("in_domain", "score", "threshold", "gate")
        verdict = {
            **{k: domain.get(k) for k in keep},
            "reasons": [r["code"] for r in domain.get("reasons", [])],
        }
    request.app.state.audit.write(
        "prediction", "series_skipped", "refused",
        who=actor(request.app.state.settings, request.headers.get(API_KEY_HEADER)),
        reason=reason, target=f"job:{job_id}" if job_id else None,
        detail={"series": series_tag(series), "instances": n, "domain": verdict},
    )  # fmt: skip


async def predict_images(
    request: Request,
    deps: UploadDeps,
    items: list[tuple[Instance, DecodedImage]],
    decode_ms: float,
    queued: list[str],
) -> StudyPrediction:
    """The images of one study through ``/predict/study``'s path (queue, wait, answer, audit record); the
    job's id is appended to `queued` as soon as it is queued (a refusal's record names it). The job keeps
    the instances' UIDs (``GET /jobs/{id}/fhir``)."""
    images = [d for _, d in items]
    dicom = {
        "study": str(items[0][0].header.StudyInstanceUID),
        "instances": [list(inst.sop) for inst, _ in items],
    }

    async def queue_it(
        request: Request, deps: UploadDeps, explain: bool, method: str | None
    ) -> tuple[str, dict[str, Any]]:
        job_id, record = await submit_images(deps, images, True, explain, method, decode_ms, dicom)
        queued.append(job_id)
        return job_id, record

    prediction = await answer_request(queue_it, request, deps, True, None)  # with heatmaps: the SCs need them
    assert isinstance(prediction, StudyPrediction)
    return prediction


async def answer_study(request: Request, deps: UploadDeps, instances: list[Instance], out: Outcome) -> None:
    """One study's instances: skip what the model is not for, answer the series left together."""
    usable: dict[str, list[tuple[Instance, DecodedImage]]] = {}
    decode_ms: dict[str, float] = {}
    budget = deps.settings.max_study_pixels
    for series_uid, series in grouped(instances, "SeriesInstanceUID").items():
        reason = not_for_the_model(series)
        if reason is not None:
            audit_skip(request, series_uid, reason, len(series))
            code = SOP_CLASS_NOT_SUPPORTED if reason == "not_an_image" else CANNOT_UNDERSTAND
            out.failed += [(inst, code) for inst in series]
            continue
        decoded, failure, started = [], None, time.perf_counter()
        for inst in series:
            try:
                decoded.append((inst, await decode_one(inst.upload, deps, budget)))
                budget -= decoded[-1][1].width * decoded[-1][1].height
            except APIError as exc:  # this instance only: the rest of the series may still be read
                failure = failure or exc.code
                out.failed.append((inst, PROCESSING_FAILURE))
        decode_ms[series_uid] = 1000 * (time.perf_counter() - started)
        if decoded:
            usable[series_uid] = decoded
        else:
            audit_skip(request, series_uid, failure or "corrupt_image", len(series))
    # Each series on its own first (with heatmaps), so that the gate refuses a series, not the study; when
    # several are answered, their images together once more: the study's answer.
    answered: dict[str, StudyPrediction] = {}
    for series_uid, items in usable.items():
        queued: list[str] = []
        try:
            answered[series_uid] = await predict_images(request, deps, items, decode_ms[series_uid], queued)
        except APIError as exc:
            if exc.code != "out_of_domain":
                raise
            audit_skip(request, series_uid, exc.code, len(items), queued[0], exc.extra.get("domain"))
            out.failed += [(inst, CANNOT_UNDERSTAND) for inst, _ in items]
            out.refused |= {inst.sop[1]: queued[0] for inst, _ in items}
    if not answered:
        return
    if len(answered) == 1:
        [answer] = answered.values()
    else:
        kept = [pair for uid in answered for pair in usable[uid]]
        spent = sum(decode_ms[uid] for uid in answered)
        answer = await predict_images(request, deps, kept, spent, [])
    out.jobs.append(answer.job_id)
    out.referenced += [(inst, answer.job_id) for uid in answered for inst, _ in usable[uid]]


def _check_media_type(request: Request) -> None:
    """415 unless the body is ``multipart/related; type="application/dicom"`` with a boundary."""
    mime, params = parse_options_header(request.headers.get("content-type", ""))
    kind = params.get(b"type", b"").decode("latin-1").lower()
    if mime != b"multipart/related" or kind != "application/dicom":
        raise reject(
            415, "unsupported_media_type",
            'STOW-RS takes Content-Type: multipart/related; type="application/dicom" (one DICOM instance a part)',
        )  # fmt: skip
    if not params.get(b"boundary"):
        raise reject(400, "bad_multipart", "multipart/related without a boundary")


async def store(request: Request, deps: UploadDeps, study: str | None) -> JSONResponse:
    """Receive the instances, answer each study, and say what became of each instance."""
    _check_media_type(request)
    settings = deps.settings
    with deps.buffer.hold() as take:
        try:
            uploads = await receive_uploads(
                request, settings.max_upload_bytes, "", settings.max_study_images, settings.max_study_bytes,
                take, media_type=b"multipart/related",
            )  # fmt: skip
        except APIError as exc:  # the form-data wording of these two does not fit a STOW-RS request
            if exc.code == "missing_file":
                raise APIError(422, "missing_file", "the request holds no DICOM instance") from None
            if exc.code == "several_files":
                detail = (
                    f"at most {settings.max_study_images} instances per request (XRAYFM_MAX_STUDY_IMAGES)"
                )
                raise APIError(422, "several_files", detail) from None
            raise
        instances = await anyio.to_thread.run_sync(read_headers, uploads)
        out = Outcome(str(request.base_url))
        for study_uid, members in grouped(instances, "StudyInstanceUID").items():
            if study is not None and study_uid != study:
                out.failed += [(inst, DOES_NOT_MATCH) for inst in members]
                continue
            await answer_study(request, deps, members, out)
    return out.response()


STOW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary", "description": "one DICOM instance a part"}
            }
        },
    }
}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{code: info for code, info in ERRORS.items() if code != 422},
    200: {"description": "every instance answered (DICOM JSON)", "content": {DICOM_JSON: {}}},
    202: {"description": "some instances answered, the others in Failed SOP Sequence", "content": {DICOM_JSON: {}}},
    409: {"description": "no instance answered (each in Failed SOP Sequence)", "content": {DICOM_JSON: {}}},
    400: {"description": "a part is not a DICOM instance; malformed multipart"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
    422: {"description": "no instance, or too many"},
}  # fmt: skip


@router.post(
    "/studies", responses=STOW_RESPONSES, openapi_extra=STOW_BODY,
    summary="STOW-RS: store instances for the study predictor (answers each study they belong to)",
)  # fmt: skip
async def store_instances(request: Request, deps: UploadDepsDep) -> JSONResponse:
    """Instances of one or more studies; each study is answered as ``POST /predict/study`` answers it."""
    return await store(request, deps, None)


@router.post(
    "/studies/{study}", responses=STOW_RESPONSES, openapi_extra=STOW_BODY,
    summary="STOW-RS: store instances of one study for the study predictor",
)  # fmt: skip
async def store_study_instances(study: str, request: Request, deps: UploadDepsDep) -> JSONResponse:
    """Instances of the study named; an instance of another study fails (reason 0xA900)."""
    return await store(request, deps, study)
