"""Workers: each writes what it serves (devices, queues, format/method pairs); the API reads the live ones.

torch-free: the worker detects its devices (worker/devices.py) and hands plain JSON to `register`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Worker, utcnow
from worker.task_names import QUEUE_FOR_DEVICE


def register(session: Session, hostname: str, *, queues: list[str], devices: dict[str, Any],
             capabilities: dict[str, list[str]]) -> None:
    """Insert this worker's row, or take over the row of an earlier process with the same name."""
    now = utcnow()
    values = {"queues": sorted(queues), "devices": devices, "capabilities": capabilities, "started_at": now,
              "last_seen": now}
    if session.execute(update(Worker).where(Worker.hostname == hostname).values(**values)).rowcount:
        return
    try:
        with session.begin_nested():  # two registrations racing for one name: the second updates instead
            session.add(Worker(hostname=hostname, **values))
            session.flush()
    except IntegrityError:
        session.execute(update(Worker).where(Worker.hostname == hostname).values(**values))


def touch(session: Session, hostname: str) -> bool:
    """Refresh last_seen; False when the row is gone (pruned, or the database was restored): register again."""
    return bool(session.execute(update(Worker).where(Worker.hostname == hostname)
                                .values(last_seen=utcnow())).rowcount)


def remove(session: Session, hostname: str) -> None:
    session.execute(delete(Worker).where(Worker.hostname == hostname))


def prune(session: Session, older_than_s: float) -> int:
    """Forget workers that stopped without saying so (SIGKILL, lost host) long ago; they are not live anyway."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return session.execute(delete(Worker).where(Worker.last_seen < cutoff)).rowcount or 0


def live(session: Session, ttl_s: float) -> list[Worker]:
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    return list(session.scalars(select(Worker).where(Worker.last_seen >= cutoff).order_by(Worker.hostname)))


def served_by(worker: Worker) -> list[str]:
    """The devices a worker both has and takes jobs for (it consumes that device's queue)."""
    return sorted(d for d in worker.devices or {} if QUEUE_FOR_DEVICE.get(d) in (worker.queues or []))


@dataclass
class LiveDevice:
    """One kind of device served by live workers: same device type, name, flags and methods."""

    device: str
    queue: str
    name: str | None
    flags: list[str]
    methods: list[str]
    workers: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "queue": self.queue, "name": self.name, "flags": self.flags,
                "methods": self.methods, "workers": self.workers, "details": self.details}


def live_devices(workers: Iterable[Worker]) -> list[LiveDevice]:
    """Served devices grouped by kind, without host names: tenants see what runs, not where."""
    groups: dict[tuple, LiveDevice] = {}
    for worker in workers:
        for device in served_by(worker):
            info = dict(worker.devices[device] or {})
            name, flags = info.pop("name", None), sorted(info.pop("flags", []) or [])
            methods = sorted((worker.capabilities or {}).get(device, []))
            key = (device, name, tuple(flags), tuple(methods))
            group = groups.setdefault(key, LiveDevice(device, QUEUE_FOR_DEVICE[device], name, flags, methods,
                                                      details=info))
            group.workers += 1
    return sorted(groups.values(), key=lambda g: (g.device, g.name or "", g.flags))
