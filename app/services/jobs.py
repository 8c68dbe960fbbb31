"""Jobs: every check before queueing, idempotency, the outbox, cancel, logs."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.broker import enqueue
from app.errors import (
    ConflictError,
    DatasetMismatchError,
    MethodUnavailableError,
    ModelNotReadyError,
    NotFoundError,
    ValidationFailedError,
)
from app.ids import uuid7
from app.models import Artifact, Dataset, Job, JobLog, Model, utcnow
from app.schemas import JobCreate
from app.services import webhooks, workers
from app.services.common import tenant_get, tenant_select
from app.webhooks import TargetPolicy, TargetRefusedError
from worker import task_names
from worker.engine.config import MethodConfig
from worker.engine.errors import UnsupportedMethodError
from worker.engine.formats.layout import sample_shape_problem
from worker.engine.registry import MethodSpec, resolve

TERMINAL = ("succeeded", "failed", "cancelled")
DATASET_FIELDS = ("calibration_dataset_id", "training_dataset_id", "evaluation_dataset_id")


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit(session: Session, tenant_id: uuid.UUID, body: JobCreate, *, max_attempts: int,
           idempotency_key: str | None, worker_ttl_s: float,
           target_policy: TargetPolicy | None = None) -> tuple[Job, bool]:
    """Check, then write the job and its outbox row in the caller's transaction. Returns (job, created)."""
    digest = request_hash(body)
    if idempotency_key:
        existing = _find_by_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False

    model = tenant_get(session, Model, tenant_id, body.model_id, what="model")
    if body.callback_url is not None:
        _check_callback(session, tenant_id, body.callback_url, target_policy or TargetPolicy())
    live_workers = workers.live(session, worker_ttl_s)
    served = sorted({d for w in live_workers for d in workers.served_by(w)})
    spec = _resolve_spec(model, body, served)
    _check_device_served(body.device, served, any_live=bool(live_workers))
    config = _effective_config(spec, body.config, body.device)
    if model.status != "ready":
        raise ModelNotReadyError(f"model {model.id} is {model.status}; wait until it is ready",
                                 errors=[{"loc": ["body", "model_id"], "msg": f"model is {model.status}"}])
    datasets = _check_datasets(session, tenant_id, body, spec, model, config.required_datasets())
    for role in sorted(config.labelled_datasets()):
        dataset = datasets.get(f"{role}_dataset_id")
        if dataset is not None and not dataset.has_labels:
            raise DatasetMismatchError(
                f"{role}_dataset_id: these options need labels, and dataset {dataset.id} has none "
                "(add an integer 'labels' array, or use the default distillation loss)",
                errors=[{"loc": ["body", f"{role}_dataset_id"], "msg": "dataset has no labels"}])

    job = Job(id=uuid7(), tenant_id=tenant_id, model_id=model.id, method=spec.method.value, device=body.device,
              config=config.model_dump(mode="json"), name=body.name, labels=body.labels, callback_url=body.callback_url,
              idempotency_key=idempotency_key,
              request_hash=digest, max_attempts=max_attempts, status="queued", progress=0.0,
              **{f: (d.id if d else None) for f, d in datasets.items()})
    try:
        with session.begin_nested():  # a concurrent request with the same key loses here, not with a 500
            session.add(job)
            session.flush()
    except IntegrityError:
        existing = _find_by_key(session, tenant_id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key or ""), False
    enqueue(session, task_names.RUN_JOB, [str(job.id)], task_names.QUEUE_FOR_DEVICE[job.device])
    log(session, job.id, "info", f"queued: {model.format}/{spec.method.value} on {job.device}")
    return job, True


def _find_by_key(session: Session, tenant_id: uuid.UUID, key: str) -> Job | None:
    return session.scalar(tenant_select(Job, tenant_id).where(Job.idempotency_key == key))


def _replay(existing: Job, digest: str, key: str) -> Job:
    if existing.request_hash != digest:
        raise ConflictError(f"Idempotency-Key {key!r} was already used with a different request body")
    return existing


def _check_callback(session: Session, tenant_id: uuid.UUID, url: str, policy: TargetPolicy) -> None:
    """The target must be allowed now (it is checked again at each delivery: DNS may change), and the tenant
    must have a secret to sign with."""
    try:
        policy.resolve(url)
    except TargetRefusedError as exc:
        raise ValidationFailedError(f"callback_url: {exc}",
                                    errors=[{"loc": ["body", "callback_url"], "msg": str(exc)}]) from None
    if not webhooks.has_secret(session, tenant_id):
        why = "no webhook secret yet: create one with POST /v1/webhooks/secret, then submit again"
        raise ValidationFailedError(f"callback_url: {why}", errors=[{"loc": ["body", "callback_url"], "msg": why}])


def _served_text(device: str, served: list[str]) -> str:
    return f"no live worker serves device {device!r}; served: {', '.join(served) or 'none (no worker is running)'}"


def _check_device_served(device: str, served: list[str], *, any_live: bool) -> None:
    """Refuse a device no live worker serves, naming those that are served.

    No live worker at all is "unknown", not "nothing served": `quantserve serve` starts its worker right after
    the API, a worker publishes its devices a few seconds later (a gpu worker probes CUDA first), and in
    production every worker may be restarting at once. A cpu job then waits in the queue like any other, as a
    user expects of the default device; any other device needs a live worker that has proved it has one.
    """
    if device in served or (device == "cpu" and not any_live):
        return
    raise ValidationFailedError(_served_text(device, served),
                                errors=[{"loc": ["body", "device"], "msg": _served_text(device, served)}])


def _resolve_spec(model: Model, body: JobCreate, served: list[str]) -> MethodSpec:
    try:
        spec = resolve(model.format, body.method)
    except UnsupportedMethodError as exc:
        supported = [p for p in exc.supported if p.startswith(f"{model.format}/")]
        raise MethodUnavailableError(
            f"method {body.method!r} is not supported for {model.format} models; supported for "
            f"{model.format}: {', '.join(supported) or 'none yet'}; all: {', '.join(exc.supported)}",
            errors=[{"loc": ["body", "method"], "msg": f"not supported for format {model.format}"}],
            supported=exc.supported) from None
    if body.device not in {d.value for d in spec.devices}:
        also = "" if body.device in served else f" ({_served_text(body.device, served)})"
        raise MethodUnavailableError(
            f"{model.format}/{body.method} runs on {', '.join(sorted(d.value for d in spec.devices))}, "
            f"not {body.device}{also}", errors=[{"loc": ["body", "device"], "msg": f"{body.device} not available"}])
    return spec


def _effective_config(spec: MethodSpec, raw: dict[str, Any], device: str) -> MethodConfig:
    try:
        config = spec.config_model.model_validate(raw)
    except ValidationError as exc:
        errors = [{"loc": ["body", "config", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"config.{'.'.join(str(p) for p in e['loc'][2:])}: {e['msg']}" for e in errors)
        raise ValidationFailedError(detail, errors=errors) from None
    problems = spec.config_problems(config, device)  # the device was checked against the spec already
    if problems:
        raise ValidationFailedError("; ".join(f"config.{field}: {why}" for field, why in problems),
                                    errors=[{"loc": ["body", "config", field], "msg": why} for field, why in problems])
    return config


def _check_datasets(session: Session, tenant_id: uuid.UUID, body: JobCreate, spec: MethodSpec,
                    model: Model, required: set[str]) -> dict[str, Dataset | None]:
    if (spec.needs_calibration or "calibration" in required) and body.calibration_dataset_id is None:
        raise ValidationFailedError(f"{spec.method.value} with these options needs calibration_dataset_id",
                                    errors=[{"loc": ["body", "calibration_dataset_id"], "msg": "required"}])
    if spec.needs_training and body.training_dataset_id is None:
        raise ValidationFailedError(f"{spec.method.value} needs training_dataset_id",
                                    errors=[{"loc": ["body", "training_dataset_id"], "msg": "required"}])
    signature_unknown = any(i["dtype"] in ("unknown", "") or not i["shape"] for i in model.inputs or [])
    if signature_unknown and not (body.evaluation_dataset_id or body.calibration_dataset_id):
        raise ValidationFailedError(
            f"this {model.format} model does not record its input shapes, so quantserve cannot generate test "
            "inputs to measure it: give evaluation_dataset_id (or calibration_dataset_id)",
            errors=[{"loc": ["body", "evaluation_dataset_id"], "msg": "required: the model has no input shapes"}])
    found: dict[str, Dataset | None] = {}
    for field in DATASET_FIELDS:
        dataset_id = getattr(body, field)
        if dataset_id is None:
            found[field] = None
            continue
        dataset = session.scalar(tenant_select(Dataset, tenant_id).where(Dataset.id == dataset_id))
        loc = ["body", field]
        if dataset is None:
            raise ValidationFailedError(f"{field}: no dataset with id {dataset_id}",
                                        errors=[{"loc": loc, "msg": "no such dataset"}])
        if dataset.status != "ready":
            raise ValidationFailedError(f"{field}: dataset {dataset_id} is {dataset.status}",
                                        errors=[{"loc": loc, "msg": f"dataset is {dataset.status}"}])
        problem = dataset_mismatch(model, dataset)
        if problem:
            raise DatasetMismatchError(f"{field}: {problem}", errors=[{"loc": loc, "msg": problem}])
        found[field] = dataset
    return found


def dataset_mismatch(model: Model, dataset: Dataset) -> str | None:
    """Why a dataset cannot feed a model (names, dtypes, trailing shapes), or None if it can."""
    if dataset.kind == "text":
        return None if model.format == "hf" else f"a text dataset needs an hf model, this one is {model.format}"
    arrays = {k: v for k, v in (dataset.arrays or {}).items() if k != "labels"}
    inputs = [i for i in model.inputs or [] if not i.get("optional") or i["name"] in arrays]
    if len(inputs) == 1 and len(arrays) == 1:
        pairs = [(inputs[0], next(iter(arrays.items())))]
    else:
        missing = [i["name"] for i in inputs if i["name"] not in arrays]
        if missing:
            return f"the model's inputs {missing} have no array of that name (dataset has {sorted(arrays)})"
        pairs = [(i, (i["name"], arrays[i["name"]])) for i in inputs]
    for spec, (array_name, array) in pairs:
        if spec["dtype"] in ("unknown", "") or not spec["shape"]:
            continue  # the format carries no signature (TorchScript): the engine checks at run time
        # the array's first axis is the batch axis, or it stacks whole samples (one dimension more)
        shape_ok = sample_shape_problem(spec["shape"], array["shape"]) is None
        if spec["dtype"] != array["dtype"] or not shape_ok:
            fmt = ", ".join(str(d) if isinstance(d, int) else "?" for d in spec["shape"])
            return (f"input {spec['name']!r} expects {spec['dtype']}[{fmt}]; dataset array {array_name!r} is "
                    f"{array['dtype']}{list(array['shape'])}")
    return None


def cancel(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = tenant_get(session, Job, tenant_id, job_id, what="job")
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.status.in_(("queued", "running")))
        .values(status="cancelled", finished_at=utcnow(), lease_until=None)
    )
    if not result.rowcount:
        raise ConflictError(f"job {job_id} already ended as {job.status}; only queued or running jobs can be cancelled")
    log(session, job.id, "info", "cancelled by the user")
    webhooks.enqueue_completion(session, job.id)
    session.refresh(job)
    return job


def log(session: Session, job_id: uuid.UUID, level: str, message: str) -> None:
    session.add(JobLog(job_id=job_id, level=level, message=message))


def logs(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, since: int, limit: int) -> list[JobLog]:
    tenant_get(session, Job, tenant_id, job_id, what="job")
    stmt = select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id).offset(since).limit(limit)
    return list(session.scalars(stmt))


def artifacts_of(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Artifact]]:
    out: dict[uuid.UUID, list[Artifact]] = {i: [] for i in job_ids}
    if job_ids:
        for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.id)):
            out[a.job_id].append(a)
    return out


def report_artifact(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, kind: str) -> Artifact:
    """The job's report artifact of this kind (report, report_html). A job that failed as target_not_met keeps
    its best candidate's report, so what counts is whether one was stored, not the status."""
    job = tenant_get(session, Job, tenant_id, job_id, what="job")
    found = next((a for a in artifacts_of(session, [job.id])[job.id] if a.kind == kind), None)
    if found is not None:
        return found
    if job.status != "succeeded":
        raise ConflictError(f"job {job_id} is {job.status} and has no report; a report exists once it has "
                            "succeeded, or failed as target_not_met with its best candidate")
    hint = f"; its report.json is at /v1/jobs/{job_id}/report" if kind == "report_html" else ""
    raise NotFoundError(f"job {job_id} has no {'report.html' if kind == 'report_html' else 'report'}{hint}")
