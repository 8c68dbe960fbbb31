"""Domain errors and the one renderer that turns every failure into RFC 9457 problem+json."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("quantserve.api")
PROBLEM_BASE = "https://quantserve.dev/problems/"


class QuantserveError(Exception):
    status = 500
    code = "internal"
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra


class BadRequestError(QuantserveError):
    status, code, title, slug = 400, "bad_request", "Request is malformed", "bad-request"


class UnauthorizedError(QuantserveError):
    status, code, title, slug = 401, "unauthorized", "Authentication required", "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFoundError(QuantserveError):
    status, code, title, slug = 404, "not_found", "Not found", "not-found"


class ConflictError(QuantserveError):
    status, code, title, slug = 409, "conflict", "Conflict", "conflict"


class PayloadTooLargeError(QuantserveError):
    status, code, title, slug = 413, "too_large", "Body too large", "too-large"


class UnsupportedFormatError(QuantserveError):
    status, code, title, slug = 415, "unsupported_format", "Unsupported format", "unsupported-format"


class RangeNotSatisfiableError(QuantserveError):
    status, code, title, slug = 416, "range_not_satisfiable", "Range not satisfiable", "range"


class ValidationFailedError(QuantserveError):
    status, code, title, slug = 422, "validation_error", "Request is not valid", "validation"


class MethodUnavailableError(ValidationFailedError):
    code, title, slug = "unsupported_method", "Method not supported for this model", "unsupported-method"


class ModelNotReadyError(ValidationFailedError):
    code, title, slug = "model_not_ready", "Model is not ready", "model-not-ready"


class DatasetMismatchError(ValidationFailedError):
    code, title, slug = "dataset_mismatch", "Dataset does not match the model", "dataset-mismatch"


class UnavailableError(QuantserveError):
    status, code, title, slug = 503, "unavailable", "Service unavailable", "unavailable"

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class StoreUnavailableError(UnavailableError):
    """The object store is unreachable or refuses us: an outage or a setting to fix, never a 500."""


class SizeLimitExceededError(Exception):
    """A file being stored grew past its byte limit. Not an HTTP answer by itself: the upload layer turns it
    into a PayloadTooLargeError that names the setting behind the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


def problem(request: Request, *, status: int, code: str, title: str, slug: str, detail: str,
            errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail,
                            "instance": request.url.path, "code": code}
    if errors:
        body["errors"] = errors
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def _render_domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QuantserveError)
    return problem(request, status=exc.status, code=exc.code, title=exc.title, slug=exc.slug,
                   detail=exc.detail, errors=exc.errors, headers=exc.headers, **exc.extra)


def _render_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "invalid")} for e in exc.errors()]
    # A body that is not JSON at all is malformed (400), not a failed field check (422).
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        return problem(request, status=400, code="bad_request", title=BadRequestError.title, slug=BadRequestError.slug,
                       detail="request body is not valid JSON", errors=errors)
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return problem(request, status=422, code="validation_error", title=ValidationFailedError.title,
                   slug=ValidationFailedError.slug, detail=detail, errors=errors)


def _render_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: ("not_found", "not-found"), 405: ("method_not_allowed", "method-not-allowed"),
             401: ("unauthorized", "unauthorized"), 400: ("bad_request", "bad-request")}
    code, slug = codes.get(exc.status_code, ("http_error", "http-error"))
    return problem(request, status=exc.status_code, code=code, title=str(exc.detail), slug=slug,
                   detail=str(exc.detail), headers=getattr(exc, "headers", None))


def _record_incident(request: Request, cause: str) -> None:
    incidents = getattr(request.app.state, "incidents", None)
    if incidents is None:  # an app without its lifespan (a unit test): log each one
        log.warning("database %s", cause)
    else:
        incidents.record(cause)


def _render_database(request: Request, exc: Exception) -> JSONResponse:
    _record_incident(request, f"unavailable ({exc.__class__.__name__})")
    return problem(request, status=503, code="unavailable", title=UnavailableError.title, slug=UnavailableError.slug,
                   detail="the database is unreachable; retry shortly", headers={"Retry-After": "5"})


def _render_pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    # Every connection stayed busy for the whole pool timeout: the database is slow or the API overloaded, and
    # the client should come back shortly. Retry-After 1 matches app/admission.py's SATURATED_RETRY_AFTER_S.
    _record_incident(request, "saturated")
    return problem(request, status=503, code="unavailable", title=UnavailableError.title, slug=UnavailableError.slug,
                   detail="the database is saturated; retry shortly", headers={"Retry-After": "1"})


def _render_unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.headers.get("x-request-id") or getattr(request.state, "request_id", None)
    log.exception("unhandled error (request_id=%s)", request_id)
    return problem(request, status=500, code="internal", title=QuantserveError.title, slug="internal",
                   detail="an unexpected error occurred; quote the request_id when reporting it",
                   request_id=request_id)


def install(app: FastAPI) -> None:
    app.add_exception_handler(QuantserveError, _render_domain)
    app.add_exception_handler(RequestValidationError, _render_validation)
    app.add_exception_handler(StarletteHTTPException, _render_http)
    app.add_exception_handler(OperationalError, _render_database)
    app.add_exception_handler(PoolTimeoutError, _render_pool_timeout)
    app.add_exception_handler(DBAPIError, _render_database_or_bug)
    app.add_exception_handler(Exception, _render_unexpected)


def _render_database_or_bug(request: Request, exc: Exception) -> JSONResponse:
    # A lost connection is an outage (503); any other DBAPI error is our bug (500).
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return _render_database(request, exc)
    return _render_unexpected(request, exc)
