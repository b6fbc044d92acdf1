"""The stack's wire protocol: typed models of what travels between the services.

Inference (gateway -> Redis/Celery -> inference worker -> result backend -> gateway)::

    PredictRequest  {"height": H, "width": W, "explain": true, "method": "rollout",
                     "submitted_at": <unix time>, "facts": {...} | null, "domain_policy": "refuse"}
                    the image itself, H*W uint8 grey pixels (row-major, raw), waits in the job's inputs key
                    in Redis (xrayfm_stack.celery.inputs_key), beside the message rather than inside it
    WorkerAnswer    {"prediction", "probability", "probabilities", "model_map": ModelMap | null,
                     "explain_method", "model": ModelInfo, "timings": Timings, "batch_size", "worker"}
                    ModelMap: the explanation over the model's input (float32, e.g. 14 x 14) and the
                    geometry to draw it on; the gateway draws it into "attention_map" (a base64 PNG on
                    the image's own aspect: xrayfm.explain.overlay.heatmap_to_base64)
    WorkerRejection {"error": {"type": "bad_request", "message": "..."}}   (the request was unusable)
    Prediction      an ImageAnswer (a WorkerAnswer with its map drawn) plus the gateway's "image" facts
                    and "job_id": the answer of /predict

A request is grey pixels and options, never a file name or a header. Training jobs travel as a job id;
their :class:`JobSpec` and :class:`JobRecord` live in Redis (:mod:`xrayfm_stack.jobs`). The gateway's
OpenAPI document is generated from these models.

Gateways and inference workers speak one version of this protocol, :data:`PROTOCOL_VERSION`: each worker's
heartbeat says which, and a gateway sends no work while no ready worker speaks its own (``/ready`` says
why). There is no compatibility code for other versions: a change to the messages raises the version.
This module holds the models and their thin wire conversions (base64, raw bytes); decoding uploads and
drawing heatmaps are the library's (:mod:`xrayfm.data.images`, :mod:`xrayfm.explain.overlay`).
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any, Generic, Literal, TypeVar, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from xrayfm.errors import XrayfmError
from xrayfm.explain.methods import METHODS as EXPLAIN_METHODS

# The version of the messages below that gateways and inference workers exchange, in every worker heartbeat
# ("protocol"). Raise it with any change a gateway or a worker of the other version would misread.
PROTOCOL_VERSION = 2
PREDICT_TASK = "xrayfm.predict"
PREDICT_STUDY_TASK = "xrayfm.predict_study"  # several images of one study, batched in one worker call
MAX_SIDE = 4096  # a request larger than this on either side is refused by the worker (the gateway sends less)
MAX_MAP_SIDE = 1024  # a model map is a patch or feature grid: 14 x 14 for a ViT/16 at 224 px
JOB_STATES = ("queued", "running", "cancelling", "done", "failed", "cancelled")
JobKind = Literal["pretrain", "adapt", "evaluate", "tune", "calibrate"]
DomainPolicy = Literal["refuse", "flag", "off"]
DOMAIN_POLICIES: tuple[str, ...] = get_args(DomainPolicy)
JOB_KINDS: tuple[str, ...] = get_args(JobKind)

ExplainMethod = Literal["rollout", "grad_rollout", "gradcam"]
assert set(get_args(ExplainMethod)) == set(EXPLAIN_METHODS), "ExplainMethod must list xrayfm's methods"


class ProtocolError(XrayfmError):
    """A queued request that does not follow the protocol (not the caller's image: a client bug)."""


# The failures a worker reports as such (a task FAILURE of this type), which the gateway maps by type name:
# Celery stores a failure as its exception's type and message, and the gateway reads the type back. Neither
# is an XrayfmError: the worker answers those as a rejection of the request (422).


class InferenceTimeout(RuntimeError):
    """The model did not answer within the task time limit (the gateway answers 504)."""


class JobLost(RuntimeError):
    """The job's stored state or image went away with Redis (restarted without its data, or unreachable
    for longer than the result backend retries) before the worker could run it. Nothing is wrong with the
    request: the gateway answers 503 with Retry-After, for the caller to send it again."""


# ----------------------------------------------------------------------------------------------- requests


class PredictRequest(BaseModel):
    """One image to predict: its size and the options. The image itself, 2-D uint8 grey pixels, travels
    raw in the job's inputs key (:meth:`to_store`, :meth:`image`): raw bytes in their own key skip the
    base64 and the JSON of the Celery message and its copy in kombu's unacknowledged index. A request holds
    at most XRAYFM_TRANSPORT_SIDE squared bytes (256 KB at 512) in Redis meanwhile."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    height: int = Field(ge=1, le=MAX_SIDE)
    width: int = Field(ge=1, le=MAX_SIDE)
    explain: bool = True
    method: str = "rollout"
    submitted_at: float = Field(default_factory=time.time)
    facts: dict[str, Any] | None = Field(
        None,
        description="what the upload said beyond its pixels: colourfulness, DICOM Modality, "
        "BodyPartExamined, ViewPosition (xrayfm.domain.InputFacts; no patient data)",
    )
    domain_policy: DomainPolicy = Field(
        "refuse", description="what the worker does with an out-of-domain image"
    )

    @classmethod
    def to_store(
        cls,
        image: np.ndarray,
        *,
        explain: bool = True,
        method: str = "rollout",
        submitted_at: float | None = None,
        facts: dict[str, Any] | None = None,
        domain_policy: DomainPolicy = "refuse",
    ) -> tuple[PredictRequest, bytes]:
        """Pack a 2-D uint8 grey image and options: (the request, its raw pixels for the job's inputs key).
        :class:`ProtocolError` when `image` is not a non-empty 2-D uint8 array."""
        arr = np.ascontiguousarray(image)
        if arr.ndim != 2 or arr.dtype != np.uint8 or 0 in arr.shape:
            raise ProtocolError(f"expected a non-empty 2-D uint8 image, got {arr.dtype} {arr.shape}")
        request = cls(
            height=int(arr.shape[0]),
            width=int(arr.shape[1]),
            explain=bool(explain),
            method=str(method),
            submitted_at=time.time() if submitted_at is None else float(submitted_at),
            facts=facts or None,
            domain_policy=domain_policy,
        )
        return request, arr.tobytes()

    @classmethod
    def parse(cls, payload: Any) -> PredictRequest:
        """Check a received payload; :class:`ProtocolError` names what is wrong (never the pixels)."""
        if not isinstance(payload, dict):
            raise ProtocolError(f"request must be a JSON object, got {type(payload).__name__}")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()
            )
            raise ProtocolError(f"malformed request: {problems}") from None

    def image(self, stored: bytes | None) -> np.ndarray:
        """The H x W uint8 image from the bytes read from the job's inputs key (`stored`): :class:`JobLost`
        when those are missing, :class:`ProtocolError` when they do not match the size."""
        if stored is None:
            raise JobLost("the request's image is no longer in Redis (lost in a restart, or expired)")
        if len(stored) != self.height * self.width:
            raise ProtocolError(
                f"pixel buffer has {len(stored)} bytes, expected {self.height}x{self.width}={self.height * self.width}"
            )
        return np.frombuffer(bytes(stored), dtype=np.uint8).reshape(self.height, self.width)

    def describe(self) -> str:
        """A short, pixel-free description for logs and Celery's argsrepr."""
        return f"<grey {self.width}x{self.height} explain={self.explain}>"


# ------------------------------------------------------------------------------------------------ answers


class ModelInfo(BaseModel):
    """The served model's identity, in every answer and in each worker's heartbeat."""

    name: str
    version: str
    sha256: str
    labels: list[str]
    negative_label: str = Field("Normal", description="the answer of a one-label model under its threshold")
    input_size: int
    device: str
    synthetic: bool = Field(False, description="trained on synthetic phantoms")
    untrained: bool = Field(False, description="random weights (a placeholder, not a trained model)")
    notice: str | None = Field(
        None, description="the model's intended use (research only), shown with answers"
    )
    threshold: float | None = Field(
        None, description="one-label models answer the label when its probability >= threshold"
    )
    threshold_source: str | None = Field(
        None,
        description="where the threshold comes from: a chosen operating point, or 'default 0.5 (not calibrated)'",
    )
    runtime: str | None = Field(
        None, description="the worker's runtime for this model (torch, onnxruntime, onnxruntime-int8)"
    )
    runtime_reason: str | None = Field(
        None,
        description="why that runtime: the XRAYFM_QUANTIZE choice (auto: the version's int8 verdict) and "
        "the graph served (the version's stored one, or exported at load)",
    )
    calibrated: bool = Field(False, description="probabilities scaled to a site's labelled images")
    calibration_source: str | None = Field(
        None, description="the calibration's method and the data it was fitted on"
    )
    domain: str | None = Field(None, description="what the model is for, in words (its domain gate's)")
    domain_gate: dict[str, Any] | None = Field(
        None, description="method, threshold, target and measured pass rates of the version's domain gate"
    )


class DomainReason(BaseModel):
    """One reason an image is outside a model's domain."""

    code: str = Field(description="colour | blank | noise | modality | body_part | view | features")
    message: str


class DomainInfo(BaseModel):
    """Whether the model can judge this image: its domain gate's verdict."""

    in_domain: bool
    score: float | None = Field(
        None, description="the feature score (larger: further from the training images)"
    )
    threshold: float | None = Field(None, description="scores above it are out of domain")
    reasons: list[DomainReason] = Field(default_factory=list, description="empty when in domain")
    gate: str | None = Field(
        None, description="the gate's method; null: the version has none (input checks only)"
    )


class Timings(BaseModel):
    """Milliseconds spent per stage; a stage that did not happen on this path is left out."""

    model_config = ConfigDict(extra="allow")

    decode_ms: float | None = Field(None, description="receiving, checking and decoding the upload (gateway)")
    queue_wait_ms: float | None = Field(None, description="from queued to picked up by a worker")
    preprocess_ms: float | None = None
    inference_ms: float | None = Field(None, description="the model's forward pass (+ heatmap) for the batch")
    postprocess_ms: float | None = Field(None, description="decisions and packing the heatmaps (worker)")
    render_ms: float | None = Field(None, description="drawing the heatmap PNG on the image (gateway)")
    worker_ms: float | None = Field(None, description="from picked up to answered, in the worker")
    total_ms: float | None = Field(None, description="the whole request, at the gateway (/predict only)")

    @model_serializer(mode="wrap")
    def _drop_missing(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ImageInfo(BaseModel):
    """Technical facts of the uploaded image (no header field that could identify a patient)."""

    format: str
    width: int
    height: int


class ModelMap(BaseModel):
    """An explanation over the model's square input, as the model computed it, and where to draw it.

    The worker sends this instead of a drawn PNG (a few hundred floats instead of a PNG in base64), and
    drawing (upsample, invert the letterbox, PNG, base64) moves from the model's CPU to the gateway's, which scale
    apart. Float32, so the gateway draws exactly what the library draws in process, with the same function
    (:func:`xrayfm.explain.overlay.heatmap_to_base64`)."""

    model_config = ConfigDict(frozen=True)

    data: str = Field(description="base64 of height*width float32 (little-endian, row-major) in [0, 1]")
    height: int = Field(ge=1, le=MAX_MAP_SIDE)
    width: int = Field(ge=1, le=MAX_MAP_SIDE)
    input_size: int = Field(ge=1, le=MAX_SIDE, description="the model's square input side, px")
    mode: str = Field(description="how the image was fitted to that square: pad | crop | stretch")
    out_height: int = Field(ge=1, le=MAX_SIDE, description="the drawn map's height (the image's aspect)")
    out_width: int = Field(ge=1, le=MAX_SIDE)

    @classmethod
    def from_array(cls, heat: np.ndarray, input_size: int, mode: str, out_shape: tuple[int, int]) -> ModelMap:
        """Pack a 2-D map (values in [0, 1]) computed on a `input_size` square input fitted in `mode`."""
        arr = np.ascontiguousarray(heat, dtype="<f4")
        if arr.ndim != 2:
            raise ProtocolError(f"a model map is 2-D, got shape {arr.shape}")
        return cls(
            data=base64.b64encode(arr.tobytes()).decode("ascii"),
            height=int(arr.shape[0]),
            width=int(arr.shape[1]),
            input_size=int(input_size),
            mode=str(mode),
            out_height=int(out_shape[0]),
            out_width=int(out_shape[1]),
        )

    def array(self) -> np.ndarray:
        """The map; :class:`ProtocolError` when the data does not match its size or lies outside [0, 1]."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise ProtocolError(f"malformed model map: not base64 ({exc})") from None
        if len(raw) != 4 * self.height * self.width:
            raise ProtocolError(
                f"malformed model map: {len(raw)} bytes, expected 4 x {self.height} x {self.width}"
            )
        heat = np.frombuffer(raw, dtype="<f4").reshape(self.height, self.width)
        if not np.isfinite(heat).all() or heat.min() < 0.0 or heat.max() > 1.0:
            raise ProtocolError("malformed model map: values must be finite and in [0, 1]")
        return heat


class ImageAnswer(BaseModel):
    """One image's answer, as callers get it."""

    prediction: str = Field(
        description="decision: the label (or 'Normal' under the threshold), or the top label"
    )
    probability: float = Field(
        description="probability of the predicted label (binary: of the positive label)"
    )
    attention_map: str | None = Field(
        None,
        description="base64 8-bit grey PNG with the image's aspect ratio, 255 = most attended; "
        "null when explain=false",
    )
    probabilities: dict[str, float]
    explain_method: str | None = None
    model: ModelInfo
    timings: Timings = Field(default_factory=Timings)
    batch_size: int = 1
    worker: str | None = None
    runtime: str | None = Field(
        None,
        description="what computed this answer (torch, onnxruntime, onnxruntime-int8); methods that need "
        "gradients always run in torch",
    )
    domain: DomainInfo | None = Field(
        None, description="the domain gate's verdict (null: XRAYFM_DOMAIN_POLICY=off)"
    )
    warning: str | None = Field(
        None,
        description="set when the image is outside the model's domain (XRAYFM_DOMAIN_POLICY=flag): "
        "the answer is not to be trusted",
    )


class WorkerAnswer(ImageAnswer):
    """What the inference worker answers for one image: an :class:`ImageAnswer` whose heatmap is still the
    model's map (``model_map``), for the gateway to draw into ``attention_map`` (which the worker leaves
    null: a drawn map in a worker's answer does not follow the protocol)."""

    attention_map: None = Field(None, description="always null: the gateway draws model_map")
    model_map: ModelMap | None = None

    def answer(self, attention_map: str | None, render_ms: float | None = None) -> ImageAnswer:
        """The caller's answer: this one with `attention_map` (the gateway's drawing of ``model_map``)
        and the time drawing took in ``timings.render_ms``."""
        fields = self.model_dump(exclude={"model_map"})
        fields["attention_map"] = attention_map
        if render_ms is not None:
            fields["timings"]["render_ms"] = render_ms
        return ImageAnswer.model_validate(fields)


class RejectionReason(BaseModel):
    """Why the worker could not use a request (``out_of_domain``: the model cannot judge the image)."""

    type: str = "bad_request"
    message: str
    domain: DomainInfo | None = None
    model: ModelInfo | None = None


class WorkerRejection(BaseModel):
    """The worker's answer to a request it could not use (a clear 422 at the gateway)."""

    error: RejectionReason


AnswerT = TypeVar("AnswerT", bound=ImageAnswer)


class _StudyAnswers(BaseModel, Generic[AnswerT]):
    """A study's decision and each image's answer: the worker's (:class:`StudyAnswer`, maps undrawn) or the
    caller's (:class:`StudyPrediction`, maps drawn)."""

    prediction: str = Field(description="the study's decision, from its probability")
    probability: float = Field(description="the study's probability of the predicted label")
    probabilities: dict[str, float] = Field(description="per label: the mean over the study's images")
    aggregation: str = Field(description="how the study's probabilities are made from its images'")
    model: ModelInfo
    images: list[AnswerT] = Field(description="each image's own answer, in the order sent")
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    warning: str | None = Field(
        None, description="set when an image is outside the model's domain (XRAYFM_DOMAIN_POLICY=flag)"
    )


class StudyAnswer(_StudyAnswers[WorkerAnswer]):
    """What the inference worker answers for a study: the study's decision and each image's answer."""


def parse_worker_reply(payload: Any) -> WorkerAnswer | StudyAnswer | WorkerRejection:
    """A result read back from the result backend, typed."""
    if isinstance(payload, dict) and "error" in payload:
        return WorkerRejection.model_validate(payload)
    if isinstance(payload, dict) and "images" in payload:
        return StudyAnswer.model_validate(payload)
    return WorkerAnswer.model_validate(payload)


class Prediction(ImageAnswer):
    """The answer to ``POST /predict``."""

    image: ImageInfo
    job_id: str


class StudyPrediction(_StudyAnswers[ImageAnswer]):
    """The answer to ``POST /predict/study`` (``images[k]`` and ``image_info[k]``: the k-th file sent)."""

    image_info: list[ImageInfo]
    job_id: str


class JobSubmitted(BaseModel):
    """The answer to ``POST /jobs`` and ``POST /training/jobs``: poll ``status_url``."""

    job_id: str
    status: str = "queued"
    status_url: str


class JobStatus(BaseModel):
    """A prediction job's state; ``result`` when done, ``error`` when failed."""

    job_id: str
    status: str = Field(description="queued | running | done | failed")
    result: Prediction | StudyPrediction | None = None
    error: str | None = None
    domain: DomainInfo | None = Field(None, description="failed as out_of_domain: the domain gate's verdict")


class Readiness(BaseModel):
    """``GET /ready``: the broker is reachable and at least one worker has a model answering."""

    ready: bool
    broker: str
    workers: list[dict[str, Any]] = []
    detail: str


class ErrorBody(BaseModel):
    """Every error: a stable code and a message for people (``out_of_domain`` adds the gate's verdict)."""

    error: str
    detail: str
    domain: DomainInfo | None = None


# ---------------------------------------------------------------------------------- training and models


class SeriesOutcome(BaseModel):
    """One series of a study the router sent: answered, or skipped and why (no UID: a tag of it)."""

    series: str = Field(description="the first 16 hex digits of the Series Instance UID's SHA-256")
    instances: int
    answered: bool
    reason: str | None = Field(
        None,
        description="why it (or an instance of it) was not answered: out_of_domain | not_an_image | "
        "corrupt_image | own_result | other_study",
    )
    gate: list[str] = Field(default_factory=list, description="out_of_domain: the gate's reason codes")


class StudyRecord(BaseModel):
    """What the router did with one PACS study (no patient data: the study by its Orthanc id)."""

    time: float = Field(default_factory=time.time, description="unix time the router finished with the study")
    study: str = Field(description="Orthanc's id of the study (a hash, not a DICOM UID)")
    outcome: str = Field(description="answered | skipped (no series for the model) | failed")
    job_id: str | None = None
    prediction: str | None = None
    probability: float | None = None
    model: str | None = Field(None, description="name/version of the model that answered")
    series: list[SeriesOutcome] = Field(default_factory=list)
    sr_written: bool = False
    captures: int = Field(0, description="heatmap Secondary Captures written")
    error: str | None = Field(None, description="failed: what failed (an error code, never the data)")


class StudyList(BaseModel):
    """``GET /studies``: the studies the PACS router handled, newest first."""

    studies: list[StudyRecord]


class ModelRefBody(BaseModel):
    """A version in the model store."""

    name: str
    version: str


class JobSpec(BaseModel):
    """A training job as submitted: its kind, the model name it publishes, and its config (the fields of
    the library's ``PretrainConfig`` / ``AdaptConfig`` / ``EvaluateConfig`` / ``TuneConfig``; see
    :mod:`xrayfm_stack.spec`)."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind
    name: str
    config: dict[str, Any]


class JobRecord(BaseModel):
    """A training job's record: status, progress, result, the version it published, and its history."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: str = Field(description=" | ".join(JOB_STATES))
    kind: str | None = None
    name: str | None = None
    spec: JobSpec | None = Field(None, description="left out of job lists")
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    model: ModelRefBody | None = None
    error: str | None = None
    created: float | None = None
    updated: float | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    worker: str | None = None
    resumed: bool | None = None
    requeued: int | None = None
    handed_back: int | None = None


class JobList(BaseModel):
    """``GET /training/jobs``: the latest jobs, newest first."""

    jobs: list[JobRecord]


class JobLogTail(BaseModel):
    """``GET /training/jobs/{id}/log``: the last lines of a job's log, oldest first."""

    job_id: str
    lines: list[str]


class CancelAnswer(BaseModel):
    """``POST /training/jobs/{id}/cancel``: the job's new status."""

    job_id: str
    status: str


class ModelVersion(BaseModel):
    """One version in the model store, with what its files say about it."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    serving: bool = False
    format: str | None = None
    kind: str | None = None
    method: str | None = None
    labels: list[str] | None = None
    metrics: dict[str, Any] | None = None
    synthetic: bool = False
    created: str | float | None = None
    job_id: str | None = None
    lineage: dict[str, Any] = {}
    evaluations: list[dict[str, Any]] = []
    operating_point: dict[str, Any] | None = None
    feedback: dict[str, Any] | None = Field(None, description="staff verdicts: agree, disagree, agreement")
    domain_gate: dict[str, Any] | None = Field(
        None,
        description="the version's domain gate: method, threshold, target pass rate (pass_rate), the pass "
        "rate on held-out in-domain images it was set on and on validation images it was not set on",
    )
    calibration: dict[str, Any] | None = Field(None, description="the site calibration, when it has one")
    onnx: dict[str, Any] | None = Field(
        None,
        description="its stored ONNX graphs (model.onnx, model.int8.onnx: sha256, opset, what they were "
        "exported from) and the int8 verdict (serve_int8, reason, fp32/int8 AUROC on the validation images)",
    )


class ModelList(BaseModel):
    """``GET /models``: the served version and every version in the store."""

    serving: ModelRefBody | None
    models: list[ModelVersion]


class FeedbackBody(BaseModel):
    """``POST /feedback``: a verdict on one answer. No patient data: the comment is free text for the
    model's owners, so write no names or identifiers into it."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(description="the answer's job_id")
    verdict: Literal["agree", "disagree"]
    label: str | None = Field(None, description="the correct answer (required with disagree)")
    comment: str | None = Field(None, max_length=500, description="optional; no names or identifiers")


class FeedbackAnswer(BaseModel):
    """The stored feedback record (``image``: where its image was kept, when the deployment opted in)."""

    id: str
    job_id: str
    model: dict[str, Any]
    prediction: str
    verdict: str
    label: str
    image: str | None = None


class OperatingPointBody(BaseModel):
    """``PUT /models/{name}/{version}/operating-point``: a threshold with its source, or a candidate point
    of one of the version's evaluate jobs (``job_id`` + ``rule``; ``xrayfm evaluate`` reports them)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0.0, le=1.0, description="the decision threshold")
    source: str | None = Field(
        None, max_length=300, description="where it comes from (required with threshold)"
    )
    job_id: str | None = Field(None, description="an evaluate job of this version to take the point from")
    rule: str | None = Field(None, description="youden, sensitivity>=0.95 or specificity>=0.95 (with job_id)")
    level: str = Field("image", description="image (what /predict decides) or study")
    label: str | None = Field(None, description="the label, when the model has several")


class OperatingPointAnswer(BaseModel):
    """The version's operating point after the change (None: back to the uncalibrated default)."""

    name: str
    version: str
    operating_point: dict[str, Any] | None


class ServingAnswer(BaseModel):
    """The version served after a promotion or a rollback."""

    serving: ModelRefBody
