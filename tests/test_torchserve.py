"""TorchServe's inference API on a real `kiln serve`: ping, predictions, errors, seed 004."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import requests
from support import KilnServer, build_linear_onnx, write

HANDLERS = """
import time

import kiln


class Echo:
    def predict(self, payload, context):
        if payload == "invalid":
            raise kiln.InvalidInput("'invalid' is not a number; send digits")
        if payload == "crash":
            raise ValueError("the model fell over")
        if payload == "sleep":
            time.sleep(5)
        if payload == "text-out":
            return "plain words"
        if payload == "bytes-out":
            context.set_header("Content-Type", "image/png")
            return b"\\x89PNG-not-really"
        if isinstance(payload, bytes):
            return {"type": "bytes", "size": len(payload), "head": payload[:8].decode("latin-1"),
                    "content_type": context.headers.get("content-type", "")}
        return {"type": type(payload).__name__, "value": payload, "protocol": context.protocol}


class TwoInputs:
    signature = {
        "inputs": [
            {"name": "left", "datatype": "BYTES", "shape": [-1]},
            {"name": "right", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [],
    }

    def predict(self, payload, context):
        items = payload if isinstance(payload, list) else [payload]
        return [item.decode() if isinstance(item, bytes) else item for item in items]
"""

BROKEN = 'raise RuntimeError("the weights are corrupt")\n'

W1 = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
W2 = np.array([[2, 0], [0, 2], [2, 2], [1, 1]], dtype=np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("torchserve-project")
    write(root / "handlers.py", HANDLERS)
    build_linear_onnx(root / "model" / "v1.onnx", W1)
    build_linear_onnx(root / "model" / "v2.onnx", W2)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: echo
  python: {handler: handlers.py:Echo}
  serving:
    response_timeout_s: 1
- kind: api
  name: two-inputs
  python: {handler: handlers.py:TwoInputs}
- kind: api
  name: small
  python: {handler: handlers.py:Echo}
  serving:
    max_request_bytes: 100
- kind: api
  name: linear
  version: "1.0"
  onnx: {model: model/v1.onnx}
- kind: api
  name: linear
  version: "2.0"
  onnx: {model: model/v2.onnx}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def assert_torchserve_error(response: httpx.Response, status: int, type_name: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "type", "message"}
    assert body["code"] == status
    assert body["type"] == type_name
    return body


def test_ping_is_healthy(server: KilnServer) -> None:
    response = server.client.get("/ping")
    assert response.status_code == 200
    assert response.json() == {"status": "Healthy"}


def test_raw_json_text_octet_and_untyped_bodies(server: KilnServer) -> None:
    as_json = server.client.post("/predictions/echo", json={"a": [1, 2]})
    assert as_json.json() == {"type": "dict", "value": {"a": [1, 2]}, "protocol": "torchserve"}
    text = server.client.post(
        "/predictions/echo", content="héllo", headers={"Content-Type": "text/plain"}
    )
    assert text.json() == {"type": "str", "value": "héllo", "protocol": "torchserve"}
    octets = server.client.post(
        "/predictions/echo",
        content=b"\x00\x01abc",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert octets.json()["type"] == "bytes"
    assert octets.json()["size"] == 5
    untyped = server.client.post("/predictions/echo", content=b"\xffraw")
    assert untyped.json()["type"] == "bytes"
    assert untyped.json()["content_type"] == ""
    assert untyped.headers["content-type"] == "application/json"


def test_put_is_accepted_like_curl_upload(server: KilnServer) -> None:
    response = server.client.put("/predictions/echo", content=b"PNGDATA!")
    assert response.status_code == 200
    assert response.json()["head"] == "PNGDATA!"


def test_multipart_gives_all_parts_in_order_to_a_multi_input_model(server: KilnServer) -> None:
    files = [("data", ("a.txt", b"first", "text/plain")), ("data", ("b.bin", b"second", ""))]
    both = server.client.post("/predictions/two-inputs", files=files)
    assert both.json() == ["first", "second"]
    # A single-input API takes the last part, as TorchServe does.
    last = server.client.post("/predictions/echo", files=files)
    assert last.json()["size"] == len(b"second")
    # A plain form field is text.
    field = server.client.post("/predictions/echo", data={"data": "42"}, files={"f": b"x"})
    assert field.json()["size"] == 1


def test_multipart_limits_on_parts_and_fields_are_413_naming_them(server: KilnServer) -> None:
    from kiln.protocols.multipart import MAX_FIELDS, MAX_PARTS

    many = server.client.post("/predictions/echo", files=[("data", b"p")] * MAX_PARTS)
    assert many.json()["size"] == 1
    too_many = server.client.post("/predictions/echo", files=[("data", b"p")] * (MAX_PARTS + 1))
    body = assert_torchserve_error(too_many, 413, "RequestEntityTooLargeException")
    assert f"more than {MAX_PARTS} parts" in body["message"]
    fields = {f"f{i}": "v" for i in range(MAX_FIELDS + 1)}
    too_many_fields = server.client.post("/predictions/echo", data=fields, files={"f": b"x"})
    body = assert_torchserve_error(too_many_fields, 413, "RequestEntityTooLargeException")
    assert f"more than {MAX_FIELDS} plain form fields" in body["message"]


def test_millions_of_parts_are_refused_fast_while_healthz_answers(server: KilnServer) -> None:
    # The finding: a 32 MiB body of 3.7M parts took 54 s to parse on the event loop
    # and stalled /healthz for 17 s. Now it is refused at once, and parsing a large
    # body happens in a thread.
    body = b"--x\r\n\r\n" + b"\r\n--x\r\n\r\n" * 3_700_000 + b"\r\n--x--\r\n"
    assert len(body) <= 32 * 1024 * 1024  # within echo's serving.max_request_bytes
    result: dict = {}

    def upload() -> None:
        started = time.monotonic()
        result["response"] = httpx.post(
            f"{server.url}/predictions/echo",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=x"},
            timeout=60,
        )
        result["seconds"] = time.monotonic() - started

    uploading = threading.Thread(target=upload)
    slowest = 0.0
    with httpx.Client(base_url=server.url, timeout=10) as health:
        uploading.start()
        while uploading.is_alive():
            started = time.monotonic()
            assert health.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.01)
    uploading.join()
    answer = assert_torchserve_error(result["response"], 413, "RequestEntityTooLargeException")
    assert "more than 1000 parts" in answer["message"]
    assert result["seconds"] < 2, result["seconds"]
    assert slowest < 1, slowest


def test_underscore_model_names_map_to_dns_names(server: KilnServer) -> None:
    files = [("data", b"x"), ("data", b"y")]
    response = server.client.post("/predictions/two_inputs", files=files)
    assert response.json() == ["x", "y"]


def test_versions_answer_on_their_own_paths_and_default_is_highest(server: KilnServer) -> None:
    row = [[1, 2, 3, 4]]
    v1 = server.client.post("/predictions/linear/1.0", json=row)
    v2 = server.client.post("/predictions/linear/2.0", json=row)
    assert v1.json() == (np.asarray(row) @ W1).tolist()
    assert v2.json() == (np.asarray(row) @ W2).tolist()
    assert server.client.post("/predictions/linear", json=row).json() == v2.json()


def test_text_and_bytes_answers_keep_their_content_type(server: KilnServer) -> None:
    text = server.client.post("/predictions/echo", json="text-out")
    assert text.headers["content-type"] == "application/json"  # a str answer is a JSON string
    assert text.json() == "plain words"
    image = server.client.post("/predictions/echo", json="bytes-out")
    assert image.headers["content-type"] == "image/png"
    assert image.content == b"\x89PNG-not-really"


def test_unknown_model_and_version_are_404_in_torchserve_shape(server: KilnServer) -> None:
    body = assert_torchserve_error(
        server.client.post("/predictions/nope", json=1), 404, "ModelNotFoundException"
    )
    assert body["message"].startswith("Model not found: nope")
    body = assert_torchserve_error(
        server.client.post("/predictions/linear/9.9", json=[[1, 2, 3, 4]]),
        404,
        "ModelVersionNotFoundException",
    )
    assert "9.9" in body["message"] and "1.0, 2.0" in body["message"]
    assert_torchserve_error(
        server.client.post("/explanations/nope", json=1), 404, "ModelNotFoundException"
    )


def test_errors_map_to_torchserve_exception_names(server: KilnServer) -> None:
    bad = assert_torchserve_error(
        server.client.post("/predictions/echo", json="invalid"), 400, "BadRequestException"
    )
    assert "send digits" in bad["message"]
    crash = assert_torchserve_error(
        server.client.post("/predictions/echo", json="crash"), 500, "InternalServerException"
    )
    assert "the model fell over" in crash["message"]
    assert "Traceback" not in crash["message"]
    wrong = assert_torchserve_error(
        server.client.post("/predictions/linear", json=[[1, 2]]), 400, "BadRequestException"
    )
    assert "expected" in wrong["message"]
    method = server.client.get("/predictions/echo")
    assert_torchserve_error(method, 405, "MethodNotAllowedException")
    assert "POST" in method.headers["allow"]


def test_max_request_bytes_is_413(server: KilnServer) -> None:
    response = server.client.post("/predictions/small", content=b"x" * 101)
    body = assert_torchserve_error(response, 413, "RequestEntityTooLargeException")
    assert "max_request_bytes" in body["message"]
    assert server.client.post("/predictions/small", content=b"x" * 100).status_code == 200


def test_deadline_is_504_request_timeout(server: KilnServer) -> None:
    response = server.client.post("/predictions/echo", json="sleep")
    assert_torchserve_error(response, 504, "RequestTimeoutException")


def test_options_describes_the_model(server: KilnServer) -> None:
    response = server.client.options("/predictions/linear")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"] == "3.0.1"
    assert "/predictions/linear" in doc["paths"]
    assert (
        "multipart/form-data"
        in doc["paths"]["/predictions/linear"]["post"]["requestBody"]["content"]
    )
    assert doc["x-kiln"]["version"] == "2.0"
    assert doc["x-kiln"]["versions"] == ["1.0", "2.0"]
    assert doc["x-kiln"]["signature"]["inputs"][0]["name"] == "x"
    validate = pytest.importorskip("openapi_spec_validator").validate
    validate(doc)
    versioned = server.client.options("/predictions/linear/1.0").json()
    assert versioned["x-kiln"]["version"] == "1.0"
    assert "/predictions/linear/1.0" in versioned["paths"]


def test_request_id_is_echoed(server: KilnServer) -> None:
    response = server.client.post(
        "/predictions/echo", json=1, headers={"X-Request-ID": "trace-123"}
    )
    assert response.headers["x-request-id"] == "trace-123"


def test_failed_model_makes_ping_unhealthy_and_predictions_503(
    tmp_path: Path, serve_project
) -> None:
    write(tmp_path / "broken.py", BROKEN)
    write(tmp_path / "handlers.py", HANDLERS)
    write(
        tmp_path / "kiln.yaml",
        "- kind: api\n  name: broken\n  python: {handler: broken.py}\n"
        "- kind: api\n  name: fine\n  python: {handler: handlers.py:Echo}\n",
    )
    srv = serve_project(tmp_path)
    ping = srv.client.get("/ping")
    assert ping.status_code == 500
    assert ping.json() == {"status": "Unhealthy"}
    response = srv.client.post("/predictions/broken", json=1)
    body = assert_torchserve_error(response, 503, "ServiceUnavailableException")
    assert "the weights are corrupt" in body["message"]
    assert response.headers["retry-after"]
    assert srv.client.post("/predictions/fine", json=1).json()["value"] == 1


# ----- seed 004, verbatim, against examples/torchserve-compat ----------------------------

EXAMPLE = Path(__file__).parents[1] / "examples" / "torchserve-compat"

SEED_COMMANDS = {
    "api_description": "curl -X OPTIONS http://localhost:8080",
    "ping": "curl http://localhost:8080/ping",
    "resnet_upload": "curl http://localhost:8080/predictions/resnet-18 -T kitten_small.jpg",
    "resnet_form": 'curl http://localhost:8080/predictions/resnet-18 -F "data=@kitten_small.jpg"',
    "squeezenet": "curl http://localhost:8080/predictions/squeezenet1_1 "
    "-F 'data=@docs/images/dogs-before.jpg' -F 'data=@docs/images/kitten_small.jpg'",
    "resnet_v2_upload": "curl http://localhost:8080/predictions/resnet-18/2.0 -T kitten_small.jpg",
    "resnet_v2_form": "curl http://localhost:8080/predictions/resnet-18/2.0 "
    '-F "data=@kitten_small.jpg"',
    "mnist_explain": "curl http://127.0.0.1:8080/explanations/mnist "
    "-T examples/image_classifier/mnist/test_data/0.png",
    "v1_predict": 'curl -H "Content-Type: application/json" '
    "--data @kubernetes/kserve/kf_request_json/v1/mnist.json "
    "http://127.0.0.1:8080/v1/models/mnist:predict",
    "v1_explain": 'curl -H "Content-Type: application/json" '
    "--data @kubernetes/kserve/kf_request_json/v1/mnist.json "
    "http://127.0.0.1:8080/v1/models/mnist:explain",
}


def _httpx_equivalent(name: str, base: str, project: Path) -> bytes:
    """What each seed command sends, for machines without curl."""

    def read(path: str) -> bytes:
        return (project / path).read_bytes()

    kitten = read("kitten_small.jpg")
    mnist_json = read("kubernetes/kserve/kf_request_json/v1/mnist.json")
    json_type = {"Content-Type": "application/json"}
    calls = {
        "api_description": lambda: httpx.options(base),
        "ping": lambda: httpx.get(f"{base}/ping"),
        "resnet_upload": lambda: httpx.put(f"{base}/predictions/resnet-18", content=kitten),
        "resnet_form": lambda: httpx.post(
            f"{base}/predictions/resnet-18", files={"data": ("kitten_small.jpg", kitten)}
        ),
        "squeezenet": lambda: httpx.post(
            f"{base}/predictions/squeezenet1_1",
            files=[
                ("data", ("dogs-before.jpg", read("docs/images/dogs-before.jpg"))),
                ("data", ("kitten_small.jpg", read("docs/images/kitten_small.jpg"))),
            ],
        ),
        "resnet_v2_upload": lambda: httpx.put(f"{base}/predictions/resnet-18/2.0", content=kitten),
        "resnet_v2_form": lambda: httpx.post(
            f"{base}/predictions/resnet-18/2.0", files={"data": ("kitten_small.jpg", kitten)}
        ),
        "mnist_explain": lambda: httpx.put(
            f"{base}/explanations/mnist",
            content=read("examples/image_classifier/mnist/test_data/0.png"),
        ),
        "v1_predict": lambda: httpx.post(
            f"{base}/v1/models/mnist:predict", content=mnist_json, headers=json_type
        ),
        "v1_explain": lambda: httpx.post(
            f"{base}/v1/models/mnist:explain", content=mnist_json, headers=json_type
        ),
    }
    return calls[name]().content


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory):
    project = tmp_path_factory.mktemp("ts-example") / "torchserve-compat"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    subprocess.run(
        [sys.executable, "build_models.py"], cwd=project, check=True, capture_output=True
    )
    srv = KilnServer(project, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["curl", "httpx"])
def seed_answers(example: KilnServer, request: pytest.FixtureRequest) -> dict[str, bytes]:
    """Every seed-004 curl command run as written (only the port differs), and its httpx twin."""
    host = example.url.split("//", 1)[1]
    answers = {}
    for name, command in SEED_COMMANDS.items():
        if request.param == "curl":
            if not shutil.which("curl"):
                pytest.skip("curl is not installed; the httpx run covers the same requests")
            line = command.replace("localhost:8080", host).replace("127.0.0.1:8080", host)
            done = subprocess.run(
                ["bash", "-c", line + " --silent --show-error --max-time 30"],
                cwd=example.project,
                capture_output=True,
                check=True,
            )
            answers[name] = done.stdout
        else:
            answers[name] = _httpx_equivalent(name, example.url, example.project)
    return answers


def test_seed_ping_and_api_description(seed_answers: dict[str, bytes]) -> None:
    assert orjson.loads(seed_answers["ping"]) == {"status": "Healthy"}
    assert orjson.loads(seed_answers["api_description"])["openapi"].startswith("3.")


def test_seed_resnet_upload_and_form_agree_and_see_stripes(seed_answers: dict[str, bytes]) -> None:
    upload = orjson.loads(seed_answers["resnet_upload"])
    assert upload == orjson.loads(seed_answers["resnet_form"])
    assert upload == orjson.loads(seed_answers["resnet_v2_upload"])  # 2.0 is the default
    assert upload == orjson.loads(seed_answers["resnet_v2_form"])
    assert next(iter(upload)) == "striped"  # the kitten's tabby coat
    assert upload["striped"] > 0.5
    assert list(upload.values()) == sorted(upload.values(), reverse=True)
    assert len(upload) == 5
    assert abs(sum(upload.values()) - 1) < 1e-3  # top 5 of 6 classes: nearly all the mass


def test_versions_of_the_example_answer_differently(example: KilnServer) -> None:
    kitten = (example.project / "kitten_small.jpg").read_bytes()
    v1 = example.client.put("/predictions/resnet-18/1.0", content=kitten).json()
    v2 = example.client.put("/predictions/resnet-18/2.0", content=kitten).json()
    assert set(v1) == {"striped", "checkered", "dotted", "plain"}
    assert "gradient" in v2 or "speckled" in v2
    assert next(iter(v1)) == next(iter(v2)) == "striped"


def test_seed_squeezenet_answers_each_image_in_order(seed_answers: dict[str, bytes]) -> None:
    dogs, kitten = orjson.loads(seed_answers["squeezenet"])
    assert next(iter(dogs)) == "dotted"  # a dalmatian's spots
    assert next(iter(kitten)) == "striped"


def test_seed_requests_multipart_example_with_httpx(example: KilnServer) -> None:
    # The seed's snippet, with httpx for requests: its dict literal repeats the key
    # 'data', so Python keeps only the last file and the model answers one image.
    with (
        open(example.project / "docs/images/dogs-before.jpg", "rb") as dogs,
        open(example.project / "docs/images/kitten_small.jpg", "rb") as kitten,
    ):
        res = httpx.post(
            f"{example.url}/predictions/squeezenet1_1",
            files={"data": dogs, "data": kitten},  # noqa: F601 - as written in the seed
        )
    answers = res.json()
    assert len(answers) == 1
    assert next(iter(answers[0])) == "striped"


def _mnist_weights(project: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(project / "model" / "mnist.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return weights["W"], weights["b"]


def _pixels(project: Path) -> np.ndarray:
    sys.path.insert(0, str(project / "src"))
    try:
        from images import decode_image, to_gray
    finally:
        sys.path.pop(0)
    png = (project / "examples/image_classifier/mnist/test_data/0.png").read_bytes()
    return to_gray(decode_image(png))


def test_seed_mnist_explanation_is_pixel_times_weight(
    example: KilnServer, seed_answers: dict[str, bytes]
) -> None:
    # TorchServe's shape: the bare nested list of attributions, shaped like the input.
    attributions = np.asarray(orjson.loads(seed_answers["mnist_explain"]))
    assert attributions.shape == (1, 1, 28, 28)
    w, b = _mnist_weights(example.project)
    pixels = _pixels(example.project).ravel()
    logits = pixels @ w + b
    digit = int(np.argmax(logits))
    assert digit == 0
    np.testing.assert_allclose(attributions.ravel(), pixels * w[:, digit], atol=1e-4)
    # The same image through the predictions route says 0.
    png = (example.project / "examples/image_classifier/mnist/test_data/0.png").read_bytes()
    assert example.client.put("/predictions/mnist", content=png).json() == 0


def test_seed_kserve_v1_predict_and_explain(seed_answers: dict[str, bytes]) -> None:
    assert orjson.loads(seed_answers["v1_predict"]) == {"predictions": [2]}
    explained = orjson.loads(seed_answers["v1_explain"])["explanations"]
    assert len(explained) == 1
    attributions = np.asarray(explained[0])  # the instance's bare attribution list
    assert attributions.shape == (1, 1, 28, 28)
    assert attributions.sum() != 0


def test_seed_echo_stream_inference(example: KilnServer) -> None:
    # seed 004's test_echo_stream_inference as written (TorchServe's start/register/
    # unregister calls are `kiln serve` of examples/torchserve-compat here).
    TF_INFERENCE_API = example.url  # noqa: N806 - the seed's name

    # fmt: off
    response = requests.post(TF_INFERENCE_API + '/predictions/echo_stream', data="foo", stream=True)
    assert response.headers['Transfer-Encoding'] == 'chunked'

    prediction = []
    for chunk in (response.iter_content(chunk_size=None)):
        if chunk:
            prediction.append(chunk.decode("utf-8"))

    assert str(" ".join(prediction)) == "hello hello hello hello world "
    # fmt: on
