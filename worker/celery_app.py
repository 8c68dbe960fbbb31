"""The Celery app and its settings. Each setting says why; PostgreSQL, not Celery, holds job state."""

from __future__ import annotations

import functools

from celery import Celery

from app.settings import Settings, get_settings
from worker import task_names


def _transport_options(settings: Settings) -> dict:
    url = settings.effective_broker_url
    if url.startswith(("redis", "rediss")):
        # Redis redelivers an unacked message after this long; keep it above the job time limit.
        options: dict = {"visibility_timeout": int(settings.job_time_limit_s) + 3600}
        if settings.broker_key_prefix:  # several deployments (or test runs) can share one Redis
            options["global_keyprefix"] = settings.broker_key_prefix
        return options
    return {}


def create_celery(settings: Settings) -> Celery:
    app = Celery("quantserve", broker=settings.effective_broker_url, include=["worker.tasks"])
    app.conf.update(
        # JSON only: a pickle serializer would let anyone who can write to the broker run code.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in PostgreSQL (the job row); a result backend would be a second source of truth.
        task_ignore_result=True,
        # Ack after the task returns, and requeue if the worker process dies mid-task: the job row's
        # conditional claim makes a redelivered copy harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time: a long job must not hold other jobs hostage in a worker's prefetch buffer.
        worker_prefetch_multiplier=1,
        # Jobs run for minutes to hours; the broker must not redeliver while one still runs (Redis visibility
        # timeout). Lost workers are detected by the job lease instead, which is much shorter.
        broker_transport_options=_transport_options(settings),
        # Explicit routes: the API publishes by name to the queue of the job's device.
        task_routes={task_names.VALIDATE_MODEL: {"queue": task_names.VALIDATION_QUEUE},
                     task_names.VALIDATE_DATASET: {"queue": task_names.VALIDATION_QUEUE}},
        task_default_queue="cpu",
        # A running task keeps going when the broker connection drops: its lease and fencing token, not the
        # broker, decide whether its result is kept.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # The engine runs in a child process per job, so the worker itself stays small; threads wait on it.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
    )
    return app


@functools.cache
def _worker_app() -> Celery:
    return create_celery(get_settings())


def __getattr__(name: str) -> Celery:
    # `celery_app` is built on first use (tasks.py, the worker command), not at import: the API imports
    # create_celery from here for its own publisher, and must not carry this second Celery app along.
    if name == "celery_app":
        return _worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
