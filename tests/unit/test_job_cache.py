"""The poll-answer cache (app/job_cache.py): a read that raced a change never stores the old answer."""

from __future__ import annotations

import uuid

import pytest

from app import job_cache
from app.job_cache import JobAnswerCache

TENANT, OTHER, JOB = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def cache() -> JobAnswerCache:
    c = JobAnswerCache()
    c.enabled = True
    return c


def read(c: JobAnswerCache, view: str, during=None) -> None:
    stamp = c.begin(JOB)
    if during:
        during(c)
    c.end(JOB, stamp, TENANT, view)


def test_an_answer_is_served_to_its_tenant_until_the_job_changes() -> None:
    c = cache()
    read(c, "v1")
    assert c.get(TENANT, JOB) == "v1" and c.get(OTHER, JOB) is None
    c.invalidate(JOB)
    assert c.get(TENANT, JOB) is None


def test_a_change_notified_during_the_read_keeps_its_old_answer_out() -> None:
    c = cache()
    read(c, "old", during=lambda c: c.invalidate(JOB))
    assert c.get(TENANT, JOB) is None
    read(c, "new")  # the next read, with nothing in flight, is kept
    assert c.get(TENANT, JOB) == "new"


def test_a_reset_during_the_read_keeps_its_answer_out_and_nothing_is_cached_while_disabled() -> None:
    c = cache()
    read(c, "old", during=lambda c: c.reset())
    assert c.get(TENANT, JOB) is None
    c.enabled = False
    read(c, "v")
    c.enabled = True
    assert c.get(TENANT, JOB) is None


def test_overlapping_reads_are_fenced_by_a_change_between_them() -> None:
    c = cache()
    first = c.begin(JOB)
    c.invalidate(JOB)
    second = c.begin(JOB)
    c.end(JOB, first, TENANT, "before the change")
    assert c.get(TENANT, JOB) is None
    c.end(JOB, second, TENANT, "after the change")
    assert c.get(TENANT, JOB) == "after the change"


def test_answers_expire_and_the_least_recent_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    c = cache()
    monkeypatch.setattr(job_cache, "MAX_ENTRIES", 2)
    jobs = [uuid.uuid4() for _ in range(3)]
    for j in jobs:
        c.end(j, c.begin(j), TENANT, str(j))
    assert c.get(TENANT, jobs[0]) is None and c.get(TENANT, jobs[2]) == str(jobs[2])
    monkeypatch.setattr(job_cache, "MAX_AGE_S", -1.0)
    assert c.get(TENANT, jobs[2]) is None
