"""File downloads with ETag, Content-Length and single byte ranges (RFC 9110)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from app.errors import RangeNotSatisfiableError
from app.storage import Storage

CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _stream(storage: Storage, key: str, start: int, length: int) -> Iterator[bytes]:
    with storage.open(key) as fh:
        fh.seek(start)
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


def file_response(request: Request, storage: Storage, key: str, *, size: int, sha256: str,
                  filename: str) -> Response:
    etag = f'"{sha256}"'
    safe_name = filename.replace('"', "").replace("\\", "")
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{safe_name}"'}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    byte_range = None
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (not if_range or if_range.strip() == etag):
        byte_range = _parse_range(range_header, size)
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(_stream(storage, key, 0, size), media_type="application/octet-stream",
                                 headers=headers)
    start, end = byte_range
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(_stream(storage, key, start, end - start + 1), status_code=206,
                             media_type="application/octet-stream", headers=headers)
