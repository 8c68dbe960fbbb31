"""`quantserve serve` (SQLite) under 64 polling clients: every answer a 200, long polls wake, and it stops at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import select, update

from app.db import make_engine, make_session_factory, transaction
from app.models import ApiKey, Artifact, Job
from tests.conftest import ROOT, free_port, wait_http


def _insert_job(db_url: str, key: str) -> uuid.UUID:
    """A finished job with two artifacts, written straight into the embedded database (rows only, no files)."""
    from app.services.keys import hash_key

    engine = make_engine(db_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            tenant_id = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
            job = Job(tenant_id=tenant_id, model_id=uuid.uuid4(), method="dynamic", config={"dtype": "int8"},
                      status="succeeded", progress=1.0, attempt=1, metrics={"size": {"ratio": 0.27}})
            session.add(job)
            session.flush()
            for kind in ("model", "report"):
                session.add(Artifact(tenant_id=tenant_id, job_id=job.id, kind=kind, filename=f"{kind}.bin",
                                     size_bytes=1, sha256="0" * 64, storage_key=f"jobs/{job.id}/{kind}"))
            return job.id
    finally:
        engine.dispose()


async def _storm(base: str, key: str, path: str, clients: int, rounds: int) -> Counter:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=30.0) as client:
        async def poller() -> list[int]:
            return [(await client.get(path)).status_code for _ in range(rounds)]

        batches = await asyncio.wait_for(asyncio.gather(*(poller() for _ in range(clients))), timeout=120)
    return Counter(s for batch in batches for s in batch)


def test_embedded_mode_holds_64_pollers_wakes_long_polls_and_stops_cleanly(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "data"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("QUANTSERVE_")}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data), "--port",
                               str(port)], cwd=ROOT, env=env, stdout=open(tmp_path / "serve.log", "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", timeout=90, proc=server)
        key = (data / "bootstrap.key").read_text().strip()
        db_url = f"sqlite:///{data.resolve() / 'quantserve.db'}"
        job_id = _insert_job(db_url, key)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        first = client.get(f"/v1/jobs/{job_id}")
        assert first.status_code == 200 and len(first.json()["artifacts"]) == 2

        # A long poll wakes on a change made by another process (SQLite: the API re-reads twice a second).
        def change_later() -> None:
            time.sleep(1.0)
            engine = make_engine(db_url)
            with transaction(make_session_factory(engine)) as session:
                session.execute(update(Job).where(Job.id == job_id).values(progress=0.5))
            engine.dispose()

        changer = threading.Thread(target=change_later)
        changer.start()
        started = time.monotonic()
        woken = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}, headers={"If-None-Match": first.headers["etag"]})
        changer.join()
        assert woken.status_code == 200 and woken.json()["progress"] == 0.5
        assert time.monotonic() - started < 5

        statuses = asyncio.run(_storm(base, key, f"/v1/jobs/{job_id}", clients=64, rounds=15))
        assert statuses == Counter({200: 64 * 15}), statuses
    finally:
        # Right after the load: SIGTERM must end serve (and its worker) promptly, without a kill.
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise AssertionError("serve did not stop within 30 s of SIGTERM after the load run") from None
    assert time.monotonic() - started < 30
