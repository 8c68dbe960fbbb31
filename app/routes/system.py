"""Health, readiness, Prometheus metrics and capabilities."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app import __version__
from app import metrics as app_metrics
from app.deps import SessionDep, SettingsDep, TenantDep
from app.models import Worker
from app.schemas import Capabilities
from app.services import workers
from worker.engine.registry import SPECS
from worker.engine.types import Method
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
        return JSONResponse({"status": "ready", "checks": checks, "isolation": _isolation(request)})
    return JSONResponse({"type": "https://quantserve.dev/problems/unavailable", "title": "Not ready",
                         "status": 503, "detail": "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
                         "code": "unavailable", "checks": checks}, status_code=503,
                        media_type="application/problem+json", headers={"Retry-After": "5"})


def _isolation(request: Request) -> dict[str, int]:
    """Live workers by the network isolation of their engine children ("netns", or "none: <why>"): informs, never
    fails readiness, since a worker without namespaces still runs jobs (behind the network the operator gave it)."""
    with request.app.state.session_factory() as session:
        live = workers.live(session, request.app.state.settings.worker_ttl_s)
    modes = [next((d.get("isolation") for d in (w.devices or {}).values() if d and d.get("isolation")), "unknown")
             for w in live]
    return dict(sorted(Counter(modes).items()))


@router.get("/metrics", tags=["system"], response_class=PlainTextResponse)
def metrics(request: Request) -> Response:
    # app/metrics.py says which figures are counted per process and which are read from the database, and why.
    return Response(app_metrics.render(request.app.state.session_factory), media_type=CONTENT_TYPE_LATEST)


def capabilities_document(live_workers: list[Worker] | None = None) -> dict[str, Any]:
    """The registry's static pairs, and what live workers serve (`served_devices`, `live_devices`)."""
    formats: dict[str, Any] = {}
    for spec in SPECS.values():
        formats.setdefault(spec.format.value, {"methods": {}})["methods"][spec.method.value] = {
            "dtypes": list(spec.dtypes), "devices": sorted(d.value for d in spec.devices),
            "options": spec.config_model.model_json_schema(), "status": spec.status.value,
            "needs_calibration": spec.needs_calibration, "needs_training": spec.needs_training,
            "supports_target": spec.supports_target, "target_metrics": list(spec.target_metrics),
            "supports_auto_bits": spec.supports_auto_bits, "sweep_candidates": list(spec.sweep_candidates),
        }
        formats[spec.format.value]["supports_auto"] = any(f == spec.format and m == Method.auto for f, m in SPECS)
    devices = sorted({d.value for s in SPECS.values() for d in s.devices})
    live = workers.live_devices(live_workers or [])
    return {"formats": formats, "devices": devices, "queues": sorted({QUEUE_FOR_DEVICE[d] for d in devices}),
            "version": __version__, "served_devices": sorted({d.device for d in live}),
            "live_devices": [d.to_dict() for d in live]}


@router.get("/v1/capabilities", response_model=Capabilities, tags=["system"])
def capabilities(tenant_id: TenantDep, session: SessionDep,  # noqa: ARG001 - every /v1 route needs a key
                 settings: SettingsDep) -> Any:
    return capabilities_document(workers.live(session, settings.worker_ttl_s))
