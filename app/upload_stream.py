"""Streams an upload body straight into a pending store file, hashing and counting as it goes.

Starlette's request.form() spools the whole file before the handler runs and has no size limit,
so both the raw PUT and the multipart POST read request.stream() themselves.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import BadRequestError, PayloadTooLargeError, SizeLimitExceededError, ValidationFailedError
from app.names import MAX_NAME_CHARS
from app.storage import PendingFile

MAX_FIELD_BYTES = 4096  # the small text fields (name, format) beside the file


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the upload is larger than the limit of {limit} bytes (QUANTSERVE_MAX_UPLOAD_BYTES)",
                                limit_bytes=limit)


def check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequestError("Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)


async def receive_raw(request: Request, pending: PendingFile) -> None:
    """The whole body is the file (PUT .../upload, curl -T)."""
    try:
        async for chunk in request.stream():
            pending.write(chunk)
            await pending.drain()  # an S3 store sends a full part, off the event loop
    except SizeLimitExceededError as exc:
        raise _too_large(exc.limit) from None
    except ClientDisconnect:
        raise BadRequestError("the client disconnected before the upload finished") from None
    if pending.size == 0:
        raise BadRequestError("the request body is empty: send the file's bytes")


class _FormCollector:
    """Callbacks for python-multipart's streaming parser: the `file` part goes to disk, others to memory."""

    def __init__(self, pending: PendingFile) -> None:
        self.pending = pending
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.saw_file = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._buffer = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_cb,
            "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._part_name, self._buffer = {}, None, bytearray()

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part_name == "file":
            if self.saw_file:
                raise BadRequestError("send exactly one 'file' part")
            self.saw_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == "file":
            self.pending.write(data[start:end])
        else:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FIELD_BYTES:
                msg = (f"longer than {MAX_FIELD_BYTES} bytes: the fields beside the file are short text "
                       f"(a name has at most {MAX_NAME_CHARS} characters)")
                raise ValidationFailedError(f"{self._part_name}: {msg}",
                                            errors=[{"loc": ["body", self._part_name], "msg": msg}])

    def _part_end(self) -> None:
        if self._part_name and self._part_name != "file":
            self.fields[self._part_name] = self._buffer.decode("utf-8", "replace")


async def receive_multipart(request: Request, pending: PendingFile) -> tuple[dict[str, str], str | None]:
    """multipart/form-data with a `file` part (curl -F file=@...). Returns (other fields, filename)."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequestError("send multipart/form-data with a 'file' part, or PUT the raw bytes to .../upload")
    collector = _FormCollector(pending)
    parser = MultipartParser(options[b"boundary"], collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            await pending.drain()
        parser.finalize()
    except SizeLimitExceededError as exc:
        raise _too_large(exc.limit) from None
    except ClientDisconnect:
        raise BadRequestError("the client disconnected before the upload finished") from None
    except MultipartParseError as exc:
        raise BadRequestError(f"the multipart body is malformed: {exc}") from None
    if not collector.saw_file:
        raise BadRequestError("the multipart body has no 'file' part")
    if pending.size == 0:
        raise BadRequestError("the uploaded file is empty")
    return collector.fields, collector.filename
