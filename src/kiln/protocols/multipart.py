"""`multipart/form-data` bodies (what `curl -F data=@file` sends), parsed into parts.

The body is already in memory (its size was checked against the API's
limit), so a small splitter on the boundary is all that is needed: no
streaming parser, no dependency. Parts keep their order, which is how a
multi-input model tells its inputs apart (seed 004's
`-F data=@a.jpg -F data=@b.jpg`).
"""

from __future__ import annotations

import re

from kiln.errors import InvalidInput
from kiln.serving.types import Part

MULTIPART = "multipart/form-data"
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def header_params(value: str) -> dict[str, str]:
    """Parameters of a header such as `form-data; name="data"; filename="a.jpg"`."""
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(value):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[key.lower()] = raw
    return params


def boundary_of(content_type: str) -> bytes:
    """The boundary named by a multipart Content-Type header; 400 when it is missing."""
    boundary = header_params(content_type).get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise InvalidInput(
            "the multipart body has no usable boundary in its Content-Type header; let your "
            "client set it (curl -F name=@file, or requests/httpx files=...)"
        )
    return boundary.encode("latin-1")


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """Every part of a `multipart/form-data` body, in the order the client sent them."""
    delimiter = b"--" + boundary_of(content_type)
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise InvalidInput(
                "the multipart body does not contain the boundary its Content-Type announces"
            )
        position = start + 2 + len(delimiter)
    parts: list[Part] = []
    separator = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", position):
            return parts  # the closing delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise InvalidInput("the multipart body is cut short after a boundary")
        start = line_end + 2
        end = body.find(separator, start)
        if end < 0:
            raise InvalidInput(
                "the multipart body has no closing boundary; it was probably cut short"
            )
        parts.append(_part(body[start:end], len(parts)))
        position = end + len(separator)


def _part(raw: bytes, index: int) -> Part:
    if raw.startswith(b"\r\n"):
        head, data = b"", raw[2:]
    else:
        split = raw.find(b"\r\n\r\n")
        if split < 0:
            raise InvalidInput(f"part {index + 1} of the multipart body has no header end")
        head, data = raw[:split], raw[split + 4 :]
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    disposition = header_params(headers.get("content-disposition", ""))
    filename = disposition.get("filename*") or disposition.get("filename")
    if filename and filename.lower().startswith("utf-8''"):
        from urllib.parse import unquote

        filename = unquote(filename[7:])
    content_type = headers.get("content-type", "")
    if not content_type:
        # RFC 7578: a plain field is text; a file without a type is just bytes.
        content_type = "application/octet-stream" if filename is not None else "text/plain"
    return Part(
        name=disposition.get("name", f"part{index + 1}"),
        data=data,
        content_type=content_type,
        filename=filename,
    )
