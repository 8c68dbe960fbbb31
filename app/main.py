"""create_app(): the FastAPI application. Nothing is built at import; the lifespan builds it."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, errors
from app.access_log import AccessLog
from app.admission import Admission, Incidents
from app.auth import KeyCache
from app.broker import OutboxRelay, Publisher
from app.db import SYNC_POOL_CAPACITY, make_async_engine, make_engine, make_session_factory
from app.job_events import JobEvents
from app.metrics import HTTP_REQUESTS
from app.routes import jobs, reports, system, uploads
from app.settings import Settings
from app.storage import open_storage
from worker.celery_app import create_celery


class BodyLimitAndCounters:
    """Pure ASGI: request ids (X-Request-ID), request counters, the optional access log, and a size cap on JSON
    bodies counted while streaming.

    Upload routes are exempt here: they enforce QUANTSERVE_MAX_UPLOAD_BYTES themselves, mid-stream.
    """

    def __init__(self, app: ASGIApp, max_json_bytes: int, access_log: AccessLog | None) -> None:
        self.app, self.max_json_bytes, self.access_log = app, max_json_bytes, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        is_upload = path.endswith("/upload") or (method == "POST" and path in ("/v1/models", "/v1/datasets"))
        request_state = scope.setdefault("state", {})
        request_state["request_id"] = request_id = uuid.uuid4().hex
        started = time.perf_counter()
        state = {"status": 500, "seen": 0, "too_large": False, "replaced": False}
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if not is_upload and declared.isdigit() and int(declared) > self.max_json_bytes:
            HTTP_REQUESTS.labels(method, 413).inc()
            return await _send_413(send, self.max_json_bytes, path)

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not is_upload:
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_json_bytes:
                    # Stop reading. The NUL makes the cut body invalid JSON, so nothing acts on it, and
                    # whatever the app answers is replaced by a 413 below.
                    state["too_large"] = True
                    return {"type": "http.request", "body": b"\x00", "more_body": False}
            return message

        async def guarded_send(message: Message) -> None:
            if state["too_large"]:
                if not state["replaced"]:
                    state["replaced"], state["status"] = True, 413
                    await _send_413(send, self.max_json_bytes, path)
                return
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        finally:
            HTTP_REQUESTS.labels(method, state["status"]).inc()
            if self.access_log is not None:
                self.access_log.write(method, path, state["status"], time.perf_counter() - started, request_state)


async def _send_413(send: Send, limit: int, path: str) -> None:
    import json

    body = json.dumps({"type": errors.PROBLEM_BASE + "too-large", "title": "Body too large", "status": 413,
                       "detail": f"the request body is larger than {limit} bytes", "instance": path,
                       "code": "too_large"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# Every router the app serves; the tenant-isolation test walks these, so a new route is checked too.
ROUTERS = (system.router, uploads.models_router, uploads.datasets_router, jobs.router, reports.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.effective_database_url, pool_timeout_s=settings.db_pool_timeout_s)
        factory = make_session_factory(engine)
        read_engine = make_async_engine(settings.effective_database_url, pool_size=settings.db_pool_size,
                                        pool_timeout_s=settings.db_pool_timeout_s,
                                        statement_timeout_s=settings.db_statement_timeout_s)
        publisher = Publisher(create_celery(settings))
        OutboxRelay(factory, publisher).install()
        incidents = Incidents()
        app.state.settings = settings
        app.state.db_engine = engine
        app.state.session_factory = factory
        app.state.read_engine = read_engine
        app.state.key_cache = KeyCache(read_engine, settings.key_cache_ttl_s)
        app.state.incidents = incidents
        app.state.admission = Admission(SYNC_POOL_CAPACITY, settings.db_pool_timeout_s, incidents)
        app.state.job_events = job_events = JobEvents(settings.effective_database_url)
        app.state.storage = open_storage(settings)
        app.state.publisher = publisher
        job_events.start()
        try:
            yield
        finally:
            await job_events.stop()
            incidents.close()
            await read_engine.dispose()
            engine.dispose()

    app = FastAPI(title="quantserve", version=__version__, lifespan=lifespan,
                  description="Upload a model, submit a quantization job, download a smaller, faster model.")
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimitAndCounters, max_json_bytes=settings.max_json_bytes,
                       access_log=AccessLog() if settings.access_log == "json" else None)
    return app
