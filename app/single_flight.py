"""Concurrent cache misses for one key share one database read.

When a cached answer expires (a key's TTL, a poll answer's MAX_AGE_S) every client polling it misses at the
same moment: at 256 clients that was 256 identical queries queued on a pool of a few connections, and the
requests at the back of that queue waited seconds (wrk socket timeouts) while the event loop sat idle.
With this, the first miss reads and the others await its result.

Hand-written because it is a dozen lines over asyncio; the libraries that offer it (aiocache's `cached`
with locks, async-lru) bring their own caches and expiry, which we already have and fence differently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}

    async def do(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """`read()`'s result, from a read already in flight for `key` if there is one."""
        task = self._flights.get(key)
        if task is None:
            task = asyncio.ensure_future(read())
            self._flights[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        # shield: one client giving up (a disconnect cancels its request) must not cancel the others' read
        return await asyncio.shield(task)

    def forget(self, key: K) -> None:
        """Requests from now on start a new read (what is in flight may predate a change)."""
        self._flights.pop(key, None)

    def forget_where(self, matches: Callable[[K], bool]) -> None:
        for key in [k for k in self._flights if matches(k)]:
            del self._flights[key]

    def __len__(self) -> int:
        return len(self._flights)

    def _landed(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have left, and asyncio would log it as lost
