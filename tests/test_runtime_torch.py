"""PyTorch served end to end: TorchScript, torch.export, eager through a handler, pickles.

Every model is built here from one small module with fixed weights, and each
answer is compared with the same module run in-process.
"""

from __future__ import annotations

import importlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support import KilnServer, write

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

NET_PY = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.linear(x)) * 2
"""

SIGNATURE = """
    signature:
      inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
      outputs: [{name: scores, datatype: FP32, shape: [-1, 3]}]
"""

ROWS = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, -8.0], [0.0, 0.0, 0.0, 0.0]]


def build(root: Path) -> object:
    """netdef.py (the model's code), and every serialised form of one Net."""
    write(root / "netdef.py", NET_PY)
    sys.path.insert(0, str(root))
    try:
        netdef = importlib.import_module("netdef")
        torch.manual_seed(7)
        net = netdef.Net().eval()
        (root / "model").mkdir()
        torch.jit.script(net).save(str(root / "model" / "net.ts"))
        batch = torch.export.Dim("batch")
        program = torch.export.export(net, (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, str(root / "model" / "net.pt2"))
        torch.save(net.state_dict(), root / "model" / "weights.pt")
        torch.save(net, root / "model" / "full.pt")  # a whole-module pickle
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("netdef", None)
    return net


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("torch-project")
    net = build(root)
    write(
        root / "kiln.yaml",
        f"""
- kind: api
  name: scripted
  torch:
    model: model/net.ts
{SIGNATURE}
- kind: api
  name: scripted-plain
  torch:
    model: model/net.ts
- kind: api
  name: exported
  torch:
    model: model/net.pt2
  batching:
    max_batch_size: 8
    max_batch_delay_ms: 20
- kind: api
  name: eager
  torch:
    model: model/weights.pt
    handler: netdef.py:Net
{SIGNATURE}
- kind: api
  name: pickled
  torch:
    model: model/full.pt
- kind: api
  name: pickled-trusted
  torch:
    model: model/full.pt
    trusted: true
{SIGNATURE}
- kind: api
  name: weights-alone
  torch:
    model: model/weights.pt
""",
    )
    return root, net


@pytest.fixture(scope="module")
def server(project, tmp_path_factory: pytest.TempPathFactory):
    srv = KilnServer(project[0], tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def expected(net: object, rows: list) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor(rows, dtype=torch.float32)).numpy()


@pytest.mark.parametrize("api", ["scripted", "scripted-plain", "exported", "eager"])
def test_native_route_equals_torch_in_process(server: KilnServer, project, api: str) -> None:
    response = server.client.post(f"/{api}", json=ROWS)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json(), expected(project[1], ROWS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", ["scripted", "exported", "eager", "pickled-trusted"])
def test_v2_infer_equals_torch_in_process(server: KilnServer, project, api: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": ROWS}]}
    response = server.client.post(f"/v2/models/{api}/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["datatype"] == "FP32" and output["shape"] == [3, 3]
    np.testing.assert_allclose(
        np.reshape(output["data"], (3, 3)), expected(project[1], ROWS), rtol=1e-5, atol=1e-6
    )


def test_one_instance_without_a_batch_axis(server: KilnServer, project) -> None:
    for api in ("scripted", "exported"):
        response = server.client.post(f"/{api}", json=ROWS[0])
        np.testing.assert_allclose(response.json(), expected(project[1], ROWS)[0], rtol=1e-5)


def test_export_metadata_comes_from_the_program(server: KilnServer) -> None:
    body = server.client.get("/v2/models/exported").json()
    assert body["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert body["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]


def test_torchscript_metadata_from_the_config_or_the_forward_names(server: KilnServer) -> None:
    declared = server.client.get("/v2/models/scripted").json()
    assert declared["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert declared["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}]
    plain = server.client.get("/v2/models/scripted-plain").json()
    assert plain["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1]}]  # any shape


def test_wrong_width_is_a_400(server: KilnServer) -> None:
    declared = server.client.post("/scripted", json=[[1, 2, 3]])
    assert declared.status_code == 400
    assert "expected [N, 4]" in declared.json()["error"]["message"]
    exported = server.client.post("/exported", json=[[1, 2, 3]])
    assert exported.status_code == 400
    undeclared = server.client.post("/scripted-plain", json=[[1, 2, 3]])
    assert undeclared.status_code == 400
    assert "the model rejected the input" in undeclared.json()["error"]["message"]


def test_batched_requests_each_get_their_own_rows(server: KilnServer, project) -> None:
    rows = [[float(i), 1.0, -1.0, 0.5 * i] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: server.client.post("/exported", json=[r]).json(), rows))
    np.testing.assert_allclose(
        np.concatenate(answers), expected(project[1], rows), rtol=1e-5, atol=1e-6
    )


def test_full_pickle_is_refused_with_how_and_why(server: KilnServer) -> None:
    response = server.client.post("/pickled", json=ROWS)
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "full pickle" in message and "netdef.Net" in message
    assert "runs whatever code the file contains" in message
    assert "add 'trusted: true' to the torch block" in message


def test_full_pickle_loads_when_trusted(server: KilnServer, project) -> None:
    response = server.client.post("/pickled-trusted", json=ROWS)
    assert response.status_code == 200
    np.testing.assert_allclose(response.json(), expected(project[1], ROWS), rtol=1e-5, atol=1e-6)


def test_weights_without_code_say_to_name_the_class(server: KilnServer) -> None:
    message = server.client.post("/weights-alone", json=ROWS).json()["error"]["message"]
    assert "holds only weights" in message and "torch.handler" in message


def test_gpu_asked_without_cuda_is_a_clear_load_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from kiln.runtimes.base import ModelLoadError
    from kiln.runtimes.torch import select_device
    from kiln.serving.types import WorkerSpec

    with pytest.raises(ModelLoadError, match="compute.gpu: 1.*no CUDA GPU.*compute.gpu: 0"):
        select_device(WorkerSpec(api="a", version=None, runtime="torch", gpu=1))
    assert select_device(WorkerSpec(api="a", version=None, runtime="torch")).type == "cpu"
