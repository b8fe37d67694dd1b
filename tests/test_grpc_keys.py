"""API keys on the gRPC port of a real `kiln server`: the same keys, scopes, views and
quotas as REST, read from `x-api-key` or `authorization: Bearer` metadata."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from daemon import Daemon
from support import write

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

HANDLER = """
import numpy as np


class Twice:
    signature = {
        "inputs": [{"name": "x", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
    }

    def predict(self, payload, context):
        return {"y": np.asarray(payload["x"]) * 2}
"""
CONFIG = "- kind: api\n  name: twice\n  python: {handler: h.py:Twice}\n"


def _tensor() -> list[object]:
    x = grpcclient.InferInput("x", [2], "INT64")
    x.set_data_from_numpy(np.array([1, 5], np.int64))
    return [x]


def test_keys_scopes_views_and_quotas_over_grpc(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home")
    d.start("--unsafe-no-sandbox")
    try:
        made = d.kiln("users", "create", "alice", "-o", "json")
        assert made.returncode == 0, made.stderr
        alice = orjson.loads(made.stdout)["key"]
        write(tmp_path / "alice" / "h.py", HANDLER)
        write(tmp_path / "alice" / "kiln.yaml", CONFIG)
        deployed = d.kiln_env(d.env | {"KILN_API_KEY": alice}, "deploy", str(tmp_path / "alice"))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        made = d.kiln("users", "create", "bob", "-o", "json")
        bob = orjson.loads(made.stdout)["key"]
        address = d.info["grpc"]["address"]
        client = grpcclient.InferenceServerClient(address)

        assert client.is_server_live()  # open, as /v2/health/live is
        with pytest.raises(InferenceServerException) as caught:
            client.infer("alice.twice", _tensor())
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"

        owner = {"x-api-key": alice}
        result = client.infer("alice.twice", _tensor(), headers=owner)
        assert result.as_numpy("y").tolist() == [2, 10]
        bearer = {"authorization": f"Bearer {alice}"}
        assert client.is_model_ready("alice.twice", headers=bearer)

        # Another user's model answers exactly like a missing one.
        with pytest.raises(InferenceServerException) as caught:
            client.infer("alice.twice", _tensor(), headers={"x-api-key": bob})
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert "no model named 'alice.twice'" in caught.value.message()

        # An invoke key cannot unload (manage scope), as on REST.
        invoke = httpx.post(
            f"{d.management_url}/keys",
            json={"scope": "invoke"},
            headers={"x-api-key": alice},
            timeout=30,
        ).json()["key"]
        with pytest.raises(InferenceServerException) as caught:
            client.unload_model("alice.twice", headers={"x-api-key": invoke})
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"

        # A quota of 2 calls: the third is RESOURCE_EXHAUSTED and is not metered.
        limited = httpx.post(
            f"{d.management_url}/keys",
            json={"quota": 2},
            headers={"x-api-key": alice},
            timeout=30,
        ).json()
        codes = []
        for _ in range(3):
            try:
                client.infer("alice.twice", _tensor(), headers={"x-api-key": limited["key"]})
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(exc.status())
        assert codes == ["OK", "OK", "StatusCode.RESOURCE_EXHAUSTED"]
        client.close()

        env = d.env | {"KILN_API_KEY": alice}
        usage = orjson.loads(d.kiln_env(env, "usage", "-o", "json").stdout)["usage"]  # flushes
        by_key = {r["key_id"]: r["by_status"] for r in usage}
        assert by_key[limited["id"]] == {"2xx": 2}, by_key
    finally:
        d.stop()
