"""Alembic environment: the URL comes from QUANTSERVE_* settings (or the caller), never from alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.models import Base
from app.settings import Settings

config = context.config
url = config.attributes.get("url") or Settings().effective_database_url


def run_migrations_online() -> None:
    connectable = create_engine(url)
    with connectable.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


run_migrations_online()
