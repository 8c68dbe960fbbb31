"""GET /v1/jobs/{id}/report.html: the page the worker built for a succeeded job; HTTP only."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from app.deps import SessionDep, StorageDep, TenantDep
from app.errors import ConflictError, NotFoundError
from app.models import Job
from app.services import jobs
from app.services.common import tenant_get

# The page is built from names the user chose (model, job, layers): whatever escaping missed, no script runs and
# nothing loads from anywhere. Same policy as the page's own <meta> (worker/engine/report_html.py; a unit test
# keeps the two equal); frame-ancestors exists only as a header.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": d, "content": {"application/problem+json": {}}}
    for code, d in ((401, "No key"), (404, "No such job, or it has no report.html"),
                    (409, "The job has not succeeded"), (422, "Invalid id or header"),
                    (503, "Database unreachable or saturated; with Retry-After"))
}
router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)


@router.get("/jobs/{job_id}/report.html", response_class=Response,
            responses={200: {"content": {"text/html": {}}, "description": "A self-contained page: inline CSS and "
                             "SVG charts, no script"}, 304: {"description": "Not modified"}})
def job_report_html(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep, storage: StorageDep,
                    if_none_match: Annotated[str | None, Header(max_length=1024)] = None) -> Response:
    job = tenant_get(session, Job, tenant_id, job_id, what="job")
    if job.status != "succeeded":
        raise ConflictError(f"job {job_id} is {job.status}; a report exists once it has succeeded")
    page = next((a for a in jobs.artifacts_of(session, [job.id])[job.id] if a.kind == "report_html"), None)
    if page is None:  # a job that finished before reports had pages, or whose page could not be drawn
        raise NotFoundError(f"job {job_id} has no report.html; its report.json is at /v1/jobs/{job_id}/report")
    etag = f'"{page.sha256}"'
    headers = {"ETag": etag, "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "private, no-cache"}
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    with storage.open(page.storage_key) as fh:  # a page is tens of kB: read whole, no stream needed
        body = fh.read()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)
