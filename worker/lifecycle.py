"""A job attempt's life in the database: claim, heartbeat, progress, finish or fail; the reaper.

Every write of an attempt carries `WHERE attempt = :mine AND status = 'running'` (a fencing token),
so a stale or cancelled attempt can never overwrite what a newer one or the user decided.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.broker import enqueue
from app.db import transaction
from app.models import Artifact, Dataset, Job, JobLog, Model, utcnow
from app.services.webhooks import enqueue_completion
from worker import task_names

log = logging.getLogger("quantserve.worker")


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    tenant_id: uuid.UUID
    attempt: int
    method: str
    device: str
    config: dict[str, Any]
    model_format: str
    model_name: str
    model_key: str
    dataset_keys: dict[str, str]  # calibration|training|evaluation -> storage key
    job_name: str | None = None  # shown in report.html


def claim(factory: sessionmaker[Session], job_id: uuid.UUID, worker: str, lease_s: float) -> Claim | None:
    """Take a queued job; None when it is gone, cancelled or already taken (a redelivered message)."""
    with transaction(factory) as session:
        now = utcnow()
        row = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", attempt=Job.attempt + 1, lease_until=now + timedelta(seconds=lease_s),
                    worker=worker, stage="loading", progress=0.0, started_at=now)
            .returning(Job.attempt)
        ).first()
        if row is None:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        model = session.get(Model, job.model_id)
        if model is None:
            _fail_in(session, job_id, row.attempt, "invalid_input", "the job's model was deleted",
                     reason="model_deleted")
            return None
        keys = {}
        for role in ("calibration", "training", "evaluation"):
            dataset_id = getattr(job, f"{role}_dataset_id")
            if dataset_id is not None:
                dataset = session.get(Dataset, dataset_id)
                if dataset is None:
                    _fail_in(session, job_id, row.attempt, "invalid_input", f"the {role} dataset was deleted",
                             reason="dataset_deleted")
                    return None
                keys[role] = dataset.storage_key
        session.add(JobLog(job_id=job_id, level="info", message=f"attempt {row.attempt} started on {worker}"))
        return Claim(job_id, job.tenant_id, row.attempt, job.method, job.device, dict(job.config), model.format,
                     model.name, model.storage_key, keys, job.name)


def _mine(job_id: uuid.UUID, attempt: int):
    return (Job.id == job_id, Job.attempt == attempt, Job.status == "running")


def heartbeat(factory: sessionmaker[Session], job_id: uuid.UUID, attempt: int, lease_s: float) -> bool:
    """Extend the lease; False when the attempt must stop (cancelled, reaped, or superseded)."""
    with transaction(factory) as session:
        result = session.execute(update(Job).where(*_mine(job_id, attempt))
                                 .values(lease_until=utcnow() + timedelta(seconds=lease_s)))
        return bool(result.rowcount)


def report_progress(factory: sessionmaker[Session], job_id: uuid.UUID, attempt: int, stage: str,
                    progress: float, lines: list[tuple[str, str]] = ()) -> None:
    """Stage, progress and new log lines in one transaction."""
    with transaction(factory) as session:
        # progress never goes backwards within an attempt
        session.execute(update(Job).where(*_mine(job_id, attempt), Job.progress <= progress)
                        .values(stage=stage, progress=min(max(progress, 0.0), 1.0)))
        session.add_all(JobLog(job_id=job_id, level=level, message=message[:4000]) for level, message in lines)


@dataclass(frozen=True)
class StoredArtifact:
    kind: str
    filename: str
    format: str | None
    size_bytes: int
    sha256: str
    storage_key: str


def finish(factory: sessionmaker[Session], claim_: Claim, artifacts: list[StoredArtifact],
           metrics: dict[str, Any], *, error: dict[str, Any] | None = None) -> bool:
    """Artifacts, metrics and status in one transaction; False if this attempt no longer owns the job.

    With `error` (target_not_met) the job fails, and its artifacts (the best candidate) and metrics stay."""
    with transaction(factory) as session:
        job = session.get(Job, claim_.job_id)
        now = utcnow()
        size, fidelity, latency = (metrics.get(k) or {} for k in ("size", "fidelity", "latency"))
        started = job.started_at if job and job.started_at else now
        result = session.execute(update(Job).where(*_mine(claim_.job_id, claim_.attempt)).values(
            status="failed" if error else "succeeded", error=error, stage=None, progress=1.0, finished_at=now,
            lease_until=None, metrics=metrics,
            duration_s=round((now - started).total_seconds(), 3),
            original_bytes=size.get("original_bytes"), quantized_bytes=size.get("quantized_bytes"),
            size_ratio=size.get("ratio"), sqnr_db=fidelity.get("sqnr_db"), cosine=fidelity.get("cosine"),
            top1_agreement=fidelity.get("top1_agreement"), speedup=latency.get("speedup")))
        if not result.rowcount:
            return False
        session.add_all(Artifact(tenant_id=claim_.tenant_id, job_id=claim_.job_id, kind=a.kind, filename=a.filename,
                                 format=a.format, size_bytes=a.size_bytes, sha256=a.sha256,
                                 storage_key=a.storage_key) for a in artifacts)
        session.add(JobLog(job_id=claim_.job_id, level="error" if error else "info",
                           message=f"failed ({error['code']}): {error['message']}" if error else "succeeded"))
        enqueue_completion(session, claim_.job_id)  # the webhook commits with the status, or not at all
        return True


def fail(factory: sessionmaker[Session], job_id: uuid.UUID, attempt: int, code: str, message: str, *,
         reason: str | None = None) -> bool:
    with transaction(factory) as session:
        return _fail_in(session, job_id, attempt, code, message, reason=reason)


def _fail_in(session: Session, job_id: uuid.UUID, attempt: int, code: str, message: str, *,
             reason: str | None = None) -> bool:
    """The job's error is {"code", "message", "reason"}: code from API.md, reason the finer cause (or null)."""
    result = session.execute(update(Job).where(*_mine(job_id, attempt)).values(
        status="failed", error={"code": code, "message": message, "reason": reason}, finished_at=utcnow(),
        lease_until=None))
    if result.rowcount:
        why = f"{code}, {reason}" if reason else code
        session.add(JobLog(job_id=job_id, level="error", message=f"failed ({why}): {message}"))
        enqueue_completion(session, job_id)
    return bool(result.rowcount)


def reap(factory: sessionmaker[Session]) -> int:
    """Requeue running jobs whose lease expired (their worker died), or fail them after max_attempts."""
    reaped = 0
    with transaction(factory) as session:
        stale = session.execute(select(Job.id, Job.attempt, Job.max_attempts, Job.device)
                                .where(Job.status == "running", Job.lease_until < utcnow()).limit(100)).all()
        for job_id, attempt, max_attempts, device in stale:
            if attempt >= max_attempts:
                _fail_in(session, job_id, attempt, "worker_lost",
                         f"the worker running this job stopped responding {attempt} times; giving up",
                         reason="lease_expired")
            else:
                result = session.execute(update(Job).where(*_mine(job_id, attempt)).values(
                    status="queued", stage=None, progress=0.0, lease_until=None, worker=None))
                if not result.rowcount:
                    continue
                session.add(JobLog(job_id=job_id, level="warning",
                                   message=f"attempt {attempt} lost its worker; requeued"))
                enqueue(session, task_names.RUN_JOB, [str(job_id)], task_names.QUEUE_FOR_DEVICE[device])
            reaped += 1
    if reaped:
        log.warning("reaped %d job(s) with expired leases", reaped)
    return reaped


def redispatch_stale(factory: sessionmaker[Session], after_s: float) -> int:
    """Publish again any job still queued, or upload still validating, after `after_s`: its message was
    lost (a Redis restart without persistence, a purged queue). A surplus copy finds nothing to do."""
    cutoff = utcnow() - timedelta(seconds=after_s)
    with transaction(factory) as session:
        stale = session.execute(select(Job.id, Job.device).where(Job.status == "queued", Job.updated_at < cutoff)
                                .limit(100)).all()
        for job_id, device in stale:
            session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(updated_at=utcnow()))
            enqueue(session, task_names.RUN_JOB, [str(job_id)], task_names.QUEUE_FOR_DEVICE[device])
        count = len(stale)
        for row_type, task in ((Model, task_names.VALIDATE_MODEL), (Dataset, task_names.VALIDATE_DATASET)):
            last_sent = func.coalesce(row_type.dispatched_at, row_type.created_at)
            ids = session.scalars(select(row_type.id).where(row_type.status == "validating", last_sent < cutoff)
                                  .limit(100)).all()
            for row_id in ids:
                session.execute(update(row_type).where(row_type.id == row_id).values(dispatched_at=utcnow()))
                enqueue(session, task, [str(row_id)], task_names.VALIDATION_QUEUE)
            count += len(ids)
    if count:
        log.warning("re-published %d task(s) still waiting after %.0f s", count, after_s)
    return count
