"""Webhooks: a tenant's secret (made, rotated, described) and the completion event written with a job's end."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import webhooks
from app.broker import enqueue
from app.models import Job, JobLog, WebhookDelivery, WebhookSecret, utcnow
from worker import task_names

# A delivery's first message is in flight from the commit; the sweeper leaves it alone this long before it
# publishes it again (the broker lost it, or every worker thread was busy with long jobs).
DISPATCH_LEASE_S = 120.0


@dataclass(frozen=True)
class SecretInfo:
    prefix: str
    created_at: datetime
    secret: str | None = None  # only when just created: it is never shown again


def rotate_secret(session: Session, tenant_id: uuid.UUID, signing_key: bytes) -> SecretInfo:
    """A new secret for the tenant, replacing any old one at once; returned in the clear this one time."""
    salt = webhooks.new_salt()
    secret = webhooks.tenant_secret(signing_key, salt)
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        row = WebhookSecret(tenant_id=tenant_id)
        session.add(row)
    row.salt, row.key_fingerprint, row.prefix = salt, webhooks.key_fingerprint(signing_key), secret[:12]
    row.created_at = utcnow()
    session.flush()
    return SecretInfo(row.prefix, row.created_at, secret)


def describe_secret(session: Session, tenant_id: uuid.UUID) -> SecretInfo | None:
    row = session.get(WebhookSecret, tenant_id)
    return None if row is None else SecretInfo(row.prefix, row.created_at)


def secret_of(session: Session, tenant_id: uuid.UUID, signing_key: bytes) -> str:
    """The tenant's secret, derived again; ValueError when it has none or another signing key made it."""
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        raise ValueError("the tenant has no webhook secret (POST /v1/webhooks/secret)")
    if row.key_fingerprint != webhooks.key_fingerprint(signing_key):
        raise ValueError("this worker's QUANTSERVE_WEBHOOK_SIGNING_KEY is not the one the API used for this "
                         "tenant's secret; set the same key on the API and every worker")
    return webhooks.tenant_secret(signing_key, row.salt)


def has_secret(session: Session, tenant_id: uuid.UUID) -> bool:
    return session.get(WebhookSecret, tenant_id) is not None


def event_body(job: Any) -> str:
    """The JSON body: {type, timestamp, data}, as Standard Webhooks suggests; data is a short job summary."""
    data = {"job_id": str(job.id), "status": job.status, "error": job.error, "model_id": str(job.model_id),
            "method": job.method, "name": job.name, "labels": job.labels,
            "finished_at": job.finished_at.isoformat().replace("+00:00", "Z") if job.finished_at else None,
            "url": f"/v1/jobs/{job.id}"}
    return json.dumps({"type": f"job.{job.status}", "timestamp": utcnow().isoformat().replace("+00:00", "Z"),
                       "data": data}, separators=(",", ":"))


def enqueue_completion(session: Session, job_id: uuid.UUID) -> None:
    """In the transaction that ends the job: its event row and the outbox message that sends it.

    Columns are read with a Core select, not the identity map: the caller ended the job with an UPDATE
    statement, and a Job object loaded before it would still say `running`."""
    job = session.execute(select(Job.id, Job.tenant_id, Job.status, Job.error, Job.model_id, Job.method, Job.name,
                                 Job.labels, Job.finished_at, Job.callback_url).where(Job.id == job_id)).first()
    if job is None or not job.callback_url:
        return
    delivery = WebhookDelivery(tenant_id=job.tenant_id, job_id=job.id, url=job.callback_url, body=event_body(job),
                               status="pending", attempts=0, next_attempt_at=utcnow(),
                               lease_until=utcnow() + timedelta(seconds=DISPATCH_LEASE_S))
    session.add(delivery)
    session.flush()
    enqueue(session, task_names.DELIVER_WEBHOOK, [str(delivery.id), 1], task_names.WEBHOOK_QUEUE)
    session.add(JobLog(job_id=job.id, level="info",
                       message=f"webhook job.{job.status} queued for {webhooks.redacted(job.callback_url)}"))
