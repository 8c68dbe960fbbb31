"""The migrations build exactly the schema the models describe, on SQLite (embedded) as on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from app.migrate import upgrade
from app.models import Base
from tests.conftest import fresh_pg_database


def _schema_diff(url: str, *, compare_type: bool) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": compare_type})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_migrations_match_the_models_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    upgrade(url)
    diff = _schema_diff(url, compare_type=False)  # SQLite reflects types loosely (JSONB, UUID, timezones)
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"


def test_migrations_match_the_models_on_postgresql() -> None:
    # Needs the PostgreSQL of the integration tests (scripts/ensure-services.sh): a uniquely named database,
    # migrated to head, compared (column types too), dropped.
    with fresh_pg_database() as url:
        diff = _schema_diff(url, compare_type=True)
    assert diff == [], f"models and migrations disagree on PostgreSQL; add a migration: {diff}"
