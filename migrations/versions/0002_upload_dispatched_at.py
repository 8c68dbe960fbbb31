"""uploads remember when their validation was last published

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 02:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("models", "datasets"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("models", "datasets"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("dispatched_at")
