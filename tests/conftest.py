"""Fixtures that start real services: a fresh PostgreSQL database, Redis, a Celery worker, the API."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("QUANTSERVE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QUANTSERVE_TEST_REDIS", "redis://127.0.0.1:6379")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody holds, below the kernel's ephemeral range (32768+ on Linux).

    A port the kernel picks for bind(0) comes from the ephemeral range, so between our close and the server's
    bind an outgoing connection (PostgreSQL, Redis, a Celery worker) can take it as its source port, and the
    server dies with "address already in use". Ports below that range are never handed out implicitly. A port
    is also never returned twice in one run.
    """
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port between 20000 and 32000")


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> float:
    """SIGTERM, then SIGKILL after `timeout`; the seconds it took to exit (inf if it had to be killed)."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return float("inf")
    return time.monotonic() - started


@dataclass
class Service:
    """A running API + worker pair and a way to make tenant keys."""

    base_url: str
    env: dict[str, str]
    data_dir: Path
    api: subprocess.Popen
    worker: subprocess.Popen
    logs: Path
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant],
                                 env=self.env, capture_output=True, text=True, check=True, cwd=ROOT)
            self.keys[tenant] = out.stdout.strip().splitlines()[-1]
        return self.keys[tenant]

    def client(self, tenant: str = "acme") -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60.0,
                            headers={"Authorization": f"Bearer {self.key(tenant)}"})


def start_service(env: dict[str, str], data_dir: Path, logs: Path) -> Service:
    worker = start_worker(env, logs, f"worker-{uuid.uuid4().hex[:6]}")
    api, base = start_api(env, logs)
    return Service(base, env, data_dir, api, worker, logs)


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new PostgreSQL database with the migrations applied; dropped afterwards."""
    from sqlalchemy import create_engine, text

    from app.migrate import upgrade

    name = f"quantserve_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


def service_env(database_url: str, broker_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {**os.environ, "QUANTSERVE_DATABASE_URL": database_url, "QUANTSERVE_BROKER_URL": broker_url,
           "QUANTSERVE_DATA_DIR": str(data_dir), "QUANTSERVE_HEARTBEAT_S": "0.5", "QUANTSERVE_JOB_LEASE_S": "10",
           "QUANTSERVE_SWEEP_INTERVAL_S": "1", "QUANTSERVE_REDISPATCH_AFTER_S": "5",
           "QUANTSERVE_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
           "QUANTSERVE_MAX_DATASET_BYTES": str(128 * 1024 * 1024)}
    # Its own Redis key space: two test runs on one machine must not consume each other's tasks.
    env["QUANTSERVE_BROKER_KEY_PREFIX"] = f"qs-test-{uuid.uuid4().hex[:8]}:"
    env.update({f"QUANTSERVE_{k.upper()}": v for k, v in overrides.items()})
    return env


def start_worker(env: dict[str, str], logs: Path, name: str) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--queues", "cpu,gpu,webhooks",
                             "--hostname", f"{name}@%h"], env=env, cwd=ROOT,
                            stdout=open(logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT)


def start_api(env: dict[str, str], logs: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    logs.mkdir(parents=True, exist_ok=True)
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=env, cwd=ROOT,
                           stdout=open(logs / "api.log", "ab"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz", proc=api)
    return api, base


@pytest.fixture(scope="session")
def service(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The production topology: PostgreSQL + Redis + a real Celery worker process + the API over HTTP."""
    import redis

    db_index = 11
    redis.Redis.from_url(f"{REDIS_URL}/{db_index}").flushdb()
    data_dir = tmp_path_factory.mktemp("quantserve-data")
    env = service_env(pg_database, f"{REDIS_URL}/{db_index}", data_dir)
    svc = start_service(env, data_dir, tmp_path_factory.mktemp("logs"))
    yield svc
    stop(svc.api)
    stop(svc.worker)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - tests.s3server.S3Server
    """A real S3 server (SeaweedFS) for the whole run; each user makes its own bucket."""
    from tests.s3server import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), tmp_path_factory.mktemp("logs") / "weed.log") as server:
        yield server


@pytest.fixture(scope="session")
def s3_service(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The production topology with its artifacts in S3: API and worker reach SeaweedFS through a proxy that a
    test can cut (s3_service.s3_proxy), and share no folder."""
    import redis

    from tests.integration.tcp_proxy import TcpProxy

    proxy = TcpProxy("127.0.0.1", int(s3_server.endpoint.rsplit(":", 1)[1]))
    proxy.start()
    bucket = s3_server.new_bucket()
    db_index = 12
    redis.Redis.from_url(f"{REDIS_URL}/{db_index}").flushdb()
    with fresh_pg_database() as database_url:
        data_dir = tmp_path_factory.mktemp("quantserve-s3-api")
        env = {**service_env(database_url, f"{REDIS_URL}/{db_index}", data_dir), **s3_server.env(bucket),
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        logs = tmp_path_factory.mktemp("logs-s3")
        worker_dir = tmp_path_factory.mktemp("quantserve-s3-worker")  # the worker's own scratch, not the API's
        worker = start_worker({**env, "QUANTSERVE_DATA_DIR": str(worker_dir)}, logs, f"s3worker-{uuid.uuid4().hex[:6]}")
        api, base = start_api(env, logs)
        svc = Service(base, env, data_dir, api, worker, logs)
        svc.s3_bucket, svc.s3_server, svc.s3_proxy = bucket, s3_server, proxy  # type: ignore[attr-defined]
        try:
            yield svc
        finally:
            stop(api)
            stop(worker)
            proxy.stop()


@pytest.fixture(params=["local", "s3"])
def any_service(request: pytest.FixtureRequest) -> Service:
    """The integration core runs once on the local folder and once on S3."""
    return request.getfixturevalue("service" if request.param == "local" else "s3_service")


def wait_for(client: httpx.Client, path: str, *, until: tuple[str, ...], timeout: float = 180.0) -> dict:
    """Poll a resource until its status is one of `until`; fail with the last body otherwise."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = client.get(path)
        response.raise_for_status()
        body = response.json()
        if body["status"] in until:
            return body
        time.sleep(0.25)
    raise AssertionError(f"{path} still {body.get('status')} after {timeout} s: {body}")
