"""Jobs and artifacts: submit, list, get, cancel, logs, report, downloads; HTTP only."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from anyio import from_thread
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.errors import NotFoundError
from app.models import Artifact, Job
from app.routes import webhooks
from app.routes.downloads import Redirect, file_response
from app.schemas import ArtifactPublic, JobCreate, JobPublic, LogLine, Page
from app.services import job_reads, jobs
from app.services.common import paginate, tenant_get, tenant_select
from app.services.job_reads import artifact_public, job_public

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": d, "content": {"application/problem+json": {}}}
    for code, d in ((400, "Malformed"), (401, "No key"), (404, "Not found"), (409, "Conflict"), (422, "Invalid"),
                    (503, "Database unreachable or saturated; with Retry-After"))
}
WAIT_DOC = ("Long poll: answer as soon as the job's status, stage or progress (or anything else shown) differs from "
            "the ETag in If-None-Match, or from the job as it was when asked, or after this many seconds (at most 60)."
            " A poll that ends with nothing changed answers 304 when If-None-Match was sent, else 200.")
router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)


@router.post("/jobs", status_code=202, response_model=JobPublic,
             responses={200: {"model": JobPublic, "description": "Replay of an Idempotency-Key"}})
def submit_job(body: JobCreate, response: Response, session: SessionDep, tenant_id: TenantDep,
               settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    job, created = jobs.submit(session, tenant_id, body, max_attempts=settings.job_max_attempts,
                               idempotency_key=idempotency_key, worker_ttl_s=settings.worker_ttl_s,
                               target_policy=settings.webhook_policy())
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


@router.get("/jobs/{job_id}", response_model=JobPublic,
            responses={200: {"headers": {"ETag": {"description": "Changes whenever the answer does",
                                                  "schema": {"type": "string"}}}},
                       304: {"description": "Not modified: If-None-Match holds the current ETag"}})
async def get_job(job_id: uuid.UUID, request: Request, tenant_id: TenantDep,
                  wait: Annotated[int, Query(ge=0, le=60, description=WAIT_DOC)] = 0,
                  if_none_match: Annotated[str | None, Header(max_length=1024)] = None) -> Response:
    """The job, from one indexed read on the async engine: pipelines poll this, so it holds no thread."""
    state = request.app.state
    if wait:
        known = None if not if_none_match or if_none_match.strip() == "*" else if_none_match.split(",")[0].strip()
        view = await job_reads.wait_for_change(state.read_engine, state.job_events, tenant_id, job_id,
                                               known_etag=known.removeprefix("W/") if known else None, wait_s=wait)
    else:
        view = await job_reads.read(state.read_engine, tenant_id, job_id, state.job_events.answers)
    if view is None:
        raise NotFoundError(f"no job with id {job_id}")
    if job_reads.etag_matches(if_none_match, view.etag):
        return Response(status_code=304, headers={"ETag": view.etag})
    return Response(view.body, media_type="application/json", headers={"ETag": view.etag})


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: uuid.UUID, request: Request, session: SessionDep, tenant_id: TenantDep) -> Any:
    job = jobs.cancel(session, tenant_id, job_id)
    # This process's cached poll answer goes now, not when the commit's notification comes back: a client
    # that polls right after its cancel must see it. The cache lives on the event loop's thread.
    from_thread.run_sync(request.app.state.job_events.answers.invalidate, job_id)
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
    report = jobs.report_artifact(session, tenant_id, job_id, "report")
    with storage.open(report.storage_key) as fh:
        return JSONResponse(json.load(fh))


@router.get("/artifacts/{artifact_id}", response_model=ArtifactPublic, tags=["artifacts"])
def get_artifact(artifact_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> Any:
    return artifact_public(tenant_get(session, Artifact, tenant_id, artifact_id, what="artifact"))


@router.get("/artifacts/{artifact_id}/download", tags=["artifacts"], response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial"},
                       304: {"description": "Not modified"}, 416: {"description": "Bad range"}})
def download_artifact(artifact_id: uuid.UUID, request: Request, session: SessionDep, tenant_id: TenantDep,
                      storage: StorageDep, redirect: Redirect = False) -> Response:
    artifact = tenant_get(session, Artifact, tenant_id, artifact_id, what="artifact")
    return file_response(request, storage, artifact.storage_key, size=artifact.size_bytes, sha256=artifact.sha256,
                         filename=artifact.filename, redirect=redirect)



# The webhook secret signs jobs' callbacks, so its routes join this router, and with it app.main.ROUTERS (which
# the tenant walk reads); an included sub-router would be invisible there (FastAPI includes them lazily).
for _route in webhooks.ROUTES:
    router.add_api_route(**_route)
