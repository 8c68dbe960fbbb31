"""Prometheus metrics: per-process counters (requests, upload bytes) and job figures read from the database.

Two sources, chosen per metric so that `quantserve api --workers N` answers the same whichever process a scrape
lands on:

- What only the API process sees (requests, upload bytes) is counted in the process with prometheus_client.
  With several processes, `quantserve api` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before uvicorn
  starts them, each process writes its counters there, and a scrape sums every process's file.
- What the database already knows (queue depth, job counts, failures by code, durations of finished jobs) is
  queried at scrape time. The job row is the truth (RELIABILITY.md): a worker that observed a duration in its
  own memory would lose it when killed, count a redelivered job twice and need a scrape port of its own inside
  an internal network; the row has it exactly once. Each family is one aggregate query answering one row per
  label set (device, code, method x status), so a scrape costs a pass over the jobs table's status index, not
  the transfer of any job.

Job families are counters and histograms over all jobs still in the table, so they only grow; deleting a
tenant (its jobs cascade) lowers them once, which Prometheus' rate() reads as a counter reset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, Outbox
from worker.engine.runner import JOB_ERROR_CODES
from worker.engine.types import Device, Method

# Seconds. Jobs last from a second (a dynamic ONNX MLP) to hours (qat, GPTQ of an LLM); timeouts default to 3600.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")

# Not on prometheus_client's global registry: a scrape builds its own (below), and tests that build several apps
# in one process would otherwise trip over duplicate registrations.
_PROCESS = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter("quantserve_http_requests", "HTTP requests by method and status.", ["method", "status"],
                        registry=_PROCESS)
UPLOAD_BYTES = Counter("quantserve_upload_bytes", "Bytes of models and datasets accepted by uploads.", ["kind"],
                       registry=_PROCESS)
UPLOADS = Counter("quantserve_uploads", "Uploads accepted (stored and recorded), by kind.", ["kind"],
                  registry=_PROCESS)
# Every label value a dashboard reads is written at 0 from the start: a series that appears only on the first
# event makes rate() and "no data" panels lie, and a fresh deployment's scrape could not be checked.
for _kind in ("model", "dataset"):
    UPLOAD_BYTES.labels(_kind)
    UPLOADS.labels(_kind)


class JobsCollector(Collector):
    """The job families, read from the database on each scrape."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            yield from _job_families(session)


def _job_families(session: Session) -> Iterator[Metric]:
    by_status = dict.fromkeys(JOB_STATUSES, 0)
    by_status.update(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    jobs = GaugeMetricFamily("quantserve_jobs", "Jobs by status.", labels=["status"])
    for status, count in by_status.items():
        jobs.add_metric([status], count)
    yield jobs

    # Every device the engine knows appears, at 0 when idle, so a dashboard's series never vanish.
    queued = dict.fromkeys((d.value for d in Device), 0)
    queued.update(session.execute(select(Job.device, func.count()).where(Job.status == "queued")
                                  .group_by(Job.device)).all())
    depth = GaugeMetricFamily("quantserve_queue_depth", "Jobs waiting for a worker, by device.", labels=["device"])
    for device, count in sorted(queued.items()):
        depth.add_metric([device], count)
    yield depth

    pending = session.scalar(select(func.count()).select_from(Outbox)) or 0
    yield GaugeMetricFamily("quantserve_outbox_pending", "Messages not yet handed to the broker.", value=pending)

    code = Job.error["code"].as_string()
    by_code = dict.fromkeys(sorted(JOB_ERROR_CODES), 0)
    for name, count in session.execute(select(code, func.count()).where(Job.status == "failed")
                                       .group_by(code)).all():
        by_code[name or "unknown"] = by_code.get(name or "unknown", 0) + count
    failures = CounterMetricFamily("quantserve_job_failures", "Failed jobs by error code.", labels=["code"])
    for name, count in by_code.items():
        failures.add_metric([name], count)
    yield failures

    yield _durations(session)


def _durations(session: Session) -> HistogramMetricFamily:
    """One aggregate: per (method, status), the count at or under each bucket bound, the total and the sum."""
    finished = Job.duration_s.is_not(None)
    columns = [func.sum(case((Job.duration_s <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    rows = session.execute(select(Job.method, Job.status, func.count(), func.sum(Job.duration_s), *columns)
                           .where(finished).group_by(Job.method, Job.status)).all()
    seen = {(method, status) for method, status, *_ in rows}
    rows += [(m.value, "succeeded", 0, 0.0, *[0] * len(DURATION_BUCKETS)) for m in Method
             if (m.value, "succeeded") not in seen]  # every method's series from the start, as above
    family = HistogramMetricFamily("quantserve_job_duration_seconds", "Wall-clock time of finished jobs "
                                   "(claim to final status), by method and final status.",
                                   labels=["method", "status"])
    for method, status, count, total, *cumulative in rows:  # `le` spelt as prometheus_client does: "1.0", "+Inf"
        buckets = [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)]
        family.add_metric([method, status], [*buckets, ("+Inf", int(count))], sum_value=float(total or 0.0))
    return family


def render(session_factory: sessionmaker[Session]) -> bytes:
    """The text exposition of one scrape: this process's (or every process's) counters plus the job families."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # sums the files of every API process, live or gone
    else:
        for metric in (HTTP_REQUESTS, UPLOAD_BYTES, UPLOADS):
            registry.register(metric)
    registry.register(JobsCollector(session_factory))
    return generate_latest(registry)
