"""GET /v1/jobs/{id}/report.html: the page the worker built for a job that delivered a model; HTTP only."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from app.deps import SessionDep, StorageDep, TenantDep
from app.services import jobs

# The page is built from names the user chose (model, job, layers): whatever escaping missed, no script runs and
# nothing loads from anywhere. Same policy as the page's own <meta> (worker/engine/report_html.py; a unit test
# keeps the two equal); frame-ancestors exists only as a header.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": d, "content": {"application/problem+json": {}}}
    for code, d in ((401, "No key"), (404, "No such job, or it has no report.html"),
                    (409, "The job has no report: it has not succeeded (nor failed as target_not_met)"),
                    (422, "Invalid id or header"),
                    (503, "Database unreachable or saturated; with Retry-After"))
}
router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)


@router.get("/jobs/{job_id}/report.html", response_class=Response,
            responses={200: {"content": {"text/html": {}}, "description": "A self-contained page: inline CSS and "
                             "SVG charts, no script"}, 304: {"description": "Not modified"}})
def job_report_html(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep, storage: StorageDep,
                    if_none_match: Annotated[str | None, Header(max_length=1024)] = None) -> Response:
    # 404 for a job that finished before reports had pages, or whose page could not be drawn
    page = jobs.report_artifact(session, tenant_id, job_id, "report_html")
    etag = f'"{page.sha256}"'
    headers = {"ETag": etag, "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "private, no-cache"}
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    with storage.open(page.storage_key) as fh:  # a page is tens of kB: read whole, no stream needed
        body = fh.read()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)
