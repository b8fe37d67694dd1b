"""Regenerate model/model.onnx, the small model this project ships with.

It is a logistic regression for iris flowers written as an ONNX graph:
input "input" float32 [N, 4] -> MatMul -> Add -> Softmax -> output
"probabilities" float32 [N, 3]. You only need this script to see how the file
was made; replace model/model.onnx with your own model (exported from
PyTorch, TensorFlow, scikit-learn, ...) and delete this file.

    pip install onnx
    python build_model.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Fitted on scikit-learn's iris data set (features: sepal length, sepal
# width, petal length, petal width in cm; classes: setosa, versicolor,
# virginica), rounded to 4 digits.
COEF = np.array(
    [
        [-0.4242, 0.9663, -2.516, -1.0821],
        [0.5346, -0.3204, -0.207, -0.9432],
        [-0.1105, -0.6459, 2.7231, 2.0253],
    ],
    dtype=np.float32,
)
INTERCEPT = np.array([9.8553, 2.2342, -12.0895], dtype=np.float32)


def build() -> onnx.ModelProto:
    """The graph, with a dynamic batch dimension "N"."""
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["input", "weights"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        name="linear-classifier",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(COEF.T.copy(), name="weights"),
            numpy_helper.from_array(INTERCEPT, name="bias"),
        ],
    )
    # Opset 13 and IR version 8 load in every onnxruntime since 1.10.
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="kiln-init"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    out = Path(__file__).resolve().parent / "model" / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    onnx.save(build(), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
