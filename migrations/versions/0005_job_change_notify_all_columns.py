"""jobs: NOTIFY on a change to any column a client sees, and on a job's artifacts, not only its progress

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 12:00:00

The API caches poll answers until the job's next notification (app/job_cache.py), so the notification must
cover everything the answer shows: the job's own public columns (0004 listed only those the worker moves;
an operator's UPDATE of labels or name went unnoticed) and its artifacts, which live in another table.
Heartbeats (lease_until, updated_at) still send nothing.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every column of jobs that the API's answer shows (app/services/job_reads.job_public).
PUBLIC = ("model_id", "method", "device", "config", "calibration_dataset_id", "training_dataset_id",
          "evaluation_dataset_id", "name", "labels", "status", "stage", "progress", "attempt", "error", "metrics",
          "created_at", "started_at", "finished_at", "duration_s")
WORKER_MOVED = ("status", "stage", "progress", "attempt", "error", "metrics", "started_at", "finished_at",
                "duration_s")


def _jobs_trigger(columns: Sequence[str]) -> str:
    changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns)
    return (f"CREATE TRIGGER jobs_notify_change AFTER UPDATE ON jobs FOR EACH ROW WHEN ({changed}) "
            "EXECUTE FUNCTION quantserve_notify_job_change()")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_change ON jobs")
    op.execute(_jobs_trigger(PUBLIC))
    op.execute("""
        CREATE FUNCTION quantserve_notify_artifact_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('quantserve_job_changes', COALESCE(NEW.job_id, OLD.job_id)::text);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER artifacts_notify_job_change AFTER INSERT OR UPDATE OR DELETE ON artifacts FOR EACH ROW
        EXECUTE FUNCTION quantserve_notify_artifact_change()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS artifacts_notify_job_change ON artifacts")
    op.execute("DROP FUNCTION IF EXISTS quantserve_notify_artifact_change()")
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_change ON jobs")
    op.execute(_jobs_trigger(WORKER_MOVED))
