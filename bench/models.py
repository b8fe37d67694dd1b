"""The benchmark models, built with the `onnx` package (opset 17, IR version 8).

  tiny.onnx  x FP32 [N, 16] -> MatMul 16x4 + Add -> y [N, 4]      (the model costs ~nothing:
                                                                    measures the serving path)
  mlp.onnx   x FP32 [N, 256] -> 1024 Relu -> 1024 Relu -> y [N, 10] (~1.3M MACs a row: batching
                                                                    pays off)

Random weights from a fixed seed, so every run serves the same models.
Run: .venv/bin/python bench/models.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SEED = 1234
FEATURES = {"tiny": 16, "mlp": 256}
OUTPUTS = {"tiny": 4, "mlp": 10}


def _save(path: Path, nodes, inits, features: int, outputs: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])
    graph = helper.make_graph(nodes, path.stem, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def build_tiny(path: Path) -> Path:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(SEED)
    w = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["y"]),
    ]
    _save(path, nodes, [w, b], 16, 4)
    return path


def build_mlp(path: Path) -> Path:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(SEED + 1)
    sizes = [256, 1024, 1024, 10]
    inits, nodes = [], []
    current = "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        scale = np.float32(1.0 / np.sqrt(n_in))
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((n_in, n_out)) * scale).astype(np.float32), f"W{i}"
            )
        )
        inits.append(numpy_helper.from_array(np.zeros(n_out, np.float32), f"B{i}"))
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], ["y" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
            current = f"h{i}"
    _save(path, nodes, inits, 256, 10)
    return path


def build_all(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"tiny": build_tiny(folder / "tiny.onnx"), "mlp": build_mlp(folder / "mlp.onnx")}


def sample_input(name: str, rows: int = 1) -> np.ndarray:
    """A fixed input (values rounded to 4 decimals, as a client would send them)."""
    rng = np.random.default_rng(SEED + 2)
    return np.round(rng.standard_normal((rows, FEATURES[name])), 4).astype(np.float32)


def sample_body(name: str) -> bytes:
    """One instance as a client sends it: a JSON list of numbers with 4 decimals."""
    import orjson

    return orjson.dumps([round(float(v), 4) for v in sample_input(name)[0]])


def v1_body(name: str) -> bytes:
    """The same instance as a KServe V1 request (`/v1/models/<m>:predict`)."""
    import orjson

    return orjson.dumps({"instances": [[round(float(v), 4) for v in sample_input(name)[0]]]})


def v2_body(name: str) -> bytes:
    """The same instance as an Open Inference Protocol (V2) request."""
    import orjson

    data = [round(float(v), 4) for v in sample_input(name)[0]]
    tensor = {"name": "x", "shape": [1, len(data)], "datatype": "FP32", "data": data}
    return orjson.dumps({"inputs": [tensor]})


def session(path: Path):
    """An onnxruntime session on one thread, the way a single worker runs it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    for name, path in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else ".")).items():
        print(f"{name}: {path}")
