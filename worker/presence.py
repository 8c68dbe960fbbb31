"""This worker's row in `workers`: written when it is ready, refreshed by every sweep, removed when it stops.

The API reads the live rows (last_seen within Settings.worker_ttl_s) for /v1/capabilities and to refuse a job
for a device no live worker serves. A worker killed without warning simply stops refreshing its row.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.services import workers
from worker import devices, sandbox

log = logging.getLogger("quantserve.worker")
PRUNE_AFTER_S = 24 * 3600.0  # rows of workers gone this long are deleted (they stopped being live long before)


@dataclass
class Presence:
    hostname: str
    queues: list[str]
    devices: dict[str, dict[str, Any]]
    capabilities: dict[str, list[str]]
    stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def of(cls, hostname: str, queues: list[str]) -> Presence:
        have = devices.detect("gpu" in queues)
        # Part of each device's description, so /readyz and /v1/capabilities can say it without a new column:
        # every job on that device runs under it.
        for description in have.values():
            description["isolation"] = sandbox.isolation().mode
        return cls(hostname, sorted(queues), have, devices.capabilities(devices.served(queues, have)))

    def register(self, factory: sessionmaker[Session]) -> None:
        with transaction(factory) as session:
            workers.register(session, self.hostname, queues=self.queues, devices=self.devices,
                             capabilities=self.capabilities)
        mode = sandbox.isolation().mode
        log.log(logging.INFO if mode == "netns" else logging.WARNING,
                "worker %s serves %s on queues %s; engine isolation: %s%s", self.hostname,
                ", ".join(self.capabilities) or "nothing", ", ".join(self.queues), mode,
                "" if mode == "netns" else " (jobs can reach whatever the worker's network reaches: keep workers "
                "on an internal network, README 'Threat model')")

    def beat(self, factory: sessionmaker[Session]) -> None:
        """One heartbeat: refresh the row (re-register if it vanished); once stopping, delete it instead."""
        if self.stopping.is_set():
            self.remove(factory)
            return
        with transaction(factory) as session:
            if workers.touch(session, self.hostname):
                workers.prune(session, PRUNE_AFTER_S)
                return
        self.register(factory)

    def remove(self, factory: sessionmaker[Session]) -> None:
        with transaction(factory) as session:
            workers.remove(session, self.hostname)
