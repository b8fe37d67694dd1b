"""Python handlers, request hooks, debug stages and the worker boundary, end to end."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support import KilnServer, build_linear_onnx, write

CLASS_HANDLER = """
import os

import kiln


class Model:
    def load(self, model_dir, config):
        with open(os.path.join(model_dir, "scale.txt")) as f:
            self.scale = float(f.read())
        self.offset = config["offset"]

    def predict(self, payload, context):
        if payload == "boom":
            raise ValueError("the model cannot read 'boom'")
        if payload == "bad":
            raise kiln.InvalidInput("send numbers, not 'bad'")
        if isinstance(payload, dict) and "sleep" in payload:
            import time
            time.sleep(payload["sleep"])
            return {"slept": payload["sleep"], "pid": os.getpid()}
        if payload == "created":
            context.set_status(201)
            context.set_header("X-Model", "scaled")
            return {"created": True}
        if payload == "bytes":
            return b"\\x00\\x01raw"
        if payload == "pid":
            return os.getpid()
        with open(os.environ["COUNTER_FILE"], "a") as f:
            f.write("x")
        return {
            "result": [v * self.scale + self.offset for v in payload],
            "request_id": context.request_id,
            "api": context.api,
            "metadata": context.metadata,
        }
"""

HUB_HANDLER = """
import os

import kiln

MODEL_DIR = os.getenv("MODEL_DIR")
with open(os.path.join(MODEL_DIR, "vocab.txt")) as f:
    VOCAB = f.read().split()


@kiln.handler
def inference_handler(inputs, _):
    words = inputs if isinstance(inputs, list) else [inputs]
    return [[w, VOCAB.index(w) if w in VOCAB else -1] for w in words]
"""

CORTEX_PREDICTOR = """
class PythonPredictor:
    def __init__(self, config):
        self.greeting = config["greeting"]

    def predict(self, payload, query_params):
        return f"{self.greeting}, {payload['name']}{query_params.get('punct', '')}"
"""

HOOKS = """
def pre_inference(sample, signature, metadata):
    assert signature[0].name == "x"
    return {signature[0].name: [v * metadata["factor"] for v in sample["values"]]}


def post_inference(prediction, signature, metadata):
    scores = prediction[0][0]
    return {"scores": scores.tolist(), "label": metadata["labels"][int(scores.argmax())]}
"""

SEED_ERA_HOOKS = """
def pre_inference(sample, metadata):
    # Cortex's iris example: the second argument is the model's input description.
    return {metadata[0].name: [sample["a"], sample["b"], sample["c"], sample["d"]]}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("py-project")
    write(root / "model" / "scale.txt", "2.5")
    write(root / "vocab" / "vocab.txt", "alpha beta gamma")
    write(root / "src" / "model.py", CLASS_HANDLER)
    write(root / "src" / "hub.py", HUB_HANDLER)
    write(root / "predictor.py", CORTEX_PREDICTOR)
    write(root / "hooks.py", HOOKS)
    write(root / "seed_hooks.py", SEED_ERA_HOOKS)
    build_linear_onnx(root / "model" / "linear.onnx", np.eye(4, 2, dtype=np.float32))
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: scaler
  python:
    handler: src/model.py:Model
    model: model
  config: {offset: 1}
  metadata: {team: search}
  serving:
    max_request_bytes: 512
    response_timeout_s: 20
- kind: api
  name: words
  python:
    handler: src/hub.py
    model: vocab
- kind: api
  name: hub-envelope
  python:
    handler: src/hub.py
    model: vocab
  response_envelope: hub
- kind: api
  name: greeter
  predictor:
    type: python
    path: predictor.py
    config: {greeting: Hello}
- kind: api
  name: hooked
  onnx:
    model: model/linear.onnx
    request_handler: hooks.py
  metadata: {factor: 2, labels: [first, second]}
- kind: api
  name: seed-era
  onnx:
    model: model/linear.onnx
    request_handler: seed_hooks.py
""",
    )
    return root


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory):
    counter = tmp_path_factory.mktemp("counter") / "calls"
    counter.write_text("")
    srv = KilnServer(project, tmp_path_factory.mktemp("home"), env={"COUNTER_FILE": str(counter)})
    srv.counter = counter
    yield srv
    srv.stop()


def test_class_handler_loads_model_dir_and_config(server: KilnServer) -> None:
    response = server.client.post("/scaler", json=[1, 2], headers={"X-Request-ID": "rid-7"})
    assert response.status_code == 200
    assert response.json() == {
        "result": [3.5, 6.0],
        "request_id": "rid-7",
        "api": "scaler",
        "metadata": {"team": "search"},
    }


def test_context_sets_status_and_headers_and_bytes_pass_through(server: KilnServer) -> None:
    created = server.client.post("/scaler", json="created")
    assert created.status_code == 201 and created.headers["x-model"] == "scaled"
    raw = server.client.post("/scaler", json="bytes")
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.content == b"\x00\x01raw"


def test_hub_style_function_loads_at_module_level_from_model_dir(server: KilnServer) -> None:
    assert server.client.post("/words", json="beta").json() == [["beta", 1]]
    assert server.client.post("/words", json=["gamma", "zeta"]).json() == [
        ["gamma", 2],
        ["zeta", -1],
    ]
    assert server.client.get("/words").json()["status"] == "ready"


def test_hub_response_envelope(server: KilnServer) -> None:
    body = server.client.post("/hub-envelope", json="alpha").json()
    assert body == {"statusCode": 200, "body": {"output": [["alpha", 0]]}}


def test_cortex_python_predictor_gets_config_and_query_params(server: KilnServer) -> None:
    response = server.client.post("/greeter?punct=!", json={"name": "Ada"})
    assert response.json() == "Hello, Ada!"


def test_pre_and_post_inference_run_in_order(server: KilnServer) -> None:
    response = server.client.post("/hooked", json={"values": [1, 2, 3, 4]})
    # pre doubles the values; the model keeps the first two; post labels the argmax.
    assert response.json() == {"scores": [2.0, 4.0], "label": "second"}


def test_seed_era_two_argument_hook_receives_the_input_description(server: KilnServer) -> None:
    response = server.client.post("/seed-era", json={"a": 5, "b": 7, "c": 0, "d": 0})
    assert response.json() == [5.0, 7.0]


def test_debug_logs_the_four_stages_in_order(server: KilnServer) -> None:
    server.client.post(
        "/hooked?debug=true", json={"values": [1, 0, 0, 0]}, headers={"X-Request-ID": "dbg-1"}
    )
    server.client.post(
        "/hooked", json={"values": [1, 0, 0, 0]}, headers={"X-Request-ID": "nodbg-1"}
    )
    records = server.api_log(
        "hooked",
        until=lambda rs: (
            any(r.get("request_id") == "nodbg-1" for r in rs)
            and sum(r.get("request_id") == "dbg-1" for r in rs) >= 5
        ),
    )
    stages = [r for r in records if r.get("event") == "debug" and r["request_id"] == "dbg-1"]
    assert [s["stage"] for s in stages] == [
        "raw sample",
        "after pre_inference",
        "after inference",
        "after post_inference",
    ]
    assert '"values":[1,0,0,0]' in stages[0]["value"]
    assert '"x":[2,0,0,0]' in stages[1]["value"]
    assert "shape=[1, 2]" in stages[2]["value"]
    assert '"label":"first"' in stages[3]["value"]
    assert not [r for r in records if r.get("event") == "debug" and r["request_id"] == "nodbg-1"]


def test_handler_exception_is_500_with_message_and_no_traceback(server: KilnServer) -> None:
    response = server.client.post("/scaler", json="boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    body = response.json()
    assert body == {
        "error": {"type": "InferenceError", "message": "ValueError: the model cannot read 'boom'"},
        "request_id": "boom-1",
    }
    assert "Traceback" not in response.text
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        logged = [r.get("message", "") for r in server.api_log("scaler")]
        if any("Traceback" in m for m in logged):
            break
        time.sleep(0.05)
    assert any("Traceback" in m for m in logged), "the traceback belongs in the API's log"


def test_handler_declared_bad_input_is_400(server: KilnServer) -> None:
    response = server.client.post("/scaler", json="bad")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "InvalidInput",
        "message": "send numbers, not 'bad'",
    }


def test_oversized_body_is_413_and_never_reaches_the_worker(server: KilnServer) -> None:
    before = server.counter.read_text()
    response = server.client.post("/scaler", json=list(range(400)))
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "PayloadTooLarge"
    assert "512 bytes" in response.json()["error"]["message"]
    chunked = server.client.post("/scaler", content=iter([b"[" + b"1," * 300, b"1]"]))
    assert chunked.status_code == 413
    assert server.counter.read_text() == before
    assert server.client.post("/scaler", json=[1]).status_code == 200
    assert server.counter.read_text() == before + "x"


def test_worker_killed_mid_request_gives_503_then_serves_again(server: KilnServer) -> None:
    old_pid = server.client.post("/scaler", json="pid").json()
    results: dict[str, object] = {}

    def slow_call() -> None:
        results["response"] = server.client.post("/scaler", json={"sleep": 10})

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.5)
    os.kill(old_pid, signal.SIGKILL)
    thread.join(15)
    response = results["response"]
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "Unavailable"
    assert "SIGKILL" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "1"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        again = server.client.post("/scaler", json=[2])
        if again.status_code == 200:
            break
        time.sleep(0.1)
    assert again.json()["result"] == [6.0]
    new_pid = server.client.post("/scaler", json="pid").json()
    assert new_pid != old_pid
    assert server.proc.poll() is None, "the server must survive its worker"
