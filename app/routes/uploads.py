"""Models and datasets: the two upload routes, list, get, delete, download; HTTP only."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.models import Dataset, Model
from app.routes.downloads import file_response
from app.schemas import DatasetPublic, ModelPublic, Page
from app.services import uploads
from app.services.common import paginate, tenant_get, tenant_select
from app.storage import pending_upload
from app.uploads import check_declared_length, receive_multipart, receive_raw

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": d, "content": {"application/problem+json": {}}}
    for code, d in ((400, "Malformed"), (401, "No key"), (404, "Not found"), (409, "In use"),
                    (413, "Too large"), (415, "Unsupported format"), (422, "Invalid"))
}

models_router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)
datasets_router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERRORS)

Limit = Annotated[int, Query(ge=1, le=200)]


async def _receive(request: Request, settings, storage, raw: bool, create) -> Any:
    check_declared_length(request, settings.max_upload_bytes)
    with pending_upload(storage, settings.max_upload_bytes) as pending:
        if raw:
            fields, filename = {}, None
            await receive_raw(request, pending)
        else:
            fields, filename = await receive_multipart(request, pending)
        pending.close()  # flush: format detection reads the file from disk
        return create(pending, fields, filename)


def _created(response: Response, path: str) -> None:
    response.status_code = 201
    response.headers["Location"] = path


@models_router.post("", status_code=201, response_model=ModelPublic, summary="Upload a model (multipart)",
                    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                        "type": "object", "required": ["file"], "properties": {
                            "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
                            "format": {"type": "string"}}}}}, "required": True}})
async def upload_model_multipart(request: Request, response: Response, session: SessionDep,
                                 tenant_id: TenantDep, settings: SettingsDep, storage: StorageDep) -> Model:
    def create(pending, fields, filename):
        return uploads.create_model(session, storage, tenant_id, pending, name=fields.get("name"),
                                    filename=filename, declared_format=fields.get("format"))

    model = await _receive(request, settings, storage, False, create)
    _created(response, f"/v1/models/{model.id}")
    return model


@models_router.put("/upload", status_code=201, response_model=ModelPublic, summary="Upload a model (raw body)",
                   openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {
                       "type": "string", "format": "binary"}}}, "required": True}})
async def upload_model_raw(request: Request, response: Response, session: SessionDep, tenant_id: TenantDep,
                           settings: SettingsDep, storage: StorageDep,
                           name: Annotated[str | None, Query(max_length=200)] = None,
                           format: Annotated[str | None, Query(max_length=32)] = None) -> Model:
    def create(pending, fields, filename):
        return uploads.create_model(session, storage, tenant_id, pending, name=name, filename=None,
                                    declared_format=format)

    model = await _receive(request, settings, storage, True, create)
    _created(response, f"/v1/models/{model.id}")
    return model


@models_router.get("", response_model=Page[ModelPublic])
def list_models(session: SessionDep, tenant_id: TenantDep, limit: Limit = 50, cursor: str | None = None) -> Any:
    items, next_cursor = paginate(session, tenant_select(Model, tenant_id), Model, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@models_router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> Model:
    return tenant_get(session, Model, tenant_id, model_id, what="model")


@models_router.delete("/{model_id}", status_code=204)
def delete_model(model_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep, storage: StorageDep) -> Response:
    model = tenant_get(session, Model, tenant_id, model_id, what="model", for_update=True)
    uploads.ensure_unused(session, model)
    session.delete(model)
    session.flush()
    storage.delete(model.storage_key)
    return Response(status_code=204)


@models_router.get("/{model_id}/download", response_class=StreamingResponse,
                   responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial"},
                              304: {"description": "Not modified"}, 416: {"description": "Bad range"}})
def download_model(model_id: uuid.UUID, request: Request, session: SessionDep, tenant_id: TenantDep,
                   storage: StorageDep) -> Response:
    model = tenant_get(session, Model, tenant_id, model_id, what="model")
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "torch_export": ".pt2", "hf": ".zip"}.get(model.format, "")
    filename = model.name if model.name.endswith(suffix) else model.name + suffix
    return file_response(request, storage, model.storage_key, size=model.size_bytes, sha256=model.sha256,
                         filename=filename)


@datasets_router.post("", status_code=201, response_model=DatasetPublic, summary="Upload a dataset (multipart)",
                      openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                          "type": "object", "required": ["file"], "properties": {
                              "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
                              "kind": {"type": "string"}}}}}, "required": True}})
async def upload_dataset_multipart(request: Request, response: Response, session: SessionDep,
                                   tenant_id: TenantDep, settings: SettingsDep, storage: StorageDep) -> Dataset:
    def create(pending, fields, filename):
        return uploads.create_dataset(session, storage, tenant_id, pending, name=fields.get("name"),
                                      filename=filename, declared_kind=fields.get("kind"))

    dataset = await _receive(request, settings, storage, False, create)
    _created(response, f"/v1/datasets/{dataset.id}")
    return dataset


@datasets_router.put("/upload", status_code=201, response_model=DatasetPublic,
                     summary="Upload a dataset (raw body)",
                     openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {
                         "type": "string", "format": "binary"}}}, "required": True}})
async def upload_dataset_raw(request: Request, response: Response, session: SessionDep, tenant_id: TenantDep,
                             settings: SettingsDep, storage: StorageDep,
                             name: Annotated[str | None, Query(max_length=200)] = None,
                             kind: Annotated[str | None, Query(max_length=16)] = None) -> Dataset:
    def create(pending, fields, filename):
        return uploads.create_dataset(session, storage, tenant_id, pending, name=name, filename=None,
                                      declared_kind=kind)

    dataset = await _receive(request, settings, storage, True, create)
    _created(response, f"/v1/datasets/{dataset.id}")
    return dataset


@datasets_router.get("", response_model=Page[DatasetPublic])
def list_datasets(session: SessionDep, tenant_id: TenantDep, limit: Limit = 50, cursor: str | None = None) -> Any:
    items, next_cursor = paginate(session, tenant_select(Dataset, tenant_id), Dataset, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@datasets_router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> Dataset:
    return tenant_get(session, Dataset, tenant_id, dataset_id, what="dataset")


@datasets_router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep,
                   storage: StorageDep) -> Response:
    dataset = tenant_get(session, Dataset, tenant_id, dataset_id, what="dataset", for_update=True)
    uploads.ensure_unused(session, dataset)
    session.delete(dataset)
    session.flush()
    storage.delete(dataset.storage_key)
    return Response(status_code=204)

