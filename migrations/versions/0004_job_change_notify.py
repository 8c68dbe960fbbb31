"""jobs: NOTIFY quantserve_job_changes when anything a client sees of a job changes (wakes long polls)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00

PostgreSQL only: SQLite has no NOTIFY, and the embedded mode's long poll re-reads instead (app/job_events.py).
Heartbeats (lease_until) and re-dispatches (updated_at) change nothing a client sees and send nothing.
A trigger rather than code in each writer: the worker, the reaper, a cancel and a manual UPDATE all notify,
and the notification goes out only when the writing transaction commits.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE FUNCTION quantserve_notify_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('quantserve_job_changes', NEW.id::text);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER jobs_notify_change AFTER UPDATE ON jobs FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.stage IS DISTINCT FROM NEW.stage
              OR OLD.progress IS DISTINCT FROM NEW.progress OR OLD.attempt IS DISTINCT FROM NEW.attempt
              OR OLD.error IS DISTINCT FROM NEW.error OR OLD.metrics IS DISTINCT FROM NEW.metrics
              OR OLD.started_at IS DISTINCT FROM NEW.started_at OR OLD.finished_at IS DISTINCT FROM NEW.finished_at
              OR OLD.duration_s IS DISTINCT FROM NEW.duration_s)
        EXECUTE FUNCTION quantserve_notify_job_change()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_change ON jobs")
    op.execute("DROP FUNCTION IF EXISTS quantserve_notify_job_change()")
