"""The HTTP layer of the client: bearer auth, problem+json errors, and retries with backoff that stay safe."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

# Both come with Retry-After (API.md): the server is saturated, its database or broker is away, or a tenant limit
# was hit. Nothing was done, so any request may be sent again.
RETRY_STATUSES = frozenset({429, 503})
# Failures before a byte reached the server: safe to retry even for a request that is not idempotent (an upload).
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class ClientError(Exception):
    """Base of every error the client raises."""


class ApiError(ClientError):
    """The server answered with an error: the fields of its problem+json body (RFC 9457)."""

    def __init__(self, status: int, problem: Mapping[str, Any], method: str = "", url: str = "") -> None:
        self.status = status
        self.problem = dict(problem)
        self.code: str = str(problem.get("code") or "")
        self.title: str = str(problem.get("title") or "")
        self.detail: str = str(problem.get("detail") or "")
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        where = f" ({method} {url})" if method else ""
        super().__init__(f"{status} {self.code or self.title}: {self.detail or self.title}{where}")


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


class Transport:
    """One httpx.Client with the key, and the retry policy every call of quantserve_client goes through."""

    def __init__(self, url: str, key: str, *, timeout_s: float, retries: int, backoff_s: float,
                 max_backoff_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {key}", "User-Agent": "quantserve-client"})
        self.retries, self.backoff_s, self.max_backoff_s, self.sleep = retries, backoff_s, max_backoff_s, sleep

    def close(self) -> None:
        self.http.close()

    def delay_s(self, attempt: int, response: httpx.Response | None) -> float:
        """How long to wait before attempt `attempt + 1`: the server's Retry-After when it gave one, else
        exponential backoff with jitter, so that many pipelines cut off together do not come back together."""
        hinted = retry_after_s(response.headers.get("retry-after")) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff_s * 4)  # a hint of hours would stall a pipeline silently
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * random.uniform(0.5, 1.0)

    def request(self, method: str, path: str, *, idempotent: bool,
                content: Callable[[], Any] | None = None, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """Send, retrying on 429/503 and on connection errors. A request that is not idempotent (an upload, a
        cancel) is retried only when it surely never reached the server; `content` is called again for each
        attempt, so a file body is re-read from its start. Statuses in `ok` (e.g. 304, 416) are returned as is."""
        attempt = 0
        while True:
            response = None
            try:
                if content is not None:
                    kwargs["content"] = content()
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                retryable = isinstance(exc, NOT_SENT) or idempotent
                if not retryable or attempt >= self.retries:
                    raise
            else:
                if response.status_code < 400 or response.status_code in ok:
                    return response
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    raise api_error(response)
                response.close()
            self.sleep(self.delay_s(attempt, response))
            attempt += 1


def api_error(response: httpx.Response) -> ApiError:
    response.read()
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:  # not problem+json: a proxy in between, or not quantserve at all
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    return ApiError(response.status_code, problem, response.request.method, str(response.request.url))
