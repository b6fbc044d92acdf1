"""The Open Inference Protocol v2 (KServe v2 REST, as Triton, KServe, Seldon and OpenVINO Model Server speak
it) over the same path as ``POST /predict``: the same API keys, decoder processes, queue, batcher and
domain gate.

- ``GET /v2/health/live``, ``GET /v2/health/ready`` (the readiness of ``/ready``), ``GET /v2`` (server
  metadata);
- ``GET /v2/models/{name}[/versions/{version}]`` (model metadata) and ``.../ready``: the served model is the
  one the ready inference workers have loaded (their heartbeats, as ``/ready`` reports them);
- ``POST /v2/models/{name}[/versions/{version}]/infer``: one input, either ``image`` (BYTES [1], the PNG,
  JPEG or DICOM file; base64 in JSON, raw with the binary tensor data extension) or ``pixels`` (FP32 [H, W]
  or [1, H, W], grey levels 0-255). Outputs ``probabilities`` (FP32 [n_labels], in the order of the
  metadata's ``parameters.labels``) and ``heatmap`` (FP32 [h, w] in [0, 1]: the model's attention map over
  its square input), and ``parameters`` with the decision, the domain gate's verdict and the model's notice.

Errors are the protocol's ``{"error": "<code>: <detail>"}`` (an out-of-domain refusal adds the gate's
``domain`` verdict), with the HTTP status and headers the gateway's own routes give the same failure (422
out_of_domain, 503 with Retry-After, ...): clients of the protocol read ``error``; the rest of the gateway
keeps its ``{"error", "detail"}``.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request, Response, params
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from xrayfm_gateway import __version__
from xrayfm_gateway.deps import ReadinessDep, ReadinessProbe, require_api_key
from xrayfm_gateway.errors import APIError, unavailable
from xrayfm_gateway.queue import QueueUnavailable
from xrayfm_gateway.routers.predict import UploadDeps, UploadDepsDep, answer_job, decode_one, submit_images
from xrayfm_gateway.uploads import DecodedImage, Upload, body_within, check_dimensions, fit_within, reject
from xrayfm_stack.protocol import DomainInfo, ModelInfo, Prediction, WorkerAnswer

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor data extension's header
MAX_HEADER_BYTES = 8 * 2**20  # the JSON part of an infer request (an FP32 image as JSON numbers included)
SERVER_NAME = "xrayfm"
EXTENSIONS = ["binary_tensor_data"]
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES", "BF16"]  # fmt: skip


# -- the protocol's bodies ----------------------------------------------------------------------------------


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str = Field(description="<code>: <detail>, the code as the gateway's own routes name it")
    domain: DomainInfo | None = Field(None, description="out_of_domain only: the domain gate's verdict")


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    """An input or output a model takes or gives."""

    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]``."""

    name: str
    versions: list[str] = Field(description="the versions served now (several only during a hot swap)")
    platform: str = Field(description="xrayfm-<runtime> (torch, onnxruntime, onnxruntime-int8)")
    inputs: list[TensorMetadata] = Field(description="alternatives: send exactly one of them")
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        description="labels (the order of the probabilities output), input_size, sha256, threshold, notice"
    )


class RequestInput(BaseModel):
    """An input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor is binary")
    data: list[Any] | None = Field(None, description="flat or nested; BYTES elements are base64 strings")


class RequestOutput(BaseModel):
    """An output an inference request asks for."""

    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: answer it as binary data")


class InferenceRequest(BaseModel):
    """The JSON of ``POST .../infer`` (the body, or its first ``Inference-Header-Content-Length`` bytes)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: every output as binary data"
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="default: every output")


class ResponseOutput(BaseModel):
    """An output tensor of an answer."""

    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[float] | None = Field(None, description="flat, row-major; absent when sent as binary data")


class InferenceResponse(BaseModel):
    """The answer's JSON (with binary outputs: followed by them, ``Inference-Header-Content-Length``)."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(
        description="prediction, probability, in_domain, domain_score, domain_reasons, warning, notice, "
        "job_id, explain_method, runtime, heatmap_input_size, heatmap_fit"
    )
    outputs: list[ResponseOutput]


INPUTS = [
    TensorMetadata(name="image", datatype="BYTES", shape=[1]),
    TensorMetadata(name="pixels", datatype="FP32", shape=[-1, -1]),
]


def outputs_of(model: ModelInfo) -> list[TensorMetadata]:
    """The model's outputs: its probabilities in label order and its attention map."""
    return [
        TensorMetadata(name="probabilities", datatype="FP32", shape=[len(model.labels)]),
        TensorMetadata(name="heatmap", datatype="FP32", shape=[-1, -1]),
    ]


# -- errors in the protocol's shape -------------------------------------------------------------------------


def v2_error(exc: APIError) -> JSONResponse:
    """An APIError as the protocol's ``{"error": ...}``, its status and headers kept."""
    body: dict[str, Any] = {"error": f"{exc.code}: {exc.detail}"}
    if exc.extra.get("domain") is not None:  # out_of_domain: the gate's verdict, as /predict gives it
        body["domain"] = exc.extra["domain"]
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


class V2Route(APIRoute):
    """A route whose APIErrors and lost Redis (QueueUnavailable), its dependencies' included (the API key),
    answer in the protocol's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return v2_error(exc)
            except QueueUnavailable as exc:
                return v2_error(unavailable(exc))

        return route


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text}
    for code, text in {
        400: "malformed request or tensor; empty, corrupt or truncated image",
        401: "missing or wrong API key (when auth is on)",
        404: "the model or version is not served",
        413: "request over the size limit",
        415: "not a PNG, JPEG or DICOM; a compressed request (Content-Encoding)",
        422: "absurd dimensions, too many pixels; out_of_domain: the image is outside the served model's "
        "domain (XRAYFM_DOMAIN_POLICY=refuse), with the gate's verdict in `domain`",
        503: "Redis unreachable, no worker ready, or model_changed: another model or version answered (a "
        "promotion took effect meanwhile; send it again)",
        504: "no answer in time",
    }.items()
}
router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=V2Route)
keyed = [Depends(require_api_key)]


# -- health and metadata -----------------------------------------------------------------------------------


@router.get("/health/live", summary="The gateway process is alive")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready", responses={503: {"description": "not ready"}}, summary="Ready to infer (as /ready)"
)
async def ready(probe: ReadinessDep) -> JSONResponse:
    state = await probe.check(fresh=True)
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


async def served(probe: ReadinessProbe, name: str, version: str | None) -> list[ModelInfo]:
    """The versions of model `name` the ready workers serve (`version` only, when given): 503 while the
    stack is not ready, 404 when that model or version is not served."""
    state = await probe.check()
    if not state.ready:
        raise APIError(
            503, "not_ready", f"the inference stack is not ready: {state.detail}", {"Retry-After": "5"}
        )
    models: dict[tuple[str, str], ModelInfo] = {}
    for worker in state.workers:  # heartbeats: the model each worker has loaded (ModelInfo)
        if worker.get("ready") and worker.get("model"):
            info = ModelInfo.model_validate(worker["model"])
            models[(info.name, info.version)] = info
    found = [info for (n, v), info in sorted(models.items()) if n == name and version in (None, v)]
    if not found:
        serving = ", ".join(f"{n} version {v}" for n, v in sorted(models)) or "none"
        asked = name if version is None else f"{name} version {version}"
        raise APIError(404, "unknown_model", f"model {asked} is not served (served: {serving})")
    return found


def _metadata(models: list[ModelInfo]) -> ModelMetadata:
    model = models[-1]
    return ModelMetadata(
        name=model.name,
        versions=[m.version for m in models],
        platform=f"xrayfm-{model.runtime or 'torch'}",
        inputs=INPUTS,
        outputs=outputs_of(model),
        parameters={
            "labels": model.labels,
            "negative_label": model.negative_label,
            "input_size": model.input_size,
            "sha256": model.sha256,
            "threshold": model.threshold,
            "notice": model.notice,
        },
    )


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    responses=ERRORS,
    dependencies=keyed,
    summary="Model metadata",
)
async def model_metadata(name: str, probe: ReadinessDep) -> ModelMetadata:
    return _metadata(await served(probe, name, None))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=ERRORS,
    dependencies=keyed,
    summary="Model version metadata",
)
async def model_version_metadata(name: str, version: str, probe: ReadinessDep) -> ModelMetadata:
    return _metadata(await served(probe, name, version))


@router.get("/models/{name}/ready", responses=ERRORS, dependencies=keyed, summary="The model is served")
async def model_ready(name: str, probe: ReadinessDep) -> dict[str, Any]:
    await served(probe, name, None)
    return {"name": name, "ready": True}


@router.get(
    "/models/{name}/versions/{version}/ready",
    responses=ERRORS,
    dependencies=keyed,
    summary="The model version is served",
)
async def model_version_ready(name: str, version: str, probe: ReadinessDep) -> dict[str, Any]:
    await served(probe, name, version)
    return {"name": name, "version": version, "ready": True}


# -- infer -------------------------------------------------------------------------------------------------


def bad_tensor(detail: str) -> APIError:
    return reject(400, "bad_tensor", detail)


async def _read_body(request: Request, limit: int, take: Callable[[int], None]) -> bytearray:
    """The whole body, at most `limit` bytes, each byte reserved with `take` (the gateway's upload buffer)."""
    body = bytearray()
    async for chunk in body_within(request, limit):
        take(len(chunk))
        body += chunk
    return body


def parse_request(body: bytearray, header_length: str | None) -> tuple[InferenceRequest, memoryview]:
    """The JSON part, parsed, and the binary part (empty without the binary tensor data extension; a view of
    `body`, not a copy)."""
    split = len(body) if header_length is None else int(header_length) if header_length.isdigit() else -1
    if not 0 <= split <= len(body):
        raise bad_tensor(f"{HEADER_LENGTH} must be a number of bytes within the body ({len(body)})")
    header, binary = bytes(memoryview(body)[:split]), memoryview(body)[split:]
    if len(header) > MAX_HEADER_BYTES:
        detail = f"the JSON part is over {MAX_HEADER_BYTES:,} bytes: send the tensors as binary data"
        raise reject(413, "body_too_large", detail)
    try:
        return InferenceRequest.model_validate_json(header), binary
    except ValidationError as exc:
        said = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        raise reject(400, "bad_request", f"not an inference request: {said}") from None


def _tensor_bytes(tensor: RequestInput, binary: memoryview) -> memoryview | None:
    """The tensor's binary data (None: its data is in the JSON)."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or size != len(binary):
        raise bad_tensor(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the JSON")
    return binary


def _flat(data: list[Any] | None, name: str) -> list[Any]:
    if data is None:
        raise bad_tensor(f"input {name!r} has neither data nor binary_data_size")
    while data and all(isinstance(item, list) for item in data):
        data = [item for row in data for item in row]
    return data


def image_file(tensor: RequestInput, binary: memoryview) -> bytes:
    """The encoded file of a BYTES [1] tensor: one length-prefixed element as binary data, or one base64
    string in the JSON."""
    if math.prod(tensor.shape) != 1:
        raise bad_tensor(f"input 'image' holds one file: shape [1], got {tensor.shape}")
    raw = _tensor_bytes(tensor, binary)
    if raw is not None:  # BYTES elements: a 4-byte little-endian length, then the bytes
        if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
            raise bad_tensor(
                "input 'image': one BYTES element (a 4-byte little-endian length, then the file)"
            )
        return bytes(raw[4:])
    elements = _flat(tensor.data, tensor.name)
    if len(elements) != 1 or not isinstance(elements[0], str):
        raise bad_tensor("input 'image' in JSON: one string, the file in base64")
    try:
        return base64.b64decode(elements[0], validate=True)
    except (ValueError, binascii.Error):
        raise bad_tensor("input 'image' in JSON: the file in base64 (raw bytes need binary data)") from None


def grey_pixels(tensor: RequestInput, binary: memoryview, deps: UploadDeps) -> np.ndarray:
    """The uint8 grey image of an FP32 [H, W] or [1, H, W] tensor of grey levels 0-255, its size checked
    as an upload's (before a single value is read)."""
    shape = tensor.shape[1:] if len(tensor.shape) == 3 and tensor.shape[0] == 1 else tensor.shape
    if len(shape) != 2 or min(shape) < 1:
        raise bad_tensor(f"input 'pixels' is one grey image: shape [H, W] or [1, H, W], got {tensor.shape}")
    height, width = shape
    check_dimensions(width, height, deps.settings)
    raw = _tensor_bytes(tensor, binary)
    try:
        if raw is not None:
            values = np.frombuffer(raw, dtype="<f4") if len(raw) == 4 * height * width else None
        else:
            values = np.asarray(_flat(tensor.data, tensor.name), dtype=np.float32)
    except (ValueError, TypeError):
        raise bad_tensor("input 'pixels' in JSON: numbers only") from None
    if values is None or values.size != height * width:
        raise bad_tensor(f"input 'pixels' of shape {tensor.shape} needs {height * width:,} FP32 values")
    if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 255.0:
        raise bad_tensor("input 'pixels': grey levels, finite and within 0..255")
    # numpy's stubs type rint of an array of unknown dtype as Any
    pixels: np.ndarray = np.rint(values).astype(np.uint8).reshape(height, width)
    return pixels


@dataclass
class TensorUpload:
    """The `queue_it` of :func:`~xrayfm_gateway.routers.predict.answer_job` for an infer request: read it,
    decode its image (a file in the decoder processes, as an upload; pixels here) and queue it. It keeps
    the parsed request for the answer."""

    inference: InferenceRequest | None = None
    wanted: list[str] = field(default_factory=list)

    async def __call__(
        self, request: Request, deps: UploadDeps, explain: bool, method: str | None
    ) -> tuple[str, dict[str, Any]]:
        started = time.perf_counter()
        settings = deps.settings
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise reject(415, "unsupported_encoding", "send the request uncompressed (no Content-Encoding)")
        with deps.buffer.hold() as take:
            body = await _read_body(request, settings.max_upload_bytes + MAX_HEADER_BYTES, take)
            self.inference, binary = parse_request(body, request.headers.get(HEADER_LENGTH))
            self.wanted = self._outputs()
            decoded = await self._decoded(self.inference.inputs, binary, deps)
        decode_ms = 1000 * (time.perf_counter() - started)
        return await submit_images(deps, [decoded], False, "heatmap" in self.wanted, method, decode_ms)

    def _outputs(self) -> list[str]:
        assert self.inference is not None
        names = [o.name for o in self.inference.outputs or []] or ["probabilities", "heatmap"]
        unknown = sorted(set(names) - {"probabilities", "heatmap"})
        if unknown:
            raise bad_tensor(f"unknown output(s) {unknown}: the outputs are 'probabilities' and 'heatmap'")
        return names

    @staticmethod
    async def _decoded(inputs: list[RequestInput], binary: memoryview, deps: UploadDeps) -> DecodedImage:
        if len(inputs) != 1 or inputs[0].name not in ("image", "pixels"):
            raise bad_tensor(
                "send one input: 'image' (BYTES [1], the encoded file) or 'pixels' (FP32 [H, W])"
            )
        tensor = inputs[0]
        wanted = "BYTES" if tensor.name == "image" else "FP32"
        if tensor.datatype != wanted:
            raise bad_tensor(f"input {tensor.name!r} is {wanted}, got {tensor.datatype}")
        if tensor.name == "image":
            return await decode_one(Upload(image_file(tensor, binary), None, None), deps)
        pixels = grey_pixels(tensor, binary, deps)
        fitted = await anyio.to_thread.run_sync(fit_within, pixels, deps.settings.transport_side)
        return DecodedImage(pixels=fitted, format="FP32", width=pixels.shape[1], height=pixels.shape[0])


def _binary_wanted(inference: InferenceRequest, name: str) -> bool:
    """Is output `name` to be answered as binary data (its own ``binary_data``, else the request's)?"""
    default = bool((inference.parameters or {}).get("binary_data_output", False))
    for output in inference.outputs or []:
        own = (output.parameters or {}).get("binary_data")
        if output.name == name and own is not None:
            return bool(own)
    return default


def _parameters(answer: Prediction, worker: WorkerAnswer) -> dict[str, Any]:
    """The answer's facts besides its tensors, as the protocol's scalar parameters."""
    facts: dict[str, Any] = {
        "prediction": answer.prediction,
        "probability": answer.probability,
        "job_id": answer.job_id,
        "explain_method": answer.explain_method,
        "runtime": answer.runtime or answer.model.runtime,
        "warning": answer.warning,
        "notice": answer.model.notice,
    }
    if answer.domain is not None:
        facts["in_domain"] = answer.domain.in_domain
        facts["domain_score"] = answer.domain.score
        facts["domain_reasons"] = "; ".join(f"{r.code}: {r.message}" for r in answer.domain.reasons) or None
    if worker.model_map is not None:
        facts["heatmap_input_size"] = worker.model_map.input_size
        facts["heatmap_fit"] = worker.model_map.mode
    return {key: value for key, value in facts.items() if value is not None}


def inference_answer(
    inference: InferenceRequest, wanted: list[str], answer: Prediction, worker: WorkerAnswer
) -> Response:
    """The protocol's answer: JSON, or JSON then the binary outputs (``Inference-Header-Content-Length``)."""
    tensors = {
        "probabilities": np.asarray([answer.probabilities[label] for label in answer.model.labels], "<f4"),
        "heatmap": worker.model_map.array() if worker.model_map is not None else None,
    }
    outputs, blobs = [], []
    for name in wanted:
        tensor = tensors[name]
        if tensor is None:
            continue
        output = ResponseOutput(name=name, shape=list(tensor.shape), datatype="FP32")
        if _binary_wanted(inference, name):
            blobs.append(tensor.tobytes())
            output.parameters = {"binary_data_size": len(blobs[-1])}
        else:
            output.data = tensor.ravel().tolist()
        outputs.append(output)
    body = (
        InferenceResponse(
            model_name=answer.model.name,
            model_version=answer.model.version,
            id=inference.id,
            parameters=_parameters(answer, worker),
            outputs=outputs,
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(body))}
    )


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` written in place (an OpenAPI body cannot hold them)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    inlined: dict[str, Any] = inline(schema)
    return inlined


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"JSON; or, with the binary tensor data extension, JSON of {HEADER_LENGTH} bytes "
        "followed by the binary tensors",
        "content": {
            "application/json": {"schema": _inlined(InferenceRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


class RouteOptions(TypedDict):
    """The keyword arguments both infer routes share (``APIRouter.post``'s)."""

    response_class: type[Response]
    responses: dict[int | str, dict[str, Any]]
    openapi_extra: dict[str, Any]
    dependencies: list[params.Depends]


INFER: RouteOptions = {
    "response_class": Response,
    "responses": {200: {"model": InferenceResponse, "description": "the outputs"}, **ERRORS},
    "openapi_extra": INFER_BODY,
    "dependencies": keyed,
}


async def _infer(request: Request, deps: UploadDeps, name: str, version: str | None) -> Response:
    """Check the model is served, then take the /predict path with a :class:`TensorUpload`."""
    await served(deps.probe, name, version)
    upload = TensorUpload()
    job, answer = await answer_job(upload, request, deps, True, None)
    assert isinstance(answer, Prediction) and isinstance(job.result, WorkerAnswer) and upload.inference
    if answer.model.name != name or version not in (None, answer.model.version):
        raise APIError(
            503,
            "model_changed",
            f"{answer.model.name} version {answer.model.version} answered: the model asked for went out of "
            "service meanwhile (send it again)",
            {"Retry-After": "5"},
        )
    return inference_answer(upload.inference, upload.wanted, answer, job.result)


@router.post("/models/{name}/infer", summary="Infer (the served version)", **INFER)
async def infer(name: str, request: Request, deps: UploadDepsDep) -> Response:
    return await _infer(request, deps, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Infer with this version", **INFER)
async def infer_version(name: str, version: str, request: Request, deps: UploadDepsDep) -> Response:
    return await _infer(request, deps, name, version)
