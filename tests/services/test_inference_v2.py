"""The Open Inference Protocol v2 (KServe v2 REST) on the gateway: in process (the real app with the queues
faked, gateway_fakes) for the routes, shapes and errors, with tritonclient building the binary requests and
reading the binary answers; and through the real stack with tritonclient.http as the client, its
probability matching /predict's for the same image."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput, InferResult

from tests.services.gateway_fakes import MODEL, READY_WORKER, FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import phantom, png_bytes
from xrayfm_gateway.queue import JobState
from xrayfm_stack.protocol import DomainInfo, DomainReason, RejectionReason, WorkerRejection

IMAGE = phantom(96, 80)
PNG = png_bytes(IMAGE)
INFER = "/v2/models/m/infer"


@pytest.fixture()
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture()
def http(tmp_path: Path, queue: FakeQueue):
    with gateway_client(queue, FakeTraining(), model_store=tmp_path / "store") as client:
        yield client


def image_input(binary: bool = True) -> InferInput:
    tensor = InferInput("image", [1], "BYTES")
    return tensor.set_data_from_numpy(np.array([PNG], dtype=np.object_), binary_data=binary)


def pixels_input(pixels: np.ndarray, binary: bool = True) -> InferInput:
    tensor = InferInput("pixels", list(pixels.shape), "FP32")
    return tensor.set_data_from_numpy(pixels.astype(np.float32), binary_data=binary)


def infer(
    http, inputs: list[InferInput], outputs: list[InferRequestedOutput] | None = None, path: str = INFER
):
    """POST what tritonclient would send; the response, and tritonclient's reading of it when 200."""
    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    response = http.post(path, content=body, headers=headers)
    if response.status_code != 200:
        return response, None
    length = response.headers.get("Inference-Header-Content-Length")
    return response, InferResult.from_response_body(response.content, header_length=length and int(length))


def assert_v2_error(response, status: int, code: str) -> str:
    """The protocol's error shape: {"error": "<code>: <detail>"} (plus `domain` for out_of_domain)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "domain"} and body["error"].startswith(f"{code}: "), body
    return body["error"]


# -- health and metadata -----------------------------------------------------------------------------------


def test_health_server_metadata_and_readiness(http, queue):
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").json() == {"ready": True}
    meta = http.get("/v2").json()
    assert meta["name"] == "xrayfm" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    queue.workers_list = []
    assert http.get("/v2/health/ready").status_code == 503


def test_model_metadata_names_the_served_model_and_its_tensors(http):
    for path in ("/v2/models/m", "/v2/models/m/versions/1"):
        meta = http.get(path).json()
        assert meta["name"] == "m" and meta["versions"] == ["1"] and meta["platform"].startswith("xrayfm")
        assert meta["inputs"] == [
            {"name": "image", "datatype": "BYTES", "shape": [1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, -1]},
        ]
        assert meta["outputs"] == [
            {"name": "probabilities", "datatype": "FP32", "shape": [1]},
            {"name": "heatmap", "datatype": "FP32", "shape": [-1, -1]},
        ]
        assert meta["parameters"]["labels"] == MODEL.labels
    assert http.get("/v2/models/m/ready").status_code == 200
    assert http.get("/v2/models/m/versions/1/ready").status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/v2/models/x", "/v2/models/m/versions/2", "/v2/models/x/ready", "/v2/models/m/versions/2/ready", INFER.replace("/m/", "/x/")],
)  # fmt: skip
def test_a_model_or_version_not_served_is_404_in_the_protocols_shape(http, path):
    response = http.post(path, content=b"{}") if path.endswith("infer") else http.get(path)
    assert "served: m version 1" in assert_v2_error(response, 404, "unknown_model")


def test_while_not_ready_the_model_routes_answer_503_with_retry_after(http, queue):
    queue.workers_list = []
    for response in (http.get("/v2/models/m/ready"), infer(http, [image_input()])[0]):
        assert_v2_error(response, 503, "not_ready")
        assert response.headers["Retry-After"] == "5"


def test_a_missing_key_is_401_in_the_protocols_shape(tmp_path):
    with gateway_client(
        FakeQueue(), FakeTraining(), model_store=tmp_path, api_keys=frozenset({"k" * 32})
    ) as http:
        assert_v2_error(http.get("/v2/models/m"), 401, "unauthorized")
        assert_v2_error(infer(http, [image_input()])[0], 401, "unauthorized")
        assert http.get("/v2/models/m", headers={"X-API-Key": "k" * 32}).status_code == 200
        assert http.get("/v2/health/live").status_code == 200  # health and server metadata need no key


def test_openapi_shows_the_v2_bodies(http):
    spec = http.get("/openapi.json").json()
    assert {"/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/ready"} <= set(spec["paths"])
    infer_op = spec["paths"]["/v2/models/{name}/infer"]["post"]
    body = infer_op["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["inputs"]["items"]["properties"]["datatype"]["enum"][-2:] == ["BYTES", "BF16"]
    assert (
        "InferenceResponse" in spec["components"]["schemas"]
        and "ModelMetadata" in spec["components"]["schemas"]
    )


# -- infer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_an_encoded_image_is_answered_with_probabilities_heatmap_and_parameters(http, queue, binary):
    outputs = [InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "heatmap")]
    response, result = infer(http, [image_input()], outputs)  # raw bytes are binary data in tritonclient
    assert response.status_code == 200, response.text
    assert ("Inference-Header-Content-Length" in response.headers) == binary
    np.testing.assert_allclose(result.as_numpy("probabilities"), [0.75])
    heat = result.as_numpy("heatmap")
    assert heat.shape == (4, 4) and heat.dtype == np.float32 and heat[:, :2].min() == 1.0
    answer = result.get_response()
    assert answer["model_name"] == "m" and answer["model_version"] == "1"
    params = answer["parameters"]
    assert params["prediction"] == "Abnormal" and params["probability"] == pytest.approx(0.75)
    assert params["heatmap_input_size"] == 64 and params["heatmap_fit"] == "pad" and params["job_id"]
    [(request, record)] = queue.jobs.values()
    assert request.explain and record["image"] == {"format": "PNG", "width": 80, "height": 96}


def test_base64_bytes_in_plain_json_are_the_file(http):
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(PNG).decode()]}
    response = http.post(INFER, json={"id": "r1", "inputs": [tensor]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and [o["name"] for o in body["outputs"]] == ["probabilities", "heatmap"]
    assert body["outputs"][0] == {"name": "probabilities", "shape": [1], "datatype": "FP32", "data": [0.75]}


@pytest.mark.parametrize("shape", [(96, 80), (1, 96, 80)])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_grey_pixels_reach_the_worker_as_sent(http, queue, shape, binary):
    response, result = infer(http, [pixels_input(IMAGE.reshape(shape), binary)])
    assert response.status_code == 200, response.text
    [job_id] = queue.jobs
    request, record = queue.jobs[job_id]
    np.testing.assert_array_equal(request.image(queue.inputs[job_id][0]), IMAGE)
    assert record["image"] == {"format": "FP32", "width": 80, "height": 96}


def test_fp32_pixels_larger_than_a_json_body_pass(http, queue):
    big = np.tile(IMAGE, (7, 8))  # 672 x 640 float32 = 1.7 MB, over XRAYFM_MAX_JSON_KB; fitted to 512
    response, _ = infer(http, [pixels_input(big)])
    assert response.status_code == 200, response.text
    [(request, record)] = queue.jobs.values()
    assert (request.height, request.width) == (512, 488) and record["image"]["width"] == 640


def test_asking_for_the_probabilities_only_skips_the_heatmap(http, queue):
    response, result = infer(http, [image_input()], [InferRequestedOutput("probabilities")])
    assert response.status_code == 200 and result.as_numpy("heatmap") is None
    [(request, _)] = queue.jobs.values()
    assert not request.explain


def test_an_out_of_domain_image_is_refused_with_the_gates_verdict(http, queue):
    verdict = DomainInfo(
        in_domain=False, score=9.0, threshold=3.0, reasons=[DomainReason(code="features", message="far")]
    )
    refusal = RejectionReason(type="out_of_domain", message="not a chest radiograph", domain=verdict)
    queue.next_state = JobState("done", result=WorkerRejection(error=refusal))
    response, _ = infer(http, [image_input()])
    assert "not a chest radiograph" in assert_v2_error(response, 422, "out_of_domain")
    assert response.json()["domain"]["reasons"] == [{"code": "features", "message": "far"}]


@pytest.mark.parametrize(
    "body, status, code",
    [
        pytest.param({"inputs": []}, 400, "bad_tensor", id="no input"),
        pytest.param({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]}, 400, "bad_tensor", id="unknown input"),
        pytest.param({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "bad_tensor", id="wrong datatype"),
        pytest.param({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, 400, "bad_tensor", id="not base64"),
        pytest.param({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]}, 415, "unsupported_type", id="not an image"),
        pytest.param({"inputs": [{"name": "pixels", "shape": [2, 2, 2], "datatype": "FP32", "data": [0] * 8}]}, 400, "bad_tensor", id="3-D"),
        pytest.param({"inputs": [{"name": "pixels", "shape": [40, 40], "datatype": "FP32", "data": [300.0] * 1600}]}, 400, "bad_tensor", id="over 255"),
        pytest.param({"inputs": [{"name": "pixels", "shape": [40, 40], "datatype": "FP32", "data": [1.0] * 3}]}, 400, "bad_tensor", id="too few values"),
        pytest.param({"inputs": [{"name": "pixels", "shape": [40, 40], "datatype": "FP32", "data": ["a"] * 1600}]}, 400, "bad_tensor", id="strings"),
        pytest.param({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], "outputs": [{"name": "logits"}]}, 400, "bad_tensor", id="unknown output"),
        pytest.param({"input": []}, 400, "bad_request", id="not a request"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused_in_the_protocols_shape(http, queue, body, status, code):
    assert_v2_error(http.post(INFER, json=body), status, code)
    assert not queue.jobs


def test_absurd_dimensions_are_refused_before_reading_the_values(http):
    tensor = {"name": "pixels", "shape": [100_000, 100_000], "datatype": "FP32", "data": [0.0]}
    assert_v2_error(http.post(INFER, json={"inputs": [tensor]}), 422, "image_too_large")


def test_a_wrong_binary_size_or_header_length_is_400(http):
    body, json_size = InferenceServerClient.generate_request_body([image_input()])
    for length in (str(len(body) + 1), "x"):
        assert_v2_error(http.post(INFER, content=body, headers={"Inference-Header-Content-Length": length}), 400, "bad_tensor")  # fmt: skip
    cut = body[:-10]
    headers = {"Inference-Header-Content-Length": str(json_size)}
    assert_v2_error(http.post(INFER, content=cut, headers=headers), 400, "bad_tensor")


def test_an_answer_from_another_version_than_asked_is_503_to_send_again(http, queue):
    """A promotion that takes effect while the request waits: the answer names another version."""
    queue.workers_list = [
        {**READY_WORKER, "hostname": "w2", "model": MODEL.model_copy(update={"version": "2"}).model_dump()}
    ]
    response, _ = infer(http, [image_input()], path="/v2/models/m/versions/2/infer")
    assert "m version 1 answered" in assert_v2_error(response, 503, "model_changed")
    assert response.headers["Retry-After"] == "5"


def test_size_limits_and_compression_are_refused(tmp_path):
    with gateway_client(FakeQueue(), FakeTraining(), model_store=tmp_path, max_upload_bytes=2000) as http:
        body, json_size = InferenceServerClient.generate_request_body(
            [pixels_input(np.tile(IMAGE, (40, 40)))]
        )
        headers = {"Inference-Header-Content-Length": str(json_size)}
        assert_v2_error(http.post(INFER, content=body, headers=headers), 413, "file_too_large")
        packed = {"Content-Encoding": "gzip", **headers}
        assert_v2_error(http.post(INFER, content=b"x", headers=packed), 415, "unsupported_encoding")


# -- through the real stack, with tritonclient.http -----------------------------------------------------------


def test_tritonclient_gets_the_probability_predict_gives(live_stack, client):
    """The done-when: tritonclient.http gets an answer from /v2/models/{name}/infer, and its probability
    matches /predict's for the same image within 1e-4, as an encoded file and as FP32 pixels."""
    image = phantom(120, 90, seed=3)
    predicted = client.post("/predict", files={"file": ("x.png", png_bytes(image))}).json()
    name, version = predicted["model"]["name"], predicted["model"]["version"]
    triton = InferenceServerClient(live_stack.gateway_url.removeprefix("http://"), network_timeout=60.0)
    try:
        assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(name)
        meta = triton.get_model_metadata(name)
        assert meta["versions"] == [version] and meta["parameters"]["labels"] == predicted["model"]["labels"]
        wanted = [InferRequestedOutput("probabilities"), InferRequestedOutput("heatmap")]
        encoded = InferInput("image", [1], "BYTES").set_data_from_numpy(
            np.array([png_bytes(image)], dtype=np.object_)
        )
        pixels = InferInput("pixels", list(image.shape), "FP32").set_data_from_numpy(image.astype(np.float32))
        for inputs, version_asked in (([encoded], ""), ([pixels], version)):
            result = triton.infer(name, inputs, model_version=version_asked, outputs=wanted)
            probabilities = result.as_numpy("probabilities")
            expected = [predicted["probabilities"][label] for label in meta["parameters"]["labels"]]
            np.testing.assert_allclose(probabilities, expected, atol=1e-4)
            assert result.get_response()["parameters"]["prediction"] == predicted["prediction"]
            heat = result.as_numpy("heatmap")
            assert heat.ndim == 2 and 0.0 <= heat.min() <= heat.max() <= 1.0
        with pytest.raises(Exception, match="unknown_model"):
            triton.infer("no-such-model", [encoded])
    finally:
        triton.close()
