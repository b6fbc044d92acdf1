"""Response models (they make the OpenAPI document; answers are checked against them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    """The served model's identity."""

    name: str
    version: str
    sha256: str
    labels: list[str]
    input_size: int
    device: str
    synthetic: bool = False  # trained on synthetic phantoms
    untrained: bool = False  # random weights (the placeholder `make up` serves with an empty store)


class ImageInfo(BaseModel):
    """Technical facts of the uploaded image (no header field that could identify a patient)."""

    format: str
    width: int
    height: int


class Prediction(BaseModel):
    """The answer to ``POST /predict``."""

    prediction: str = Field(
        description="decision: the label (or 'Normal' under the threshold), or the top label"
    )
    probability: float = Field(
        description="probability of the predicted label (binary: of the positive label)"
    )
    attention_map: str | None = Field(
        description="base64 8-bit grey PNG with the image's aspect ratio, 255 = most attended; "
        "null when explain=false"
    )
    probabilities: dict[str, float]
    explain_method: str | None = None
    model: ModelInfo
    image: ImageInfo
    timings: dict[str, float] = Field(description="milliseconds: decode, queue_wait, inference, total...")
    job_id: str
    batch_size: int = 1
    worker: str | None = None


class JobSubmitted(BaseModel):
    """The answer to ``POST /jobs``: poll ``status_url``."""

    job_id: str
    status: str = "queued"
    status_url: str


class JobStatus(BaseModel):
    """A job's state; ``result`` when done, ``error`` when failed."""

    job_id: str
    status: str = Field(description="queued | running | done | failed")
    result: Prediction | None = None
    error: str | None = None


class Readiness(BaseModel):
    """``GET /ready``: the broker is reachable and at least one worker has a model answering."""

    ready: bool
    broker: str
    workers: list[dict[str, Any]] = []
    detail: str


class ErrorBody(BaseModel):
    """Every error: a stable code and a message for people."""

    error: str
    detail: str
