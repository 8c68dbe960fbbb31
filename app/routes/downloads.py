"""File downloads with ETag, Content-Length, single byte ranges (RFC 9110) and a UTF-8 file name (RFC 6266)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.errors import RangeNotSatisfiableError
from app.names import is_forbidden
from app.storage import Storage

CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


Redirect = Annotated[bool, Query(description="With an S3 store: answer 307 to a presigned URL of the bytes, "
                                            "valid for minutes, instead of streaming them through the API")]


def _stream(fh: BinaryIO, length: int) -> Iterator[bytes]:
    with fh:
        remaining = length
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for one satisfiable range; None to ignore the header (serve it all)."""
    match = _RANGE.match(header.strip())
    if not match:
        return None  # multiple or malformed ranges: RFC 9110 lets us answer with the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiableError("a zero-length suffix range selects nothing", headers={
                "Content-Range": f"bytes */{size}"})
        return max(size - n, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiableError(f"range {header!r} is outside the file's {size} bytes",
                                       headers={"Content-Range": f"bytes */{size}"})
    return start, end


def content_disposition(filename: str) -> str:
    """`attachment; filename="<ascii>"; filename*=UTF-8''<utf-8>` (RFC 6266 and RFC 8187), from any string.

    Robust on its own, without relying on the name rules: rows stored before names were checked may hold
    line breaks, quotes or non-Latin-1 text, which would otherwise end the header early or fail to encode.
    """
    # Characters that break or disguise a name, and path separators, become "_" in both forms; no hidden files.
    shown = "".join("_" if is_forbidden(c) or c in "/\\" else c for c in filename).strip().lstrip(".") or "download"
    encoded = quote(shown, safe="", encoding="utf-8", errors="replace")
    return f'attachment; filename="{_ascii_fallback(shown)}"; filename*=UTF-8\'\'{encoded}'


def _ascii_fallback(name: str) -> str:
    """For clients that ignore filename*: printable ASCII only, without quote, backslash, ";" (naive parsers split
    on it) or "%" (some clients percent-decode it); accents dropped (é -> e), anything else "_"; never empty,
    never a hidden file."""
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\%;' else "_"
                         for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    ascii_name = re.sub(r"_{2,}", "_", ascii_name).lstrip(". ")
    stem, dot, ext = ascii_name.rpartition(".")
    if not (dot and stem and ext.isalnum()):  # no extension worth keeping
        stem, ext = ascii_name, ""
    if not re.search(r"[A-Za-z0-9]", stem):  # "модель.onnx" -> "download.onnx", not "_.onnx"
        stem = "download"
    return stem + (f".{ext}" if ext else "")


def file_response(request: Request, storage: Storage, key: str, *, size: int, sha256: str,
                  filename: str, redirect: bool = False) -> Response:
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": content_disposition(filename)}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    # The client follows the redirect with its own Range header, which the store answers (206) itself.
    if redirect and (url := storage.presign(key, disposition=headers["Content-Disposition"])) is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    byte_range = None
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (not if_range or if_range.strip() == etag):
        byte_range = _parse_range(range_header, size)
    if byte_range is None:
        headers["Content-Length"] = str(size)
        # Opened here, not in the generator: a store outage is still a 503 before any header is sent.
        return StreamingResponse(_stream(storage.open_range(key, 0, size), size),
                                 media_type="application/octet-stream", headers=headers)
    start, end = byte_range
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1
    headers["Content-Length"] = str(length)
    return StreamingResponse(_stream(storage.open_range(key, start, length), length), status_code=206,
                             media_type="application/octet-stream", headers=headers)
