"""Reading and writing small images with numpy alone (Pillow is used when installed).

The example ships its test images as PNG files, so it needs no imaging
library: PNG (8-bit gray, gray+alpha, RGB, RGBA and palette, not interlaced)
and binary PPM/PGM are decoded here. JPEG needs Pillow (`pip install pillow`);
with Pillow installed every format it knows is accepted.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

import kiln

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 array [H, W, 3] (RGB); a 400 for anything unreadable."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise kiln.InvalidInput(
            f"expected image bytes (send the file with curl -T or -F data=@file), "
            f"got {type(data).__name__}"
        )
    data = bytes(data)
    try:
        from PIL import Image  # optional: faster, and reads JPEG
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any undecodable upload
            raise kiln.InvalidInput(f"the body is not an image Pillow can read: {exc}") from None
    if data.startswith(PNG_SIGNATURE):
        return _rgb(_decode_png(data))
    if data[:2] in (b"P5", b"P6"):
        return _rgb(_decode_pnm(data))
    if data.startswith(b"\xff\xd8"):
        raise kiln.InvalidInput(
            "this is a JPEG image; reading JPEG needs Pillow on the server "
            "(pip install pillow), or send a PNG"
        )
    raise kiln.InvalidInput("the body is not a PNG or PPM image (install Pillow for JPEG)")


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (2, 4):  # drop alpha
        array = array[:, :, : channels - 1]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array


def _decode_pnm(data: bytes) -> np.ndarray:
    fields: list[bytes] = []
    position = 2
    while len(fields) < 3:
        while data[position : position + 1].isspace():
            position += 1
        if data[position : position + 1] == b"#":
            position = data.index(b"\n", position) + 1
            continue
        end = position
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[position:end])
        position = end
    width, height, maximum = (int(f) for f in fields)
    if maximum > 255:
        raise kiln.InvalidInput("16-bit PPM/PGM images are not supported; send 8-bit")
    channels = 3 if data[:2] == b"P6" else 1
    pixels = np.frombuffer(data, np.uint8, width * height * channels, position + 1)
    return pixels.reshape(height, width, channels)


def _decode_png(data: bytes) -> np.ndarray:
    position = len(PNG_SIGNATURE)
    idat: list[bytes] = []
    palette = None
    header = None
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"PLTE":
            palette = np.frombuffer(chunk, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    if header is None:
        raise kiln.InvalidInput("the PNG image has no header (IHDR)")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or interlace or color not in _CHANNELS:
        raise kiln.InvalidInput(
            "only 8-bit, non-interlaced PNG images are read without Pillow; "
            "install Pillow or re-save the image"
        )
    channels = _CHANNELS[color]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        raise kiln.InvalidInput("the PNG image data is corrupt") from None
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise kiln.InvalidInput("the PNG image data is truncated")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    pixels = _unfilter(rows[:, 0], rows[:, 1:], channels)
    image = pixels.reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise kiln.InvalidInput("the palette PNG image has no palette (PLTE)")
        image = palette[image[:, :, 0]]
    return image


def _unfilter(filters: np.ndarray, rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo PNG's per-row filters (None, Sub, Up, Average, Paeth)."""
    out = np.zeros(rows.shape, np.uint8)
    previous = np.zeros(rows.shape[1], np.uint8)
    for y, kind in enumerate(filters):
        row = rows[y]
        if kind == 0:
            current = row.copy()
        elif kind == 1:
            current = (
                np.cumsum(row.reshape(-1, bpp).astype(np.int64), axis=0).astype(np.uint8).ravel()
            )
        elif kind == 2:
            current = row + previous
        elif kind in (3, 4):
            current = bytearray(row.tobytes())
            above = previous.tobytes()
            for x in range(len(current)):
                left = current[x - bpp] if x >= bpp else 0
                up = above[x]
                if kind == 3:
                    current[x] = (current[x] + (left + up) // 2) & 0xFF
                else:
                    corner = above[x - bpp] if x >= bpp else 0
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                    current[x] = (current[x] + pred) & 0xFF
            current = np.frombuffer(bytes(current), np.uint8)
        else:
            raise kiln.InvalidInput(f"the PNG image uses an unknown row filter {int(kind)}")
        out[y] = current
        previous = out[y]
    return out


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] (gray) or [H, W, 3] (RGB) -> PNG bytes (deterministic)."""
    image = np.ascontiguousarray(image, np.uint8)
    height, width = image.shape[:2]
    color = 0 if image.ndim == 2 else 2
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def to_gray(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] float32 in [0, 1]."""
    rgb = image.astype(np.float32) / 255.0
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _box_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Area-averaging weights [size_out, size_in]: each output pixel averages what it covers."""
    edges = np.linspace(0, size_in, size_out + 1)
    starts, ends = edges[:-1, None], edges[1:, None]
    left = np.arange(size_in)[None, :]
    overlap = np.clip(np.minimum(ends, left + 1) - np.maximum(starts, left), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area resize of a 2-D array (no aliasing when shrinking)."""
    return _box_matrix(gray.shape[0], height) @ gray @ _box_matrix(gray.shape[1], width).T
