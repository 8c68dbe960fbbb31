"""Database engines (a sync one for writes and the CLI, an asyncio one for polled reads); nothing built at import.

How the API's numbers fit together, per API process (`quantserve api --workers N` runs N of them):

- Polled reads (GET /v1/jobs/{id}, key lookups) are async: a request waiting for the database holds no thread,
  only a place in the async pool's queue. `QUANTSERVE_DB_POOL_SIZE` connections (default 10, no overflow) are
  plenty: such a read takes well under a millisecond of database time, so 10 connections serve several
  thousand reads a second, more than one Python process can answer. A request that waits longer than
  `QUANTSERVE_DB_POOL_TIMEOUT_S` answers 503 with Retry-After (app/errors.py), never 500.
- Everything else (submits, uploads' final insert, lists, deletes) runs sync SQLAlchemy in the threadpool.
  The threadpool (anyio's 40 threads) is larger than the sync pool (SYNC_POOL_SIZE + SYNC_MAX_OVERFLOW = 10),
  and app/admission.py admits at most that many such requests at once, waiting in the event loop. Before it,
  64 clients took all 40 threads to wait for 20 connections, while the requests holding those connections
  needed a thread to return them: nothing moved until the pool timeout, and every request ended as a 500.
- So each API process holds at most DB_POOL_SIZE + 10 connections + 1 for LISTEN (app/job_events.py):
  21 by default. PostgreSQL's max_connections (100 by default) must cover N x 21 plus the workers' few.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

SYNC_POOL_SIZE = 5
SYNC_MAX_OVERFLOW = 5
SYNC_POOL_CAPACITY = SYNC_POOL_SIZE + SYNC_MAX_OVERFLOW


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, *, pool_timeout_s: float = 5.0) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_size=SYNC_POOL_SIZE, max_overflow=SYNC_MAX_OVERFLOW, pool_timeout=pool_timeout_s)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: after a database restart, drop dead pooled connections instead of failing requests.
    return create_engine(url, pool_pre_ping=True, pool_size=SYNC_POOL_SIZE, max_overflow=SYNC_MAX_OVERFLOW,
                         pool_timeout=pool_timeout_s, connect_args={"connect_timeout": 5})


def async_url(url: str) -> str:
    """The same database through an asyncio driver: psycopg's async mode, or aiosqlite for the embedded file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def make_async_engine(url: str, *, pool_size: int, pool_timeout_s: float, statement_timeout_s: float) -> AsyncEngine:
    """The polled reads' engine, in autocommit: a one-statement read needs no BEGIN/ROLLBACK round trips."""
    target = async_url(url)
    if target.startswith("sqlite"):
        engine = create_async_engine(target, connect_args={"timeout": 30}, pool_size=pool_size, max_overflow=0,
                                     pool_timeout=pool_timeout_s)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        connect_args: dict = {"connect_timeout": 5}
        if statement_timeout_s > 0:  # a stuck read ends as a database error (503), not a hung request
            connect_args["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
        # No pre_ping: it would double the round trips of every poll. A connection that died with the server
        # fails one request (503) and makes the pool replace every connection older than that failure.
        engine = create_async_engine(target, pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout_s,
                                     connect_args=connect_args)
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
