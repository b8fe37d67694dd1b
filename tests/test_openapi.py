"""The OpenAPI description of the inference port: generated, valid, complete and truthful."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
from openapi_spec_validator import validate
from support import KilnServer, build_linear_onnx, build_two_input_onnx, write

from kiln.protocols.openapi import ROUTES
from kiln.protocols.openapi_templates import TEMPLATES

ECHO = """
class Model:
    def load(self, model_dir, config):
        self.version = config["version"]

    def predict(self, payload, context):
        return {"version": self.version}
"""

NAMES = {"linear": "/linear", "two": "/team/two", "echo": "/echo"}
VERSIONS = {"echo": ["1", "2"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openapi-project")
    build_linear_onnx(root / "model" / "linear.onnx", np.ones((4, 2), np.float32))
    build_two_input_onnx(root / "model" / "two.onnx")
    write(root / "echo.py", ECHO)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: linear
  onnx: {model: model/linear.onnx}
- kind: api
  name: two
  endpoint: /team/two
  onnx: {model: model/two.onnx}
- kind: api
  name: echo
  version: "1"
  python: {handler: echo.py:Model}
  config: {version: "1"}
- kind: api
  name: echo
  version: "2"
  python: {handler: echo.py:Model}
  config: {version: "2"}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def document(server: KilnServer) -> dict:
    response = server.client.options("/")
    assert response.status_code == 200
    return response.json()


# TorchServe's inference_open_api.json lists these, with the model as a path parameter.
TORCHSERVE_TEMPLATES = {
    ("post", "/predictions/{model_name}"),
    ("post", "/predictions/{model_name}/{model_version}"),
    ("post", "/explanations/{model_name}"),
    ("post", "/v1/models/{model_name}:predict"),
    ("post", "/v1/models/{model_name}:explain"),
    ("post", "/v2/models/{model_name}/infer"),
}


def expected_operations() -> set[tuple[str, str]]:
    """Every route shape of the table made concrete for this project's APIs, and the
    templated paths."""
    found = {(t.method, t.path) for t in TEMPLATES}
    for route in ROUTES:
        if route.scope == "server":
            found.add((route.method, route.template))
        for name, endpoint in NAMES.items():
            if route.scope == "api":
                found.add((route.method, route.template.format(endpoint=endpoint, model=name)))
            if route.scope == "version":
                for version in VERSIONS.get(name, []):
                    found.add((route.method, route.template.format(model=name, version=version)))
    return found


def operations(document: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


def test_options_root_is_a_valid_openapi_3_document(document: dict) -> None:
    assert document["openapi"] == "3.0.1"
    validate(document)  # raises on any violation of the OpenAPI 3.0 schema


def test_every_name_for_the_document_returns_the_same_paths(
    server: KilnServer, document: dict
) -> None:
    for path in ("/api-description", "/openapi.json"):
        response = server.client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json()["paths"] == document["paths"]
    assert document["servers"] == [{"url": server.url}]


def test_document_lists_every_served_route_once_per_api(document: dict) -> None:
    listed = operations(document)
    expected = expected_operations()
    assert expected - listed == set(), "routes served but not documented"
    assert listed - expected == set(), "routes documented but not in the route table"
    # One concrete path per API and per version; no templated paths.
    assert ("post", "/predictions/linear") in listed
    assert ("post", "/predictions/echo/2") in listed
    assert ("post", "/team/two") in listed
    assert ("post", "/v1/models/two:predict") in listed
    assert ("post", "/v2/models/echo/versions/1/infer") in listed
    assert ("post", "/team/two/explain") in listed
    # Templated paths: TorchServe's, and no others.
    templated = {(method, path) for method, path in listed if "{" in path}
    assert TORCHSERVE_TEMPLATES <= templated
    assert templated == {(t.method, t.path) for t in TEMPLATES}


def test_templated_paths_are_described_as_torchserve_does(document: dict) -> None:
    paths = document["paths"]
    predict = paths["/predictions/{model_name}"]["post"]
    assert predict["operationId"] == "predictions"
    assert [(p["in"], p["name"], p["required"]) for p in predict["parameters"]] == [
        ("path", "model_name", True)
    ]
    assert "*/*" in predict["requestBody"]["content"]
    assert predict["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/TorchServeError"
    )
    versioned = paths["/predictions/{model_name}/{model_version}"]["post"]
    assert versioned["operationId"] == "version_predictions"
    assert [p["name"] for p in versioned["parameters"]] == ["model_name", "model_version"]
    explain = paths["/explanations/{model_name}"]["post"]
    formats = {p["name"]: p for p in explain["parameters"]}["format"]
    assert formats["schema"]["enum"] == ["torchserve", "kiln"]
    assert "501" in explain["responses"]
    v1 = paths["/v1/models/{model_name}:predict"]["post"]
    assert v1["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/KServeError"
    )
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_templated_paths_answer_for_every_model(server: KilnServer, document: dict) -> None:
    # What a client generated from the templates sends: the names filled in.
    for path, item in document["paths"].items():
        if "{model_name}" not in path:
            continue
        for method in item:
            url = path.replace("{model_name}", "echo").replace("{model_version}", "2")
            body = {"instances": [{}]} if path.startswith("/v1/") else {}
            response = server.client.request(method.upper(), url, json=body)
            assert response.status_code not in (404, 405), (method, path, response.text)
            assert response.status_code < 500 or response.status_code == 501
    assert server.client.post("/predictions/echo/1", json={}).json() == {"version": "1"}
    assert server.client.post("/predictions/echo", json={}).json() == {"version": "2"}
    v1 = server.client.post("/v1/models/echo:predict", json={"instances": [{}]}).json()
    assert v1 == {"predictions": [{"version": "2"}]}


def test_every_documented_operation_is_really_served(server: KilnServer, document: dict) -> None:
    client = httpx.Client(base_url=server.url, timeout=30)
    items = sorted(operations(document), key=lambda op: ("unload" in op[1], op[1]))
    for method, path in items:
        op = document["paths"][path][method]
        if "{" in path:
            continue  # templated: test_templated_paths_answer_for_every_model
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        kwargs = {"json": body["example"]} if body is not None else {}
        response = client.request(method.upper(), path, **kwargs)
        assert response.status_code not in (404, 405), (method, path, response.text)
        assert "no API is served at" not in response.text
        assert response.status_code < 500 or response.status_code == 501, (
            method,
            path,
            response.text,
        )
    # The unloads above (sent last) are undone, and the models answer again.
    for name in NAMES:
        assert client.post(f"/v2/repository/models/{name}/load").status_code == 200
    assert client.post("/linear", json=[[1, 1, 1, 1]]).json() == [[4.0, 4.0]]
    assert client.post("/echo", json={}).json() == {"version": "2"}


def test_request_schemas_carry_the_real_input_names_and_types(document: dict) -> None:
    paths = document["paths"]
    two = paths["/predictions/two"]["post"]["requestBody"]["content"]["application/json"]
    props = two["schema"]["properties"]
    assert set(props) == {"a", "b", "idx"}
    assert props["a"]["items"]["items"]["type"] == "number"
    assert props["idx"]["items"]["items"]["type"] == "integer"
    assert "shape [N, 3]" in props["a"]["description"]
    assert "shape [N, 2]" in props["idx"]["description"]
    assert set(two["example"]) == {"a", "b", "idx"}
    assert "multipart/form-data" in paths["/predictions/two"]["post"]["requestBody"]["content"]

    native = paths["/team/two"]["post"]["requestBody"]["content"]["application/json"]
    assert set(native["schema"]["properties"]) == {"a", "b", "idx"}

    v2 = paths["/v2/models/linear/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert v2["schema"]["properties"]["inputs"]["items"]["properties"]["name"]["enum"] == ["x"]
    assert v2["example"]["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 0.0, 0.0, 0.0]}
    ]
    v1 = paths["/v1/models/linear:predict"]["post"]["requestBody"]["content"]["application/json"]
    assert v1["example"] == {"instances": [[0.0, 0.0, 0.0, 0.0]]}

    version_param = {p["name"]: p for p in paths["/echo"]["post"]["parameters"]}["version"]
    assert version_param["schema"]["enum"] == ["1", "2"]
    error = paths["/predictions/linear"]["post"]["responses"]["404"]
    assert error["content"]["application/json"]["schema"]["$ref"].endswith("/TorchServeError")


def test_examples_in_the_document_predict(server: KilnServer, document: dict) -> None:
    op = document["paths"]["/predictions/two"]["post"]
    example = op["requestBody"]["content"]["application/json"]["example"]
    example["a"] = [[1, 2, 3]]
    example["idx"] = [[4, 5]]
    response = server.client.post("/predictions/two", json=example)
    assert response.status_code == 200, response.text
    v2 = document["paths"]["/v2/models/linear/infer"]["post"]
    body = v2["requestBody"]["content"]["application/json"]["example"]
    body["inputs"][0]["data"] = [1, 2, 3, 4]
    answer = server.client.post("/v2/models/linear/infer", json=body).json()
    assert answer["outputs"][0]["data"] == [10.0, 10.0]


def test_docs_page_is_self_contained_html_with_every_path(
    server: KilnServer, document: dict
) -> None:
    response = server.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert "<script" not in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?https?://", page)
    for path in document["paths"]:
        assert f"<code>{path}</code>" in page.replace("&#x27;", "'")
    assert f"curl -X POST {server.url}/predictions/linear -H" in page


def test_document_routes_answer_405_to_other_methods(server: KilnServer) -> None:
    response = server.client.post("/openapi.json")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "MethodNotAllowed"
    assert server.client.get("/").json()["apis"]  # GET / is still the server's list
