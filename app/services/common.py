"""Tenant-scoped lookups and cursor pagination, shared by every resource."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.errors import BadRequestError, NotFoundError

T = TypeVar("T")


def tenant_select(model: type[T], tenant_id: uuid.UUID) -> Select[tuple[T]]:
    """The one way to query tenant data: every statement starts with the tenant filter."""
    return select(model).where(model.tenant_id == tenant_id)  # type: ignore[attr-defined]


def tenant_get(session: Session, model: type[T], tenant_id: uuid.UUID, row_id: uuid.UUID, *,
               what: str, for_update: bool = False) -> T:
    stmt = tenant_select(model, tenant_id).where(model.id == row_id)  # type: ignore[attr-defined]
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalar(stmt)
    if row is None:  # another tenant's row answers exactly like a missing one
        raise NotFoundError(f"no {what} with id {row_id}")
    return row


def parse_cursor(cursor: str | None) -> uuid.UUID | None:
    if not cursor:
        return None
    try:
        return uuid.UUID(cursor)
    except ValueError:
        raise BadRequestError(f"cursor {cursor!r} is not valid; pass next_cursor from the previous page") from None


def paginate(session: Session, stmt: Select[Any], model: Any, *, limit: int, cursor: str | None
             ) -> tuple[list[Any], str | None]:
    """Newest first by time-ordered id; the cursor is the last id of the previous page."""
    after = parse_cursor(cursor)
    if after is not None:
        stmt = stmt.where(model.id < after)
    rows = list(session.scalars(stmt.order_by(model.id.desc()).limit(limit + 1)))
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
