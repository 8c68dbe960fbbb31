"""Request dependencies: the settings, a session per request, the caller's tenant, the store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.settings import Settings
from app.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def admit(request: Request) -> AsyncIterator[None]:
    """A place among the sync requests allowed to hold a connection (app/admission.py), waited for in the loop."""
    async with request.app.state.admission.slot():
        yield


def get_session(request: Request, _admitted: Annotated[None, Depends(admit, scope="function")]) -> Iterator[Session]:
    """One transaction per request: committed after the handler, rolled back on error."""
    with request.app.state.session_factory() as session, session.begin():
        yield session


# scope="function": commit before the response is sent, so a client that polls at once finds the row.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_tenant(request: Request) -> uuid.UUID:
    """The key's tenant, from the async engine and a short cache (app/auth.py): authenticating holds no thread."""
    tenant_id = await request.app.state.key_cache.tenant_of(request.headers.get("authorization"))
    request.state.tenant_id = tenant_id
    return tenant_id


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]
