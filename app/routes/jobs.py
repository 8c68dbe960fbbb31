"""Jobs and artifacts: submit, list, get, cancel, logs, report, downloads; HTTP only."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.errors import ConflictError, NotFoundError
from app.models import Artifact, Job
from app.routes.downloads import file_response
from app.schemas import ArtifactPublic, JobCreate, JobPublic, LogLine, Page
from app.services import jobs
from app.services.common import paginate, tenant_get, tenant_select

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": d, "content": {"application/problem+json": {}}}
    for code, d in ((400, "Malformed"), (401, "No key"), (404, "Not found"), (409, "Conflict"), (422, "Invalid"))
}
router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)


def artifact_public(a: Artifact) -> dict[str, Any]:
    return {"id": a.id, "job_id": a.job_id, "kind": a.kind, "filename": a.filename, "format": a.format,
            "size_bytes": a.size_bytes, "sha256": a.sha256, "created_at": a.created_at,
            "download_url": f"/v1/artifacts/{a.id}/download"}


def job_public(job: Job, artifacts: list[Artifact]) -> dict[str, Any]:
    return {
        "id": job.id, "model_id": job.model_id, "method": job.method, "device": job.device, "config": job.config,
        "calibration_dataset_id": job.calibration_dataset_id, "training_dataset_id": job.training_dataset_id,
        "evaluation_dataset_id": job.evaluation_dataset_id, "name": job.name, "labels": job.labels,
        "status": job.status, "stage": job.stage if job.status == "running" else None,
        "progress": job.progress, "attempts": job.attempt, "error": job.error, "metrics": job.metrics,
        "artifacts": [artifact_public(a) for a in artifacts], "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "duration_s": job.duration_s,
    }


@router.post("/jobs", status_code=202, response_model=JobPublic,
             responses={200: {"model": JobPublic, "description": "Replay of an Idempotency-Key"}})
def submit_job(body: JobCreate, response: Response, session: SessionDep, tenant_id: TenantDep,
               settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    job, created = jobs.submit(session, tenant_id, body, max_attempts=settings.job_max_attempts,
                               idempotency_key=idempotency_key, worker_ttl_s=settings.worker_ttl_s)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job, jobs.artifacts_of(session, [job.id])[job.id])


@router.get("/jobs", response_model=Page[JobPublic])
def list_jobs(session: SessionDep, tenant_id: TenantDep, status: str | None = None,
              model_id: uuid.UUID | None = None, limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: str | None = None) -> Any:
    stmt = tenant_select(Job, tenant_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if model_id:
        stmt = stmt.where(Job.model_id == model_id)
    items, next_cursor = paginate(session, stmt, Job, limit=limit, cursor=cursor)
    arts = jobs.artifacts_of(session, [j.id for j in items])
    return {"items": [job_public(j, arts[j.id]) for j in items], "next_cursor": next_cursor}


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> Any:
    job = tenant_get(session, Job, tenant_id, job_id, what="job")
    return job_public(job, jobs.artifacts_of(session, [job.id])[job.id])


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> Any:
    job = jobs.cancel(session, tenant_id, job_id)
    return job_public(job, jobs.artifacts_of(session, [job.id])[job.id])


@router.get("/jobs/{job_id}/logs", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {"schema": LogLine.model_json_schema()}}}})
def job_logs(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep,
             since: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> Response:
    lines = jobs.logs(session, tenant_id, job_id, since, limit)
    body = "".join(
        json.dumps({"seq": since + i, "ts": line.ts.isoformat().replace("+00:00", "Z"), "level": line.level,
                    "message": line.message}) + "\n"
        for i, line in enumerate(lines))
    return Response(body, media_type="application/x-ndjson")


@router.get("/jobs/{job_id}/report")
def job_report(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep, storage: StorageDep) -> Any:
    job = tenant_get(session, Job, tenant_id, job_id, what="job")
    if job.status != "succeeded":
        raise ConflictError(f"job {job_id} is {job.status}; a report exists once it has succeeded")
    report = next((a for a in jobs.artifacts_of(session, [job.id])[job.id] if a.kind == "report"), None)
    if report is None:
        raise NotFoundError(f"job {job_id} has no report")
    with storage.open(report.storage_key) as fh:
        return JSONResponse(json.load(fh))


@router.get("/artifacts/{artifact_id}", response_model=ArtifactPublic, tags=["artifacts"])
def get_artifact(artifact_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> Any:
    return artifact_public(tenant_get(session, Artifact, tenant_id, artifact_id, what="artifact"))


@router.get("/artifacts/{artifact_id}/download", tags=["artifacts"], response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial"},
                       304: {"description": "Not modified"}, 416: {"description": "Bad range"}})
def download_artifact(artifact_id: uuid.UUID, request: Request, session: SessionDep, tenant_id: TenantDep,
                      storage: StorageDep) -> Response:
    artifact = tenant_get(session, Artifact, tenant_id, artifact_id, what="artifact")
    return file_response(request, storage, artifact.storage_key, size=artifact.size_bytes, sha256=artifact.sha256,
                         filename=artifact.filename)
