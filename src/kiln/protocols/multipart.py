"""`multipart/form-data` bodies (what `curl -F data=@file` sends), parsed into parts.

The framing is read by python-multipart, the parser Starlette uses, which is
kept up against malformed and hostile bodies; Kiln keeps only what is its own:
the part's name, filename (also `filename*=utf-8''...`) and type, with RFC
7578's defaults, and the order of the parts, which is how a multi-input model
tells its inputs apart (seed 004's `-F data=@a.jpg -F data=@b.jpg`).

The body is already in memory and within the API's `serving.max_request_bytes`.
On top of that a body may hold at most `MAX_PARTS` parts, `MAX_FIELDS` of them
plain form fields (no filename), none larger than the caller's part limit;
past a limit the answer is 413 naming it. The parts are counted (C-speed
`bytes.count`) before the parser runs, so a body of millions of empty parts is
refused in milliseconds. The parser steps one byte at a time through the
blanks after a boundary and before a header's value, so those are screened
first too: at most `MAX_BLANK_BYTES` in a body, else 400.
`read_multipart` parses a body larger than `INLINE_BYTES` in a thread, so a
large upload cannot hold up other requests on the event loop; a small one is
parsed inline, where a thread hop would cost more than the parse.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from kiln.errors import InvalidInput, PayloadTooLarge
from kiln.serving.types import Part

MULTIPART = "multipart/form-data"
MAX_PARTS = 1000  # parts per body, files and fields together
MAX_FIELDS = 200  # plain form fields (parts without a filename) per body
INLINE_BYTES = 1024 * 1024  # bodies up to this size are parsed on the event loop
MAX_BLANK_BYTES = 64 * 1024  # padding after boundaries + blanks before header values, per body
# python-multipart's cap on one part's headers: 8 lines of at most 4224 bytes, with CRLFs.
_HEADERS_WINDOW = 8 * (4224 + 2) + 2
_BLANKS = re.compile(rb"[ \t]*")
_HEADER_LEAD = re.compile(rb"(?m)^[^:\r\n]*:( +)")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_ESCAPE = re.compile(r"\\(.)")
_USE_A_CLIENT = "let your client build it (curl -F name=@file, or requests/httpx files=...)"


def header_params(value: str) -> dict[str, str]:
    """Parameters of a header such as `form-data; name="data"; filename="a.jpg"`."""
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(value):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
            if "\\" in raw:
                raw = _ESCAPE.sub(r"\1", raw)
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


async def read_multipart(
    body: bytes,
    content_type: str,
    *,
    max_parts: int = MAX_PARTS,
    max_fields: int = MAX_FIELDS,
    max_part_bytes: int | None = None,
) -> list[Part]:
    """`parse_multipart`, in a worker thread when the body is over `INLINE_BYTES`."""
    if len(body) <= INLINE_BYTES:
        return parse_multipart(
            body,
            content_type,
            max_parts=max_parts,
            max_fields=max_fields,
            max_part_bytes=max_part_bytes,
        )
    return await asyncio.to_thread(
        parse_multipart,
        body,
        content_type,
        max_parts=max_parts,
        max_fields=max_fields,
        max_part_bytes=max_part_bytes,
    )


def parse_multipart(
    body: bytes,
    content_type: str,
    *,
    max_parts: int = MAX_PARTS,
    max_fields: int = MAX_FIELDS,
    max_part_bytes: int | None = None,
) -> list[Part]:
    """Every part of a `multipart/form-data` body, in the order the client sent them.

    400 for a body that is not multipart as announced, 413 past `max_parts`
    parts, `max_fields` plain fields or a part of more than `max_part_bytes`.
    """
    parser_class, parse_error = _library()
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        # A preamble before the first boundary is allowed (RFC 2046); the parser
        # skips leading CRLFs only, so start it at the CRLF before the boundary.
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise InvalidInput(
                "the multipart body does not contain the boundary its Content-Type announces"
            )
        if start:
            body = body[start:]
    _screen(body, boundary, max_parts)
    first = body.find(delimiter) + len(delimiter)
    padding = _BLANKS.match(body, first)
    if padding and padding.end() > first:
        # Transport padding after the first boundary (RFC 2046): the parser takes it
        # after the others only; this copies the body, for a padded first boundary only.
        body = body[:first] + body[padding.end() :]
    collector = _Collector(max_parts, max_fields, max_part_bytes)
    try:
        parser = parser_class(boundary, collector.callbacks())
        parser.write(body)
        parser.finalize()
    except parse_error as err:
        part = f" in part {len(collector.parts) + 1}" if collector.parts or collector.begun else ""
        raise InvalidInput(
            f"the multipart body is malformed{part} ({err}); {_USE_A_CLIENT}"
        ) from err
    if not collector.ended:
        raise InvalidInput("the multipart body has no closing boundary; it was probably cut short")
    return collector.parts


def _screen(body: bytes, boundary: bytes, max_parts: int) -> None:
    """Refuse, before parsing, what would cost the parser a Python step per byte.

    `body` starts at its first boundary (with or without the CRLF before it).
    """
    delimiter = b"\r\n--" + boundary
    first = 0 if body.startswith(delimiter) else -2  # -2: no CRLF before the first one
    # Every delimiter but the closing one opens a part.
    if body.count(delimiter) + (first < 0) - 1 > max_parts:
        raise _too_many_parts(max_parts)
    if len(body) <= MAX_BLANK_BYTES or body.count(b" ") + body.count(b"\t") <= MAX_BLANK_BYTES:
        return  # not enough blanks in the whole body to matter
    blanks = 0
    position = first
    while position != -1:
        after = position + len(delimiter)
        padded = _BLANKS.match(body, after)
        end = padded.end() if padded else after
        blanks += end - after  # transport padding, skipped byte by byte
        if body.startswith(b"\r\n", end):
            start = end + 2
            stop = body.find(b"\r\n\r\n", end, start + _HEADERS_WINDOW)
            # The blanks before each header's value, also skipped byte by byte; the
            # parser gives up after 8 headers, so no more are counted.
            for count, lead in enumerate(
                _HEADER_LEAD.finditer(body, start, stop if stop != -1 else start)
            ):
                if count == 8:
                    break
                blanks += lead.end(1) - lead.start(1)
        if blanks > MAX_BLANK_BYTES:
            raise InvalidInput(
                f"the multipart body has more than {MAX_BLANK_BYTES} bytes of blanks after "
                f"its boundaries and before its header values, Kiln's limit per request; "
                f"{_USE_A_CLIENT}"
            )
        position = body.find(delimiter, after)


def _too_many_parts(max_parts: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the multipart body has more than {max_parts} parts, Kiln's limit per request; "
        "send the inputs in several requests, or many small values as one JSON body"
    )


_LIBRARY: tuple[Any, type[Exception]] | None = None


def _library() -> tuple[Any, type[Exception]]:
    """python-multipart's parser and error, imported on first use (importing kiln stays light)."""
    global _LIBRARY
    if _LIBRARY is None:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser

        _LIBRARY = (MultipartParser, FormParserError)
    return _LIBRARY


class _Collector:
    """python-multipart's callbacks: builds the parts and enforces the limits as it goes."""

    def __init__(self, max_parts: int, max_fields: int, max_part_bytes: int | None) -> None:
        self.max_parts = max_parts
        self.max_fields = max_fields
        self.max_part_bytes = max_part_bytes
        self.parts: list[Part] = []
        self.fields = 0
        self.begun = False
        self.ended = False
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self._data: list[bytes] = []
        self._size = 0
        self._part: Part | None = None

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise _too_many_parts(self.max_parts)
        self.begun = True
        self._headers = {}
        self._field = b""
        self._value = b""
        self._data = []
        self._size = 0
        self._part = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        name = self._field.decode("utf-8", "replace").strip().lower()
        self._headers[name] = self._value.decode("utf-8", "replace").strip()
        self._field = b""
        self._value = b""

    def on_headers_finished(self) -> None:
        part = _part(self._headers, len(self.parts))
        if part.filename is None:
            self.fields += 1
            if self.fields > self.max_fields:
                raise PayloadTooLarge(
                    f"the multipart body has more than {self.max_fields} plain form fields "
                    "(parts without a filename), Kiln's limit per request; send the inputs "
                    "as files (curl -F name=@file) or as one JSON body"
                )
        self._part = part

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self.max_part_bytes is not None and self._size > self.max_part_bytes:
            raise PayloadTooLarge(
                f"part {len(self.parts) + 1} of the multipart body is over this API's limit "
                f"of {self.max_part_bytes} bytes; send less data per request or raise "
                "serving.max_request_bytes in kiln.yaml"
            )
        self._data.append(data[start:end])

    def on_part_end(self) -> None:
        part = self._part or _part(self._headers, len(self.parts))
        chunks = self._data
        part.data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.parts.append(part)
        self._data = []
        self._part = None

    def on_end(self) -> None:
        self.ended = True


def _part(headers: dict[str, str], index: int) -> Part:
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
        data=b"",
        content_type=content_type,
        filename=filename,
    )
