"""Models and datasets: the two upload routes, list, get, delete (and a model's download); HTTP only.

Both resources behave alike, so one factory builds both routers; only the row type, the schema, the
service function and the name of the override field ("format" or "kind") differ.
"""


import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.db import transaction
from app.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.ids import uuid7
from app.metrics import UPLOAD_BYTES, UPLOADS
from app.models import Dataset, Model
from app.names import MAX_NAME_CHARS, Name, check_name
from app.routes.downloads import Redirect, file_response
from app.schemas import DatasetPublic, ModelPublic, Page
from app.services import uploads
from app.services.common import paginate, tenant_get, tenant_select
from app.storage import pending_upload
from app.upload_stream import check_declared_length, receive_multipart, receive_raw

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": d, "content": {"application/problem+json": {}}}
    for code, d in ((400, "Malformed"), (401, "No key"), (404, "Not found"), (409, "In use"),
                    (413, "Too large"), (415, "Unsupported format"), (422, "Invalid"),
                    (503, "Database or object store unreachable, or saturated; with Retry-After"))
}
Limit = Annotated[int, Query(ge=1, le=200)]
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial"},
    304: {"description": "Not modified"}, 416: {"description": "Bad range"}}


def _body_doc(content_type: str, override: str) -> dict[str, Any]:
    if content_type == "multipart/form-data":
        schema = {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}, "name": {"type": "string", "maxLength": MAX_NAME_CHARS},
            override: {"type": "string"}}}
    else:
        schema = {"type": "string", "format": "binary"}
    return {"requestBody": {"content": {content_type: {"schema": schema}}, "required": True}}


def build_router(noun: str, row_type: type[Model] | type[Dataset], public: type, override: str,
                 create: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix=f"/v1/{noun}s", tags=[f"{noun}s"], responses=ERRORS)

    async def receive_and_create(request: Request, response: Response, tenant_id, settings, storage, *,
                                 raw: bool, name: str | None = None, declared: str | None = None) -> Any:
        """Stream the body to disk holding no thread and no connection (a 1 GiB upload takes seconds), then
        detect the format and insert the row in one short transaction, in the threadpool."""
        check_declared_length(request, settings.max_upload_bytes)
        row_id = uuid7()
        key = uploads.upload_key(noun, row_id)
        with pending_upload(storage, settings.max_upload_bytes, key) as pending:
            if raw:
                fields, filename = {}, None
                await receive_raw(request, pending)
            else:
                fields, filename = await receive_multipart(request, pending)
                name, declared = check_name(fields.get("name"), ("body", "name")), fields.get(override)
            pending.close()  # flush: format detection reads the file from disk

            def detect_and_insert() -> Any:
                try:
                    with transaction(request.app.state.session_factory) as session:
                        return create(session, storage, tenant_id, pending, row_id=row_id, name=name,
                                      filename=filename, declared=declared)
                except BaseException:
                    if pending.committed:  # the object is stored but its row never committed: remove it
                        storage.delete(key)
                    raise

            async with request.app.state.admission.slot():
                row = await run_in_threadpool(detect_and_insert)
            UPLOAD_BYTES.labels(noun).inc(pending.size)  # counted once stored and recorded: a 413 adds nothing
            UPLOADS.labels(noun).inc()
        response.headers["Location"] = f"/v1/{noun}s/{row.id}"
        return row

    @router.post("", status_code=201, response_model=public, summary=f"Upload a {noun} (multipart)",
                 openapi_extra=_body_doc("multipart/form-data", override), name=f"upload_{noun}_multipart")
    async def upload_multipart(request: Request, response: Response, tenant_id: TenantDep,
                               settings: SettingsDep, storage: StorageDep) -> Any:
        return await receive_and_create(request, response, tenant_id, settings, storage, raw=False)

    @router.put("/upload", status_code=201, response_model=public, summary=f"Upload a {noun} (raw body)",
                openapi_extra=_body_doc("application/octet-stream", override), name=f"upload_{noun}_raw")
    async def upload_raw(request: Request, response: Response, tenant_id: TenantDep,
                         settings: SettingsDep, storage: StorageDep,
                         name: Annotated[Name | None, Query(json_schema_extra={"maxLength": MAX_NAME_CHARS})] = None,
                         declared: Annotated[str | None, Query(alias=override, max_length=32)] = None) -> Any:
        return await receive_and_create(request, response, tenant_id, settings, storage, raw=True,
                                        name=name, declared=declared)

    @router.get("", response_model=Page[public], name=f"list_{noun}s")
    def list_rows(session: SessionDep, tenant_id: TenantDep, limit: Limit = 50, cursor: str | None = None) -> Any:
        items, next_cursor = paginate(session, tenant_select(row_type, tenant_id), row_type, limit=limit,
                                      cursor=cursor)
        return {"items": items, "next_cursor": next_cursor}

    RowId = Annotated[uuid.UUID, Path(alias=f"{noun}_id")]

    @router.get(f"/{{{noun}_id}}", response_model=public, name=f"get_{noun}")
    def get_row(row_id: RowId, session: SessionDep, tenant_id: TenantDep) -> Any:
        return tenant_get(session, row_type, tenant_id, row_id, what=noun)

    @router.delete(f"/{{{noun}_id}}", status_code=204, name=f"delete_{noun}")
    def delete_row(row_id: RowId, session: SessionDep, tenant_id: TenantDep, storage: StorageDep) -> Response:
        row = tenant_get(session, row_type, tenant_id, row_id, what=noun, for_update=True)
        uploads.ensure_unused(session, row)
        session.delete(row)
        session.flush()
        storage.delete(row.storage_key)
        return Response(status_code=204)

    return router


models_router = build_router("model", Model, ModelPublic, "format", uploads.create_model)
datasets_router = build_router("dataset", Dataset, DatasetPublic, "kind", uploads.create_dataset)


@models_router.get("/{model_id}/download", response_class=StreamingResponse, responses=DOWNLOAD_RESPONSES)
def download_model(model_id: uuid.UUID, request: Request, session: SessionDep, tenant_id: TenantDep,
                   storage: StorageDep, redirect: Redirect = False) -> Response:
    model = tenant_get(session, Model, tenant_id, model_id, what="model")
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "torch_export": ".pt2", "hf": ".zip"}.get(model.format, "")
    filename = model.name if model.name.endswith(suffix) else model.name + suffix
    return file_response(request, storage, model.storage_key, size=model.size_bytes, sha256=model.sha256,
                         filename=filename, redirect=redirect)
