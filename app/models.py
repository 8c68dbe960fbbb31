"""SQLAlchemy 2 typed models: tenants, keys, models, datasets, jobs, logs, artifacts, outbox, workers, webhooks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, Uuid

from app.ids import uuid7

JSONType = JSON().with_variant(JSONB(), "postgresql")

# Named constraints so Alembic's batch mode can alter tables on SQLite too.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on every backend: SQLite hands back naive datetimes otherwise."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType, uuid.UUID: Uuid()}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # shown in `keys list`, used to revoke
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the key itself is never stored
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class _Upload:
    """Columns shared by uploaded models and datasets."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="validating")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When its validation task was last published; a sweeper re-publishes one that stays validating.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Model(_Upload, Base):
    __tablename__ = "models"
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(32))
    inputs: Mapped[list[Any] | None] = mapped_column(JSONType)
    outputs: Mapped[list[Any] | None] = mapped_column(JSONType)
    num_parameters: Mapped[int | None] = mapped_column(BigInteger)
    architecture: Mapped[str | None] = mapped_column(String(200))
    __table_args__ = (Index("ix_models_tenant_created", "tenant_id", "id"),)


class Dataset(_Upload, Base):
    __tablename__ = "datasets"
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    num_samples: Mapped[int | None] = mapped_column(Integer)
    arrays: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    has_labels: Mapped[bool | None] = mapped_column()
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "id"),)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # No foreign keys to models/datasets: deleting an input keeps the history of the jobs that used it.
    model_id: Mapped[uuid.UUID] = mapped_column(index=True)
    method: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(16), default="cpu")
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    calibration_dataset_id: Mapped[uuid.UUID | None] = mapped_column()
    training_dataset_id: Mapped[uuid.UUID | None] = mapped_column()
    evaluation_dataset_id: Mapped[uuid.UUID | None] = mapped_column()
    name: Mapped[str | None] = mapped_column(String(200))
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    callback_url: Mapped[str | None] = mapped_column(String(2048))  # POSTed to when the job ends (webhooks)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # fencing token: bumped by each claim
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Headline numbers, also in metrics, as columns so they can be queried and compared.
    original_bytes: Mapped[int | None] = mapped_column(BigInteger)
    quantized_bytes: Mapped[int | None] = mapped_column(BigInteger)
    size_ratio: Mapped[float | None] = mapped_column(Float)
    sqnr_db: Mapped[float | None] = mapped_column(Float)
    cosine: Mapped[float | None] = mapped_column(Float)
    top1_agreement: Mapped[float | None] = mapped_column(Float)
    speedup: Mapped[float | None] = mapped_column(Float)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_s: Mapped[float | None] = mapped_column(Float)
    __table_args__ = (
        Index("uq_jobs_tenant_idempotency_key", "tenant_id", "idempotency_key", unique=True),
        Index("ix_jobs_tenant_created", "tenant_id", "id"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
    )


class JobLog(Base):
    __tablename__ = "job_logs"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    __table_args__ = (Index("ix_job_logs_job_id_id", "job_id", "id"),)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str | None] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Outbox(Base):
    """Tasks to publish once their transaction commits; a sweeper re-sends what is left."""

    __tablename__ = "outbox"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    task_name: Mapped[str] = mapped_column(String(200))
    args: Mapped[list[Any]] = mapped_column(JSONType)
    queue: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Worker(Base):
    """A worker process and what it serves, written by the worker itself; live while last_seen is recent."""

    __tablename__ = "workers"
    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's node name, name@host
    queues: Mapped[list[Any]] = mapped_column(JSONType)  # the queues it consumes: cpu, gpu
    devices: Mapped[dict[str, Any]] = mapped_column(JSONType)  # device -> {name, flags, ...} it really has
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSONType)  # served device -> ["format/method", ...]
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class WebhookSecret(Base):
    """A tenant's webhook secret, as a salt: the secret is HMAC(signing key, salt) and is never stored."""

    __tablename__ = "webhook_secrets"
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    salt: Mapped[str] = mapped_column(String(64))
    key_fingerprint: Mapped[str] = mapped_column(String(16))  # which signing key derived it (a mismatch is logged)
    prefix: Mapped[str] = mapped_column(String(16))  # the secret's first characters, shown to tell secrets apart
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event for one job's callback_url; its id is the webhook-id, the same on every attempt."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    body: Mapped[str] = mapped_column(Text)  # frozen at the event: every attempt signs the same bytes
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # fencing token, as jobs.attempt
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # While a message for it is in flight (queued or being sent), the sweeper leaves it alone.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)
