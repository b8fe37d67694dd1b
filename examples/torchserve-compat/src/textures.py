"""The texture classifier behind the `resnet-18` and `squeezenet1_1` names.

The seed's commands name ImageNet models; this example cannot download one,
so it serves a small model that really classifies what it is shown: the
texture of an image (striped, checkered, dotted, plain; version 2.0 also
knows gradient and speckled). An image becomes a few dozen numbers that
describe the power spectrum of its 32x32 gray version (see `features`):
neither the pattern's position nor its direction changes them. A softmax
layer (the ONNX model) turns those into class probabilities. `build_models.py` trains it on
textures drawn by `render` below.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from images import resize, to_gray

SIDE = 32
ANGLES = 12
RADII = 8
FEATURES = ANGLES + (ANGLES // 2 + 1) + RADII + 2
LABELS_V1 = ["striped", "checkered", "dotted", "plain"]
LABELS_V2 = [*LABELS_V1, "gradient", "speckled"]

_fy, _fx = np.meshgrid(np.fft.fftfreq(SIDE), np.fft.fftfreq(SIDE), indexing="ij")
_RADIUS = np.hypot(_fx, _fy)
_ANGLE = (np.arctan2(_fy, _fx) % np.pi) / np.pi * ANGLES  # 0..ANGLES, in bins
_RING = np.minimum((_RADIUS / 0.5 * RADII).astype(int), RADII - 1)


def features(image: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [FEATURES], the same whatever the pattern's position.

    From the power spectrum of the contrast-normalised 32x32 gray image: how the
    energy spreads over directions (sorted, and the magnitudes of its circular
    Fourier transform: both ignore which way the pattern is turned), over
    frequencies (rings), plus the total energy and its peak share.
    """
    gray = resize(to_gray(image), SIDE, SIDE)
    gray = (gray - gray.mean()) / (gray.std() + 0.1)
    power = np.abs(np.fft.fft2(gray)) ** 2 / SIDE**4
    power[0, 0] = 0.0
    total = power.sum() + 1e-9
    oriented = power * (_RADIUS > 0.04)
    low = np.floor(_ANGLE).astype(int) % ANGLES
    weight = _ANGLE - np.floor(_ANGLE)
    angles = np.bincount(low.ravel(), (oriented * (1 - weight)).ravel(), ANGLES)
    angles += np.bincount(((low + 1) % ANGLES).ravel(), (oriented * weight).ravel(), ANGLES)
    angles /= angles.sum() + 1e-9
    harmonics = np.abs(np.fft.rfft(angles))
    rings = np.bincount(_RING.ravel(), power.ravel(), RADII) / total
    summary = [np.log(total), power.max() / total]
    return np.concatenate([np.sort(angles)[::-1], harmonics, rings, summary]).astype(np.float32)


def top_k(probabilities: Any, labels: list[str], k: int = 5) -> dict[str, float]:
    """{label: probability} for the k most likely classes, most likely first."""
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    order = np.argsort(-probabilities)[:k]
    return {labels[i]: round(float(probabilities[i]), 6) for i in order}


# ----- drawing training (and test) images ------------------------------------------------


def _grid(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return y / max(height, width), x / max(height, width)


def _two_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    while True:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(a.mean() - b.mean()) > 60:
            return a, b


def render(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One random image of a texture class, RGB uint8 [H, W, 3]."""
    y, x = _grid(rng, height, width)
    fg, bg = _two_colors(rng)
    if kind == "striped":
        angle = rng.choice([0.0, 90.0, 45.0, 135.0]) + rng.uniform(-12, 12)
        theta = np.deg2rad(angle)
        period = 1 / rng.uniform(3, 9)
        coord = x * np.cos(theta) + y * np.sin(theta)
        coord = coord + rng.uniform(0, 0.02) * np.sin(2 * np.pi * (y if angle < 45 else x) * 3)
        mask = ((coord / period + rng.uniform(0, 1)) % 1.0) < rng.uniform(0.35, 0.65)
    elif kind == "checkered":
        period = 1 / rng.uniform(2, 6)
        phase = rng.uniform(0, 1, 2)
        mask = ((np.floor(x / period + phase[0]) + np.floor(y / period + phase[1])) % 2) == 0
    elif kind == "dotted":
        spacing = 1 / rng.uniform(3, 8)
        radius = spacing * rng.uniform(0.18, 0.32)
        jitter = rng.uniform(0, 0.25)
        gy = np.floor(y / spacing)
        gx = np.floor(x / spacing)
        cells = int(1 / spacing) + 3
        offsets = rng.uniform(-jitter, jitter, (cells, cells, 2)) * spacing
        iy = np.clip(gy.astype(int), 0, cells - 1)
        ix = np.clip(gx.astype(int), 0, cells - 1)
        cy = (gy + 0.5) * spacing + offsets[iy, ix, 0]
        cx = (gx + 0.5) * spacing + offsets[iy, ix, 1]
        mask = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
    elif kind == "plain":
        mask = np.zeros_like(x, dtype=bool)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        ramp = x * np.cos(theta) + y * np.sin(theta)
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
        image = bg[None, None, :] * (1 - ramp[..., None]) + fg[None, None, :] * ramp[..., None]
        return _finish(image, rng)
    elif kind == "speckled":
        mask = rng.uniform(0, 1, x.shape) < rng.uniform(0.2, 0.5)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    image = np.where(mask[..., None], fg[None, None, :], bg[None, None, :])
    return _finish(image, rng)


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, rng.uniform(0, 8), image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)
