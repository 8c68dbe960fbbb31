"""The tenant's webhook secret: created (or rotated) and shown once, then only described; HTTP only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.deps import SessionDep, SettingsDep, TenantDep
from app.errors import NotFoundError
from app.services import webhooks
from app.webhooks import load_signing_key


class WebhookSecretPublic(BaseModel):
    prefix: str = Field(description="The secret's first characters, to tell secrets apart.")
    created_at: datetime
    secret: str | None = Field(None, description="whsec_…: only in the answer that created it; store it now.")


def rotate_webhook_secret(session: SessionDep, tenant_id: TenantDep, settings: SettingsDep) -> Any:
    """Create the tenant's webhook secret, or replace it (the old one stops signing at once); shown only here."""
    key = load_signing_key(settings.webhook_signing_key, settings.data_dir)
    info = webhooks.rotate_secret(session, tenant_id, key)
    return {"prefix": info.prefix, "created_at": info.created_at, "secret": info.secret}


def describe_webhook_secret(session: SessionDep, tenant_id: TenantDep) -> Any:
    info = webhooks.describe_secret(session, tenant_id)
    if info is None:
        raise NotFoundError("no webhook secret yet; create one with POST /v1/webhooks/secret")
    return {"prefix": info.prefix, "created_at": info.created_at}


# Added to the jobs router (app/routes/jobs.py says why), under its /v1 prefix.
ROUTES: list[dict[str, Any]] = [
    {"path": "/webhooks/secret", "endpoint": rotate_webhook_secret, "methods": ["POST"], "status_code": 201,
     "response_model": WebhookSecretPublic, "tags": ["webhooks"]},
    {"path": "/webhooks/secret", "endpoint": describe_webhook_secret, "methods": ["GET"],
     "response_model": WebhookSecretPublic, "tags": ["webhooks"]},
]
