"""A failed job's error reaches the client whole: its public code, its message and the finer reason."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.models import Job, Tenant, utcnow
from tests.conftest import Service


def test_a_failed_jobs_error_keeps_its_reason(service: Service) -> None:
    client = service.client("job-errors")  # creates the tenant
    error = {"code": "invalid_input", "message": "input 'x' expects float32[?, 1, 8, 8]; dataset array 'x' is "
                                                 "int64[100, 64]", "reason": "dataset_mismatch"}
    engine = create_engine(service.env["QUANTSERVE_DATABASE_URL"])
    try:
        with Session(engine) as session, session.begin():
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "job-errors"))
            job = Job(tenant_id=tenant_id, model_id=uuid.uuid4(), method="dynamic", config={}, status="failed",
                      progress=0.0, error=error, finished_at=utcnow())
            session.add(job)
            session.flush()
            job_id = job.id
    finally:
        engine.dispose()
    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "failed" and body["error"] == error
    listed = client.get("/v1/jobs", params={"status": "failed"}).json()["items"]
    assert [j["error"] for j in listed if j["id"] == str(job_id)] == [error]
