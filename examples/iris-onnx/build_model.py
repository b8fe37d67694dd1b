"""Train an iris classifier and write it as model/iris.onnx, built by hand.

Why by hand: the graph of a logistic regression is three ONNX nodes, and
writing them with `onnx.helper` shows exactly what Kiln serves, with no
converter (skl2onnx) in between. The script checks that onnxruntime agrees
with scikit-learn on every row before it reports success.

    python build_model.py            # needs scikit-learn, onnx, onnxruntime

Graph: input "input" float32 [N, 4]
       -> MatMul -> Add -> Softmax  -> output "probabilities" float32 [N, 3]
                       \\-> ArgMax  -> output "label" int64 [N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
OUT = HERE / "model" / "iris.onnx"


def build_graph(coef: np.ndarray, intercept: np.ndarray) -> onnx.ModelProto:
    """A logistic regression as ONNX: logits = x @ coef.T + intercept."""
    n_classes, n_features = coef.shape
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["input", "coef_t"], ["scores"]),
            helper.make_node("Add", ["scores", "intercept"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
            # Softmax keeps the order, so the argmax of the logits is the class.
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        name="iris-logistic-regression",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_features])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        initializer=[
            numpy_helper.from_array(coef.T.astype(np.float32), name="coef_t"),
            numpy_helper.from_array(intercept.astype(np.float32), name="intercept"),
        ],
    )
    # Opset 13 and IR version 8 load in every onnxruntime since 1.10.
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="kiln-example"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> int:
    iris = load_iris()
    x, y = iris.data, iris.target
    clf = LogisticRegression(max_iter=1000).fit(x, y)

    OUT.parent.mkdir(exist_ok=True)
    onnx.save(build_graph(clf.coef_, clf.intercept_), OUT)

    session = ort.InferenceSession(str(OUT), providers=["CPUExecutionProvider"])
    probabilities, label = session.run(None, {"input": x.astype(np.float32)})
    expected = clf.predict(x)
    mismatches = int((label != expected).sum())
    print(f"wrote {OUT.relative_to(HERE)}: input [N, 4] -> probabilities [N, 3], label [N]")
    print(f"onnxruntime vs scikit-learn: {len(x) - mismatches}/{len(x)} rows agree")
    print(f"accuracy on the iris data set: {(label == y).mean():.4f}")
    if mismatches or not np.allclose(probabilities, clf.predict_proba(x), atol=1e-4):
        print("error: the ONNX model does not match scikit-learn", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
