"""Wakes long polls when a job changes: PostgreSQL LISTEN/NOTIFY in production, a short re-check embedded.

A trigger on `jobs` (migrations/versions/0004) sends NOTIFY quantserve_job_changes with the job id whenever
anything a client sees of it changes (status, stage, progress, error, metrics, ...), whoever writes it
(worker, reaper, a cancel, plain SQL), and PostgreSQL delivers it only when that transaction commits.
Each API process keeps one connection LISTENing. SQLite has no such channel, so the embedded mode re-reads
the job every EMBEDDED_RECHECK_S instead: one cheap indexed read per waiting client, a few a second.
Notifications are a wake-up, never the truth: a woken poll re-reads the row, and a lost notification
(the LISTEN connection dropped) costs at most LISTENING_RECHECK_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

from sqlalchemy import make_url

from app.job_cache import JobAnswerCache

log = logging.getLogger("quantserve.api")

CHANNEL = "quantserve_job_changes"
EMBEDDED_RECHECK_S = 0.5
LISTENING_RECHECK_S = 5.0


class JobEvents:
    def __init__(self, database_url: str) -> None:
        parsed = make_url(database_url)
        self._conninfo = (parsed.set(drivername="postgresql").render_as_string(hide_password=False)
                          if parsed.get_backend_name() == "postgresql" else None)
        self._watched: dict[uuid.UUID, tuple[asyncio.Event, list[int]]] = {}
        self._task: asyncio.Task | None = None
        self.listening = False
        self.answers = JobAnswerCache()  # poll answers, dropped by the same notifications (app/job_cache.py)

    @property
    def recheck_s(self) -> float:
        return LISTENING_RECHECK_S if self.listening else EMBEDDED_RECHECK_S

    @contextlib.contextmanager
    def watch(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set at the job's next change; shared by every poll of that job in this process."""
        entry = self._watched.get(job_id)
        if entry is None:
            entry = self._watched[job_id] = (asyncio.Event(), [0])
        entry[1][0] += 1
        try:
            yield entry[0]
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0 and self._watched.get(job_id) is entry:
                del self._watched[job_id]

    @staticmethod
    async def wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def changed(self, job_id: uuid.UUID) -> None:
        self.answers.invalidate(job_id)  # first: a woken long poll must not find the old answer cached
        entry = self._watched.pop(job_id, None)
        if entry is not None:
            entry[0].set()

    def _wake_all(self) -> None:
        for job_id in list(self._watched):
            self.changed(job_id)

    def start(self) -> None:
        if self._conninfo is not None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="quantserve-job-events")

    async def stop(self) -> None:
        self.answers.enabled = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._wake_all()

    async def _listen(self) -> None:
        import psycopg

        backoff = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, connect_timeout=5)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening, backoff = True, 0.5
                    self.answers.reset()
                    self.answers.enabled = True
                    self._wake_all()  # anything may have changed while we were not listening
                    async for note in conn.notifies():
                        with contextlib.suppress(ValueError):
                            self.changed(uuid.UUID(note.payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: re-check often until LISTEN is back
                self.answers.enabled = False
                self.answers.reset()
                if self.listening:
                    log.warning("job change notifications lost (%s); long polls re-check every %.1f s meanwhile",
                                exc.__class__.__name__, EMBEDDED_RECHECK_S)
                self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
