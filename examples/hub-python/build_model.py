"""Fit a handwritten-digit classifier and save it as plain numpy arrays.

The weights go to model/weights.npz (np.savez, no pickle), so src/main.py
loads them with numpy alone: no scikit-learn, and nothing in the model
folder can run code when loaded.

    python build_model.py            # needs scikit-learn
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
OUT = HERE / "model" / "weights.npz"


def main() -> int:
    # 1797 8x8 images of digits 0-9, pixel values 0-16; bundled with scikit-learn.
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning changes nothing here
        clf = LogisticRegression(max_iter=2000).fit(x, y)

    OUT.parent.mkdir(exist_ok=True)
    np.savez(
        OUT,
        coef=clf.coef_,
        intercept=clf.intercept_,
        classes=clf.classes_,
        scale=np.array(16.0),  # main.py divides raw pixels by this
    )
    agree = (np.argmax(x @ clf.coef_.T + clf.intercept_, axis=1) == clf.predict(x)).mean()
    shapes = f"coef {clf.coef_.shape}, intercept {clf.intercept_.shape}"
    print(f"wrote {OUT.relative_to(HERE)}: {shapes}")
    print(f"accuracy on the digits data set: {clf.score(x, y):.4f}")
    return 0 if agree == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
