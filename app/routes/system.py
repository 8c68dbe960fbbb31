"""Health, readiness, Prometheus metrics and capabilities."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from app import __version__
from app.deps import SessionDep, SettingsDep, TenantDep
from app.models import Job, Outbox, Worker
from app.schemas import Capabilities
from app.services import workers
from worker.engine.registry import SPECS
from worker.task_names import QUEUE_FOR_DEVICE

router = APIRouter()


@router.get("/healthz", tags=["system"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["system"], responses={503: {"description": "A dependency is down"}})
def readyz(request: Request) -> Response:
    checks: dict[str, str] = {}
    try:
        with request.app.state.db_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["database"] = f"unreachable: {exc.__class__.__name__}"
    try:
        request.app.state.publisher.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {exc.__class__.__name__}"
    try:
        request.app.state.storage.check()
        checks["storage"] = "ok"
    except Exception as exc:  # the store's own message says what to fix (bucket, credentials, endpoint)
        checks["storage"] = f"unavailable: {exc}"
    ok = all(v == "ok" for v in checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse({"type": "https://quantserve.dev/problems/unavailable", "title": "Not ready",
                         "status": 503, "detail": "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
                         "code": "unavailable", "checks": checks}, status_code=503,
                        media_type="application/problem+json", headers={"Retry-After": "5"})


@router.get("/metrics", tags=["system"], response_class=PlainTextResponse)
def metrics(request: Request) -> str:
    lines = ["# HELP quantserve_http_requests_total HTTP requests by method and status.",
             "# TYPE quantserve_http_requests_total counter"]
    for (method, status), count in sorted(request.app.state.request_counts.items()):
        lines.append(f'quantserve_http_requests_total{{method="{method}",status="{status}"}} {count}')
    with request.app.state.session_factory() as session:
        by_status = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        durations = session.execute(select(func.count(), func.sum(Job.duration_s))
                                    .where(Job.duration_s.is_not(None))).one()
        pending = session.scalar(select(func.count()).select_from(Outbox)) or 0
        queued = session.scalar(select(func.count()).where(Job.status == "queued")) or 0
    lines += ["# HELP quantserve_jobs Jobs by status.", "# TYPE quantserve_jobs gauge"]
    lines += [f'quantserve_jobs{{status="{s}"}} {c}' for s, c in sorted(by_status)]
    lines += ["# HELP quantserve_queue_depth Jobs waiting for a worker.", "# TYPE quantserve_queue_depth gauge",
              f"quantserve_queue_depth {queued}",
              "# HELP quantserve_outbox_pending Messages not yet handed to the broker.",
              "# TYPE quantserve_outbox_pending gauge", f"quantserve_outbox_pending {pending}",
              "# HELP quantserve_job_duration_seconds Durations of finished jobs.",
              "# TYPE quantserve_job_duration_seconds summary",
              f"quantserve_job_duration_seconds_count {durations[0] or 0}",
              f"quantserve_job_duration_seconds_sum {durations[1] or 0.0}"]
    return "\n".join(lines) + "\n"


def capabilities_document(live_workers: list[Worker] | None = None) -> dict[str, Any]:
    """The registry's static pairs, and what live workers serve (`served_devices`, `live_devices`)."""
    formats: dict[str, Any] = {}
    for spec in SPECS.values():
        formats.setdefault(spec.format.value, {"methods": {}})["methods"][spec.method.value] = {
            "dtypes": list(spec.dtypes), "devices": sorted(d.value for d in spec.devices),
            "options": spec.config_model.model_json_schema(), "status": spec.status.value,
            "needs_calibration": spec.needs_calibration, "needs_training": spec.needs_training,
            "supports_target": spec.supports_target, "target_metrics": list(spec.target_metrics),
            "supports_auto_bits": spec.supports_auto_bits,
        }
    devices = sorted({d.value for s in SPECS.values() for d in s.devices})
    live = workers.live_devices(live_workers or [])
    return {"formats": formats, "devices": devices, "queues": sorted({QUEUE_FOR_DEVICE[d] for d in devices}),
            "version": __version__, "served_devices": sorted({d.device for d in live}),
            "live_devices": [d.to_dict() for d in live]}


@router.get("/v1/capabilities", response_model=Capabilities, tags=["system"])
def capabilities(tenant_id: TenantDep, session: SessionDep,  # noqa: ARG001 - every /v1 route needs a key
                 settings: SettingsDep) -> Any:
    return capabilities_document(workers.live(session, settings.worker_ttl_s))
