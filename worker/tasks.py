"""Celery tasks: ids in, a few lines each; the work lives in worker.jobs and the engine."""

from __future__ import annotations

import logging
import threading
import time
from uuid import UUID

from celery import Task
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from celery.worker.consumer import Consumer

from app.errors import StoreUnavailableError
from worker import devices, jobs, lifecycle, task_names, webhooks
from worker.celery_app import celery_app
from worker.presence import Presence
from worker.runtime import runtime

log = logging.getLogger("quantserve.worker")


# An unreachable object store is transient, and nothing else would ever revisit a `validating` row: retry the
# validation with backoff (about 10 minutes in all) instead of losing it. A job needs no such rule: its lease
# expires and the reaper requeues it.
STORE_RETRY = {"autoretry_for": (StoreUnavailableError,), "retry_backoff": 5, "retry_backoff_max": 120,
               "max_retries": 8}


@celery_app.task(name=task_names.VALIDATE_MODEL, **STORE_RETRY)
def validate_model(model_id: str) -> None:
    jobs.validate_model(runtime(), UUID(model_id))


@celery_app.task(name=task_names.VALIDATE_DATASET, **STORE_RETRY)
def validate_dataset(dataset_id: str) -> None:
    jobs.validate_dataset(runtime(), UUID(dataset_id))


@celery_app.task(name=task_names.RUN_JOB, bind=True)
def run_job(self: Task, job_id: str) -> None:
    jobs.run_job(runtime(), UUID(job_id), worker=self.request.hostname or "worker")


@celery_app.task(name=task_names.DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str, attempt: int) -> None:
    rt = runtime()
    webhooks.deliver(rt.settings, rt.session_factory, UUID(delivery_id), int(attempt))


def _sweep_forever(presence: Presence) -> None:
    """Refresh this worker's row, re-publish unsent outbox rows and reap jobs whose worker died. Every worker
    runs one."""
    rt = runtime()
    while True:
        try:
            presence.beat(rt.session_factory)
        except Exception:  # the database is down: the row goes stale, and the API stops counting on us
            log.exception("worker heartbeat failed")
        try:
            rt.relay.sweep()
            lifecycle.reap(rt.session_factory)
            lifecycle.redispatch_stale(rt.session_factory, rt.settings.redispatch_after_s)
            webhooks.dispatch_due(rt.settings, rt.session_factory)  # retries whose backoff has passed
        except Exception:  # the database or broker is down: try again next round
            log.exception("sweep failed")
        time.sleep(rt.settings.sweep_interval_s)


_presence: list[Presence] = []  # this process's worker, once ready


@worker_ready.connect
def _start_sweeper(sender: Consumer, **_kwargs) -> None:
    queues = list(sender.app.amqp.queues.consume_from or {})
    usable, dropped = devices.usable_queues(queues)
    for queue, why in dropped.items():
        log.warning("%s", why)  # `celery worker -Q gpu` run directly; `quantserve worker` has dropped it already
        sender.cancel_task_queue(queue)
    presence = Presence.of(sender.hostname, usable)
    _presence.append(presence)
    threading.Thread(target=_sweep_forever, args=(presence,), name="quantserve-sweeper", daemon=True).start()


@worker_shutting_down.connect
def _stop_serving(**_kwargs) -> None:
    # Runs in a signal handler: only set a flag; the sweeper deletes the row on its next round.
    for presence in _presence:
        presence.stopping.set()


@worker_shutdown.connect
def _deregister(**_kwargs) -> None:
    for presence in _presence:
        try:
            presence.remove(runtime().session_factory)
        except Exception:  # the row goes stale on its own
            log.exception("could not remove worker %s from the workers table", presence.hostname)
