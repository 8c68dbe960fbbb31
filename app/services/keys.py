"""API keys: created once in the clear, stored as SHA-256, each bound to one tenant."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import NotFoundError
from app.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "qs_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(session: Session, tenant_name: str) -> str:
    """Create a key (and its tenant if new); returns the plain key, which is never stored."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)  # 43 url-safe characters
    session.add(ApiKey(tenant_id=tenant.id, prefix=key[:11], key_hash=hash_key(key)))
    session.flush()
    return key


@dataclass(frozen=True)
class KeyListing:
    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None


def list_keys(session: Session) -> list[KeyListing]:
    rows = session.execute(
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
    )
    return [KeyListing(k.prefix, name, k.created_at, k.revoked_at) for k, name in rows]


def revoke(session: Session, prefix: str) -> int:
    result = session.execute(
        update(ApiKey).where(ApiKey.prefix.startswith(prefix), ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    if not result.rowcount:
        raise NotFoundError(f"no active key starts with {prefix!r}")
    return result.rowcount


def any_key_exists(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None
