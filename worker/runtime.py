"""The worker process's shared handles (settings, database, store, outbox relay), built on first use."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy.orm import Session, sessionmaker

from app.broker import OutboxRelay, Publisher
from app.db import make_engine, make_session_factory
from app.settings import Settings, get_settings
from app.storage import Storage, open_storage


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    session_factory: sessionmaker[Session]
    storage: Storage
    relay: OutboxRelay


@cache
def runtime() -> Runtime:
    from worker.celery_app import celery_app

    settings = get_settings()
    factory = make_session_factory(make_engine(settings.effective_database_url))
    relay = OutboxRelay(factory, Publisher(celery_app))
    relay.install()
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    return Runtime(settings, factory, open_storage(settings), relay)
