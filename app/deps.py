"""Request dependencies: the settings, a session per request, the caller's tenant, the store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.services import keys
from app.settings import Settings
from app.storage import LocalStorage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> LocalStorage:
    return request.app.state.storage


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed after the handler, rolled back on error."""
    with request.app.state.session_factory() as session, session.begin():
        yield session


# scope="function": commit before the response is sent, so a client that polls at once finds the row.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]


def get_tenant(request: Request, session: SessionDep) -> uuid.UUID:
    tenant_id = keys.authenticate(session, request.headers.get("authorization"))
    request.state.tenant_id = tenant_id
    return tenant_id


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]
