"""kiln.protocols.multipart: python-multipart's framing, Kiln's parts, limits and screening."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from kiln.errors import InvalidInput, PayloadTooLarge
from kiln.protocols import multipart
from kiln.protocols.multipart import (
    INLINE_BYTES,
    MAX_BLANK_BYTES,
    MAX_FIELDS,
    MAX_PARTS,
    parse_multipart,
    read_multipart,
)

CT = "multipart/form-data; boundary=x"


def encode(**kwargs) -> tuple[bytes, str]:
    """A body and its Content-Type as a real client (httpx) builds them."""
    request = httpx.Request("POST", "http://kiln.test/", **kwargs)
    return request.read(), request.headers["content-type"]


def files(count: int) -> bytes:
    part = b'--x\r\nContent-Disposition: form-data; name="data"; filename="f.bin"\r\n\r\nd\r\n'
    return part * count + b"--x--\r\n"


def fields(count: int) -> bytes:
    return b'--x\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n' * count + b"--x--\r\n"


def test_parts_keep_order_names_filenames_and_types() -> None:
    body, ct = encode(
        files=[("data", ("a.txt", b"first", "text/plain")), ("data", ("b.bin", b"second", ""))],
        data={"note": "héllo"},
    )
    parts = parse_multipart(body, ct)
    assert [(p.name, p.data, p.filename) for p in parts] == [
        ("note", "héllo".encode(), None),
        ("data", b"first", "a.txt"),
        ("data", b"second", "b.bin"),
    ]
    # RFC 7578: a plain field is text, a file without a type is bytes.
    assert [p.content_type for p in parts] == [
        "text/plain",
        "text/plain",
        "application/octet-stream",
    ]


def test_binary_data_with_boundary_like_bytes_is_kept_exactly() -> None:
    data = bytes(range(256)) + b"\r\n--" + b"\r\n" * 50 + b"--\r\n-"
    body, ct = encode(files={"data": ("blob.bin", data, "application/octet-stream")})
    (part,) = parse_multipart(body, ct)
    assert part.data == data


def test_preamble_epilogue_padding_no_headers_and_rfc5987_filename() -> None:
    body = (
        b"a preamble\r\n--x\r\n\r\nno headers\r\n--x  \t\r\n"
        b"Content-Disposition: form-data; name=\"f\"; filename*=utf-8''%C3%A9t%C3%A9.csv\r\n"
        b"Content-Type: text/csv\r\n\r\n1,2\r\n--x--\r\nan epilogue"
    )
    first, second = parse_multipart(body, CT)
    assert (first.name, first.data, first.content_type) == ("part1", b"no headers", "text/plain")
    assert (second.filename, second.content_type, second.data) == ("été.csv", "text/csv", b"1,2")
    assert parse_multipart(b"--x--\r\n", CT) == []


@pytest.mark.parametrize(
    ("body", "ct", "says"),
    [
        (b"--x\r\n\r\nv\r\n--x--", "multipart/form-data", "no usable boundary"),
        (b"no boundary here", CT, "does not contain the boundary"),
        (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nv", CT, "cut short"),
        (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--x", CT, "cut short"),
        (b"--x\r\nBad Header: v\r\n\r\nv\r\n--x--\r\n", CT, "malformed in part 1"),
    ],
)
def test_malformed_bodies_are_400_saying_what_is_wrong(body: bytes, ct: str, says: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_multipart(body, ct)
    assert says in err.value.message


def test_part_limit_is_413_naming_it() -> None:
    assert len(parse_multipart(files(MAX_PARTS), CT)) == MAX_PARTS
    with pytest.raises(PayloadTooLarge) as err:
        parse_multipart(files(MAX_PARTS + 1), CT)
    assert f"more than {MAX_PARTS} parts" in err.value.message
    assert "several requests" in err.value.message
    # Counted while parsing too (a caller's lower limit, past the cheap count).
    with pytest.raises(PayloadTooLarge, match="more than 3 parts"):
        parse_multipart(files(4), CT, max_parts=3)


def test_field_limit_is_413_naming_it() -> None:
    assert len(parse_multipart(fields(MAX_FIELDS), CT)) == MAX_FIELDS
    with pytest.raises(PayloadTooLarge) as err:
        parse_multipart(fields(MAX_FIELDS + 1), CT)
    assert f"more than {MAX_FIELDS} plain form fields" in err.value.message
    assert "curl -F name=@file" in err.value.message


def test_part_size_limit_is_413_naming_it() -> None:
    body, ct = encode(files=[("a", b"x" * 10), ("b", b"y" * 11)])
    assert len(parse_multipart(body, ct, max_part_bytes=11)) == 2
    with pytest.raises(PayloadTooLarge) as err:
        parse_multipart(body, ct, max_part_bytes=10)
    assert "part 2" in err.value.message and "10 bytes" in err.value.message


def test_millions_of_empty_parts_are_refused_in_milliseconds() -> None:
    # The finding: a 32 MiB body of 3.7M parts took 54 s and 1.6 GB.
    body = b"--x\r\n\r\n" + b"\r\n--x\r\n\r\n" * 3_700_000 + b"\r\n--x--\r\n"
    assert len(body) <= 32 * 1024 * 1024
    started = time.monotonic()
    with pytest.raises(PayloadTooLarge, match=f"more than {MAX_PARTS} parts"):
        parse_multipart(body, CT)
    assert time.monotonic() - started < 1


def test_blanks_the_parser_steps_through_byte_by_byte_are_bounded() -> None:
    # Padding after a boundary, and blanks before header values: python-multipart
    # walks both one byte at a time (0.5 us a byte), so they are screened first.
    padded = (
        b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--x'
        + b" " * 4_000_000
        + b'\r\nContent-Disposition: form-data; name="b"\r\n\r\nw\r\n--x--\r\n'
    )
    header = b"X-Pad:" + b" " * 4100 + b"v\r\n"
    part = b'--x\r\nContent-Disposition: form-data; name="d"; filename="f"\r\n' + header * 6
    leading = (part + b"\r\nd\r\n") * 1000 + b"--x--\r\n"
    for body in (padded, leading):
        started = time.monotonic()
        with pytest.raises(InvalidInput, match=f"more than {MAX_BLANK_BYTES} bytes of blanks"):
            parse_multipart(body, CT)
        assert time.monotonic() - started < 1
    # A few blanks are fine.
    assert len(parse_multipart(b"--x \r\nX-A:   1\r\n\r\nv\r\n--x--\r\n", CT)) == 1


def test_large_bodies_are_parsed_in_a_thread_small_ones_inline(monkeypatch) -> None:
    threaded: list[int] = []
    real = asyncio.to_thread

    async def spy(func, *args, **kwargs):
        threaded.append(len(args[0]))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(multipart.asyncio, "to_thread", spy)
    small, ct = encode(files={"data": ("a.bin", b"a" * 1000)})
    large, large_ct = encode(files={"data": ("b.bin", b"b" * INLINE_BYTES)})
    assert asyncio.run(read_multipart(small, ct))[0].data == b"a" * 1000
    assert threaded == []
    assert asyncio.run(read_multipart(large, large_ct))[0].data == b"b" * INLINE_BYTES
    assert threaded == [len(large)]


def test_importing_the_server_does_not_import_the_parser() -> None:
    code = "import sys, kiln.protocols.app; print('python_multipart' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
