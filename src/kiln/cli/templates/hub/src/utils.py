"""Helpers for inputs that arrive as text in JSON, such as base64-encoded images.

Import them in main.py with `from utils import convert_base64_to_image`. Add your
own helpers here. Pillow (and numpy, for return_type="numpy") must be listed in
requirements.txt to decode images.
"""

import base64
import io


def convert_base64_to_bytes(data):
    """Decode a base64 string (a "data:image/png;base64,..." URL too) into bytes."""
    if "," in data and data.lstrip().startswith("data:"):
        data = data.split(",", 1)[1]
    return base64.b64decode(data)


def convert_bytes_to_base64(data):
    """Encode bytes as a base64 string, e.g. to return a file in the JSON answer."""
    return base64.b64encode(data).decode("ascii")


def convert_base64_to_image(data, return_type="pillow"):
    """Decode a base64 image into a PIL image ("pillow"), a numpy array ("numpy") or bytes."""
    raw = convert_base64_to_bytes(data)
    if return_type == "bytes":
        return raw
    from PIL import Image  # type: ignore[import-not-found]  # Pillow, if you list it

    image = Image.open(io.BytesIO(raw))
    if return_type == "numpy":
        import numpy as np

        return np.asarray(image)
    return image


def convert_image_to_base64(image, format="PNG"):
    """Encode a PIL image (or a numpy array of pixels) as a base64 string."""
    from PIL import Image  # type: ignore[import-not-found]  # Pillow, if you list it

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return convert_bytes_to_base64(buffer.getvalue())
