"""Publishing tasks by name, and the outbox relay that publishes only after a commit."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Outbox, utcnow

log = logging.getLogger("quantserve.broker")

# Fail fast: a request must not hang on a dead broker; the outbox sweeper sends the message later.
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


class Publisher:
    def __init__(self, celery_app: Celery) -> None:
        self.celery_app = celery_app

    def publish(self, task_name: str, args: list[Any], queue: str) -> None:
        self.celery_app.send_task(task_name, args=args, queue=queue, retry=True, retry_policy=RETRY_POLICY)

    def ping(self) -> None:
        with self.celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)


def enqueue(session: Session, task_name: str, args: list[Any], queue: str) -> None:
    """Write the task into the outbox, in the caller's transaction; it is sent after commit."""
    row = Outbox(task_name=task_name, args=args, queue=queue)
    session.add(row)
    session.flush()
    session.info.setdefault("outbox", []).append(row.id)


class OutboxRelay:
    """Sends outbox rows once their transaction has committed; a rollback sends nothing."""

    def __init__(self, session_factory: sessionmaker[Session], publisher: Publisher) -> None:
        self.session_factory = session_factory
        self.publisher = publisher

    def install(self) -> None:
        event.listen(self.session_factory, "after_commit", self._after_commit)
        event.listen(self.session_factory, "after_rollback", self._after_rollback)

    def _after_rollback(self, session: Session) -> None:
        session.info.pop("outbox", None)

    def _after_commit(self, session: Session) -> None:
        ids = session.info.pop("outbox", None)
        if ids:
            self.send(ids)

    def send(self, ids: list[uuid.UUID]) -> int:
        """Publish the given outbox rows and delete each one that was sent. Returns how many were sent."""
        sent = 0
        with self.session_factory() as session:
            rows = session.scalars(select(Outbox).where(Outbox.id.in_(ids))).all()
            for row in rows:
                try:
                    self.publisher.publish(row.task_name, row.args, row.queue)
                except Exception as exc:  # broker down: the sweeper retries later
                    log.warning("publish of %s failed, left in outbox: %s", row.task_name, exc)
                    break
                session.execute(delete(Outbox).where(Outbox.id == row.id))
                session.commit()
                sent += 1
        return sent

    def sweep(self, older_than_s: float = 5.0) -> int:
        """Publish rows that were not sent right after their commit (broker down, process died)."""
        with self.session_factory() as session:
            cutoff = utcnow() - timedelta(seconds=older_than_s)
            ids = list(session.scalars(select(Outbox.id).where(Outbox.created_at < cutoff).limit(100)))
        return self.send(ids) if ids else 0
