"""Build this example's models and sample files: numpy, onnx and scikit-learn's bundled digits.

    python build_models.py

Writes (nothing is downloaded; the same inputs give the same files):
  model/textures-v1.onnx, model/textures-v2.onnx   resnet-18 1.0 / 2.0, squeezenet1_1
  model/mnist.onnx                                  mnist
  kitten_small.jpg, docs/images/kitten_small.jpg,   the images the seed's curl commands
  docs/images/dogs-before.jpg,                      send (PNG data under the seed's file
  examples/image_classifier/mnist/test_data/0.png   names: see README.md)
  kubernetes/kserve/kf_request_json/v1/mnist.json   a KServe V1 request with one digit
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))

from images import decode_image, encode_png, resize  # noqa: E402
from textures import FEATURES, LABELS_V1, LABELS_V2, features, render  # noqa: E402

MODEL = HERE / "model"


def softmax_regression(
    x: np.ndarray, y: np.ndarray, classes: int, steps: int, l2: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent with Adam.

    Inputs are standardised while training; the scaling is folded back into
    the weights, so the model takes raw features.
    """
    rng = np.random.default_rng(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-3
    z = (x - mean) / std
    w = rng.normal(0, 0.01, (x.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    for step in range(1, steps + 1):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(z)
        gw, gb = z.T @ grad + l2 * w, grad.sum(axis=0)
        for i, (param, g) in enumerate(((w, gw), (b, gb))):
            m, v = moments[2 * i], moments[2 * i + 1]
            m[:] = 0.9 * m + 0.1 * g
            v[:] = 0.999 * v + 0.001 * g * g
            param -= 0.05 * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return (w / std[:, None]).astype(np.float32), (b - (mean / std) @ w).astype(np.float32)


def save_linear_onnx(
    path: Path, w: np.ndarray, b: np.ndarray, input_name: str, input_shape: list, softmax: bool
) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    source = input_name
    if len(input_shape) > 2:
        nodes.append(helper.make_node("Flatten", [input_name], ["flat"], axis=1))
        source = "flat"
    output = "probabilities" if softmax else "logits"
    nodes.append(helper.make_node("Gemm", [source, "W", "b"], ["scores" if softmax else output]))
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], [output], axis=1))
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def predict(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x @ w + b).argmax(axis=1)


# ----- textures (resnet-18, squeezenet1_1) ----------------------------------------------


def texture_set(labels: list[str], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for index, kind in enumerate(labels):
        for _ in range(per_class):
            height, width = rng.integers(28, 97, 2)
            rows.append(features(render(kind, rng, int(height), int(width))))
            targets.append(index)
    return np.asarray(rows), np.asarray(targets)


def kitten() -> np.ndarray:
    """An orange tabby's coat: wavy dark stripes on orange, 64x64."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:64, 0:64] / 64.0
    wave = x + 0.03 * np.sin(2 * np.pi * y * 2)
    mask = (wave * 6) % 1.0 < 0.45
    image = np.where(mask[..., None], [92, 52, 24], [232, 146, 58]).astype(np.float64)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def dalmatian() -> np.ndarray:
    """A dalmatian's coat: black spots on white, 80 wide, 60 high."""
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:60, 0:80].astype(np.float64)
    image = np.full((60, 80, 3), 245.0)
    for cy in range(5, 60, 12):
        for cx in range(5, 80, 12):
            oy, ox = rng.uniform(-2, 2, 2)
            spot = (y - cy - oy) ** 2 + (x - cx - ox) ** 2 < rng.uniform(7, 12)
            image[spot] = [25, 25, 25]
    return np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def build_textures() -> None:
    checks = {"kitten": (kitten(), "striped"), "dalmatian": (dalmatian(), "dotted")}
    for version, labels, seed in (("v1", LABELS_V1, 1), ("v2", LABELS_V2, 2)):
        x, y = texture_set(labels, 220, seed)
        test_x, test_y = texture_set(labels, 60, seed + 100)
        w, b = softmax_regression(x, y, len(labels), steps=300, l2=1e-3, seed=seed)
        accuracy = float((predict(w, b, test_x) == test_y).mean())
        print(f"textures-{version}: {len(labels)} classes, held-out accuracy {accuracy:.3f}")
        for name, (image, expected) in checks.items():
            got = labels[int(predict(w, b, features(image)[None, :])[0])]
            assert got == expected, f"textures-{version} calls the {name} image {got!r}"
        save_linear_onnx(
            MODEL / f"textures-{version}.onnx", w, b, "features", ["N", FEATURES], True
        )


# ----- digits (mnist) -------------------------------------------------------------------


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, smoothed up to MNIST's 28x28 (20x20 digit, centred)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.zeros((len(digits.images), 28, 28), np.float32)
    for i, small in enumerate(digits.images):
        images[i, 4:24, 4:24] = resize(small.astype(np.float32) / 16.0, 20, 20)
    return np.clip(images, 0, 1), digits.target


def build_mnist() -> tuple[np.ndarray, np.ndarray]:
    images, targets = digits_28()
    flat = images.reshape(len(images), -1)
    order = np.random.default_rng(3).permutation(len(flat))
    train, test = order[:1500], order[1500:]
    w, b = softmax_regression(flat[train], targets[train], 10, steps=300, l2=1e-2, seed=3)
    accuracy = float((predict(w, b, flat[test]) == targets[test]).mean())
    print(f"mnist: held-out accuracy {accuracy:.3f}")
    save_linear_onnx(MODEL / "mnist.onnx", w, b, "image", ["N", 1, 28, 28], softmax=False)
    return images, targets


def sample_digit(images: np.ndarray, targets: np.ndarray, digit: int) -> bytes:
    """The first image of `digit` as a PNG (gray, white on black)."""
    index = int(np.flatnonzero(targets == digit)[0])
    return encode_png(np.round(images[index] * 255).astype(np.uint8))


def write(path: Path, data: bytes) -> None:
    path = HERE / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main() -> None:
    build_textures()
    images, targets = build_mnist()
    kitten_png = encode_png(kitten())
    for path in ("kitten_small.jpg", "docs/images/kitten_small.jpg"):
        write(Path(path), kitten_png)
    write(Path("docs/images/dogs-before.jpg"), encode_png(dalmatian()))
    zero = sample_digit(images, targets, 0)
    assert decode_image(zero).shape == (28, 28, 3)
    write(Path("examples/image_classifier/mnist/test_data/0.png"), zero)
    two = base64.b64encode(sample_digit(images, targets, 2)).decode("ascii")
    request = json.dumps({"instances": [{"data": two}]}, indent=2) + "\n"
    write(Path("kubernetes/kserve/kf_request_json/v1/mnist.json"), request.encode())
    print("wrote the models under model/ and the sample images")


if __name__ == "__main__":
    main()
