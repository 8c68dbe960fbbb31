"""Models and datasets: store the bytes, detect the format, create the row, queue validation."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.broker import enqueue
from app.errors import ConflictError, UnsupportedFormatError, ValidationFailedError
from app.models import Dataset, Job, Model
from app.names import default_name
from app.storage import PendingFile, Storage
from worker import task_names
from worker.engine.errors import UnknownFormatError
from worker.engine.formats.detect import detect_dataset_kind, detect_model_format
from worker.engine.types import ModelFormat

ACTIVE_JOB_STATES = ("queued", "running")


def upload_key(noun: str, row_id: uuid.UUID) -> str:
    """Where an uploaded model or dataset lives in the store."""
    return f"{noun}s/{row_id}/original"


def create_model(session: Session, storage: Storage, tenant_id: uuid.UUID, pending: PendingFile, *,
                 row_id: uuid.UUID, name: str | None, filename: str | None, declared: str | None) -> Model:
    try:
        detected = detect_model_format(pending.path)
    except UnknownFormatError as exc:
        raise UnsupportedFormatError(str(exc)) from None
    if declared:
        try:
            declared_format = ModelFormat(declared)
        except ValueError:
            raise ValidationFailedError(
                f"format must be one of {', '.join(f.value for f in ModelFormat)}",
                errors=[{"loc": ["query", "format"], "msg": "unknown format"}]) from None
        if declared_format != detected:
            raise UnsupportedFormatError(f"the bytes are a {detected.value} model, not {declared_format.value}")
    model_id = row_id  # chosen with the upload, so an S3 upload is written at its final key (upload_key)
    model = Model(id=model_id, tenant_id=tenant_id, name=name or default_name(filename, "model"),
                  format=detected.value, size_bytes=pending.size, sha256=pending.sha256,
                  storage_key=upload_key("model", model_id))
    session.add(model)
    session.flush()  # the row first: if it cannot be written, no file is left in the store
    storage.commit(pending, model.storage_key)
    enqueue(session, task_names.VALIDATE_MODEL, [str(model.id)], task_names.VALIDATION_QUEUE)
    return model


def create_dataset(session: Session, storage: Storage, tenant_id: uuid.UUID, pending: PendingFile, *,
                   row_id: uuid.UUID, name: str | None, filename: str | None, declared: str | None) -> Dataset:
    try:
        kind = detect_dataset_kind(pending.path)
    except UnknownFormatError as exc:
        raise UnsupportedFormatError(str(exc)) from None
    if declared and declared != kind.value:
        raise UnsupportedFormatError(f"the bytes are a {kind.value} dataset, not {declared}")
    dataset_id = row_id
    dataset = Dataset(id=dataset_id, tenant_id=tenant_id, name=name or default_name(filename, "dataset"),
                      kind=kind.value, size_bytes=pending.size, sha256=pending.sha256,
                      storage_key=upload_key("dataset", dataset_id))
    session.add(dataset)
    session.flush()
    storage.commit(pending, dataset.storage_key)
    enqueue(session, task_names.VALIDATE_DATASET, [str(dataset.id)], task_names.VALIDATION_QUEUE)
    return dataset


def ensure_unused(session: Session, model_or_dataset: Any) -> None:
    """A model or dataset that a queued or running job reads cannot be deleted (409)."""
    is_model = isinstance(model_or_dataset, Model)
    cols = (Job.model_id,) if is_model else (Job.calibration_dataset_id, Job.training_dataset_id,
                                             Job.evaluation_dataset_id)
    for col in cols:
        job_id = session.scalar(select(Job.id).where(col == model_or_dataset.id,
                                                     Job.status.in_(ACTIVE_JOB_STATES)).limit(1))
        if job_id is not None:
            what = "model" if is_model else "dataset"
            raise ConflictError(f"this {what} is used by job {job_id}, which is still queued or running; "
                                "cancel it or wait for it to finish")

