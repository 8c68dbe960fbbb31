"""Poll answers kept in memory while PostgreSQL's change notifications can say when they go stale.

A pipeline polls the same job again and again, and between two changes every answer is the same bytes.
While this process LISTENs for job changes (app/job_events.py), an answer is served from memory until the
job's next NOTIFY drops it. Without a working LISTEN (embedded SQLite, or the connection lost) nothing is
cached, since nothing could say when an answer goes stale.

The race that matters: a read that started before a commit can finish after that commit's notification
arrived, and would cache the old answer forever. Each job being read carries a generation, bumped by its
notifications; a read stores its answer only if the generation it started with is still current.
MAX_AGE_S bounds what a LISTEN connection that stalls without an error could leave stale.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from app.single_flight import SingleFlight

MAX_ENTRIES = 10_000  # a few MB of answers at most; the least recently polled go first
MAX_AGE_S = 10.0


@dataclass(frozen=True)
class _Entry:
    tenant_id: uuid.UUID
    view: Any  # job_reads.JobView
    stored: float


class JobAnswerCache:
    def __init__(self) -> None:
        self._entries: OrderedDict[uuid.UUID, _Entry] = OrderedDict()
        self._reading: dict[uuid.UUID, int] = {}  # job -> reads in flight
        self._generation: dict[uuid.UUID, int] = {}  # job -> notifications seen while it was being read
        self._epoch = 0  # bumped on every reset: a read from before it stores nothing
        self.enabled = False  # set by JobEvents while its LISTEN connection is up
        # (tenant, job) -> the read in flight, shared by every poll that misses meanwhile (app/single_flight.py)
        self.reads: SingleFlight[tuple[uuid.UUID, uuid.UUID], Any] = SingleFlight()

    def get(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Any | None:
        entry = self._entries.get(job_id)
        if entry is None or not self.enabled:
            return None
        if entry.tenant_id != tenant_id or time.monotonic() - entry.stored > MAX_AGE_S:
            return None  # another tenant's job reads as not found, from the database, as always
        self._entries.move_to_end(job_id)
        return entry.view

    def begin(self, job_id: uuid.UUID) -> tuple[int, int]:
        """Before a database read of the job: the stamp that end() checks."""
        self._reading[job_id] = self._reading.get(job_id, 0) + 1
        return self._epoch, self._generation.get(job_id, 0)

    def end(self, job_id: uuid.UUID, stamp: tuple[int, int], tenant_id: uuid.UUID, view: Any | None) -> None:
        """After the read: keep `view` unless the job changed (or the cache was reset) meanwhile."""
        current = (self._epoch, self._generation.get(job_id, 0))
        if view is not None and self.enabled and stamp == current:
            self._entries[job_id] = _Entry(tenant_id, view, time.monotonic())
            self._entries.move_to_end(job_id)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        left = self._reading[job_id] - 1
        if left:
            self._reading[job_id] = left
        else:
            del self._reading[job_id]
            self._generation.pop(job_id, None)

    def invalidate(self, job_id: uuid.UUID) -> None:
        """The job changed: drop its answer, and fence out reads in flight."""
        self._entries.pop(job_id, None)
        self.reads.forget_where(lambda key: key[1] == job_id)  # a poll from now on must not join an older read
        if job_id in self._reading:
            self._generation[job_id] = self._generation.get(job_id, 0) + 1

    def reset(self) -> None:
        """Notifications may have been missed: forget everything, and fence out every read in flight."""
        self._entries.clear()
        self.reads.forget_where(lambda _key: True)
        self._epoch += 1
