"""Celery tasks: ids in, a few lines each; the work lives in worker.jobs and the engine."""

from __future__ import annotations

import logging
import threading
import time
from uuid import UUID

from celery import Task
from celery.signals import worker_ready

from worker import jobs, lifecycle, task_names
from worker.celery_app import celery_app
from worker.runtime import runtime

log = logging.getLogger("quantserve.worker")


@celery_app.task(name=task_names.VALIDATE_MODEL)
def validate_model(model_id: str) -> None:
    jobs.validate_model(runtime(), UUID(model_id))


@celery_app.task(name=task_names.VALIDATE_DATASET)
def validate_dataset(dataset_id: str) -> None:
    jobs.validate_dataset(runtime(), UUID(dataset_id))


@celery_app.task(name=task_names.RUN_JOB, bind=True)
def run_job(self: Task, job_id: str) -> None:
    jobs.run_job(runtime(), UUID(job_id), worker=self.request.hostname or "worker")


def _sweep_forever() -> None:
    """Re-publish unsent outbox rows and reap jobs whose worker died. Every worker runs one."""
    rt = runtime()
    while True:
        try:
            rt.relay.sweep()
            lifecycle.reap(rt.session_factory)
            lifecycle.redispatch_stale(rt.session_factory, rt.settings.redispatch_after_s)
        except Exception:  # the database or broker is down: try again next round
            log.exception("sweep failed")
        time.sleep(rt.settings.sweep_interval_s)


@worker_ready.connect
def _start_sweeper(**_kwargs) -> None:
    threading.Thread(target=_sweep_forever, name="quantserve-sweeper", daemon=True).start()
