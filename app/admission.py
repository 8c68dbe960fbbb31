"""Saturation: how many sync requests may hold a database connection at once, and one log line per incident."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.errors import UnavailableError

log = logging.getLogger("quantserve.api")

# A saturated pool clears in well under a second once the burst passes: ask clients to come back soon.
SATURATED_RETRY_AFTER_S = 1


class Incidents:
    """Logs the first 503 of an incident, then nothing until the database has been fine for `quiet_s`; the next
    incident's first line (or shutdown) reports how many requests the previous one answered with 503.

    A saturated pool fails hundreds of requests a second: one warning each would bury the log, and slow the
    process down when it can least afford it."""

    def __init__(self, quiet_s: float = 30.0) -> None:
        self.quiet_s = quiet_s
        self.started: float | None = None
        self.last = 0.0
        self.count = 0
        self.cause = ""

    def record(self, cause: str) -> None:
        now = time.monotonic()
        if self.started is None or now - self.last > self.quiet_s:
            self.close()
            log.warning("database %s: answering 503 with Retry-After until it clears (logged once per incident)",
                        cause)
            self.started, self.count, self.cause = now, 0, cause
        self.count += 1
        self.last = now

    def close(self) -> None:
        if self.started is not None:
            log.warning("database %s incident: %d request(s) answered 503 over %.1f s", self.cause, self.count,
                        self.last - self.started)
            self.started = None


class Admission:
    """At most `capacity` sync database requests at once; the rest wait here, in the event loop, holding no thread.

    `capacity` is the sync pool's size (app/db.py), below the threadpool's size: an admitted request always gets
    both a connection and a thread, so it finishes and makes room. One that waits longer than `timeout_s`
    answers 503 with Retry-After."""

    def __init__(self, capacity: int, timeout_s: float, incidents: Incidents) -> None:
        self._slots = asyncio.Semaphore(capacity)
        self.timeout_s = timeout_s
        self.incidents = incidents

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            self.incidents.record("saturated")
            raise UnavailableError("the database is saturated; retry shortly",
                                   retry_after=SATURATED_RETRY_AFTER_S) from None
        try:
            yield
        finally:
            self._slots.release()
