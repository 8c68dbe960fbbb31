"""Concurrent misses share one read (app/single_flight.py), and a change fences later polls out of an older read."""

from __future__ import annotations

import asyncio
import functools
import uuid

import pytest

from app.job_cache import JobAnswerCache
from app.single_flight import SingleFlight


def in_event_loop(test):  # noqa: ANN001, ANN201 - a plain async test, run without a pytest plugin
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class Reads:
    """A read that counts its calls and finishes when the test says so."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        n = self.calls
        await self.release.wait()
        return f"answer {n}"


@in_event_loop
async def test_concurrent_misses_for_one_key_share_one_read_and_other_keys_do_not() -> None:
    flights, reads, other = SingleFlight(), Reads(), Reads()
    waiting = [asyncio.create_task(flights.do("k", reads)) for _ in range(100)]
    apart = asyncio.create_task(flights.do("j", other))
    await asyncio.sleep(0)
    reads.release.set()
    other.release.set()
    assert set(await asyncio.gather(*waiting)) == {"answer 1"} and await apart == "answer 1"
    assert reads.calls == 1 and other.calls == 1
    assert len(flights) == 0  # landed: the next miss reads again
    reads.release = asyncio.Event()
    reads.release.set()
    assert await flights.do("k", reads) == "answer 2"


@in_event_loop
async def test_a_poll_after_forget_starts_its_own_read() -> None:
    flights, reads = SingleFlight(), Reads()
    before = asyncio.create_task(flights.do("k", reads))
    await asyncio.sleep(0)
    flights.forget("k")  # the job changed while that read was in flight
    after = asyncio.create_task(flights.do("k", reads))
    await asyncio.sleep(0)
    reads.release.set()
    assert (await before, await after) == ("answer 1", "answer 2")


@in_event_loop
async def test_one_waiter_cancelled_does_not_cancel_the_read_for_the_others() -> None:
    flights, reads = SingleFlight(), Reads()
    leaver, stayer = (asyncio.create_task(flights.do("k", reads)) for _ in range(2))
    await asyncio.sleep(0)
    leaver.cancel()  # its client disconnected
    await asyncio.sleep(0)
    reads.release.set()
    assert await stayer == "answer 1"
    with pytest.raises(asyncio.CancelledError):
        await leaver


@in_event_loop
async def test_a_failed_read_fails_every_waiter_and_the_next_miss_retries() -> None:
    flights, calls = SingleFlight(), []

    async def failing() -> str:
        calls.append(1)
        await asyncio.sleep(0)
        raise ConnectionError("database down")

    results = await asyncio.gather(*(flights.do("k", failing) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results) and len(calls) == 1
    with pytest.raises(ConnectionError):
        await flights.do("k", failing)
    assert len(calls) == 2


@in_event_loop
async def test_a_job_change_or_reset_fences_polls_out_of_the_read_in_flight() -> None:
    cache, tenant, job, other_job = JobAnswerCache(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    reads = Reads()
    first = asyncio.create_task(cache.reads.do((tenant, job), reads))
    unrelated = asyncio.create_task(cache.reads.do((tenant, other_job), reads))
    await asyncio.sleep(0)
    cache.invalidate(job)
    assert len(cache.reads) == 1  # only that job's read is forgotten
    cache.reset()
    assert len(cache.reads) == 0
    reads.release.set()
    await asyncio.gather(first, unrelated)
