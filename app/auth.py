"""Bearer key -> tenant, on the async engine, with a few seconds of per-process cache.

Every /v1 request authenticates, so a poll would otherwise cost two queries. The cache trades a bounded delay
for that: a revoked key keeps working for at most QUANTSERVE_KEY_CACHE_TTL_S (default 5 s) in each API process
that had looked it up, then answers 401 (README, "Keys"). Unknown keys are never cached, so a key created a
moment ago works at once.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import UnauthorizedError
from app.models import ApiKey
from app.services.keys import hash_key
from app.single_flight import SingleFlight

MAX_ENTRIES = 10_000  # keys in use at once are far fewer; a flood of distinct valid keys only costs queries


class KeyCache:
    def __init__(self, engine: AsyncEngine, ttl_s: float) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[uuid.UUID, float]] = {}
        self._lookups: SingleFlight[str, uuid.UUID | None] = SingleFlight()  # one query per key at its expiry

    async def tenant_of(self, authorization: str | None) -> uuid.UUID:
        if not authorization:
            raise UnauthorizedError("send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthorizedError("the Authorization header must be 'Bearer <key>'")
        digest = hash_key(key.strip())
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant_id = await self._lookups.do(digest, lambda: self._lookup(digest))
        if tenant_id is None:
            self._entries.pop(digest, None)
            raise UnauthorizedError("unknown or revoked API key")
        if self.ttl_s > 0:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (tenant_id, now + self.ttl_s)
        return tenant_id

    async def _lookup(self, digest: str) -> uuid.UUID | None:
        async with self.engine.connect() as conn:
            return await conn.scalar(
                select(ApiKey.tenant_id).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
