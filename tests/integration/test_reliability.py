"""Crashes and outages on real processes: a SIGKILLed worker, Redis down at submission, PostgreSQL cut,
time and memory limits. The job row decides; nothing is lost, stuck or run twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests import models
from tests.conftest import (
    REDIS_URL,
    Service,
    free_port,
    fresh_pg_database,
    service_env,
    start_api,
    start_worker,
    stop,
    wait_for,
)
from tests.integration.helpers import submit, upload_model
from tests.integration.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX MLP big enough that its job runs for a few seconds on this machine."""
    torch.manual_seed(0)
    big = torch.nn.Sequential(*[torch.nn.Linear(1536, 1536) for _ in range(6)]).eval()
    return models.export_onnx(big, torch.zeros(2, 1536), tmp_path_factory.mktemp("slow") / "big.onnx", dynamo=False)


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


def _service(env: dict[str, str], tmp_path: Path, worker: subprocess.Popen | None) -> Service:
    api, base = start_api(env, tmp_path / "logs")
    return Service(base, env, Path(env["QUANTSERVE_DATA_DIR"]), api, worker, tmp_path / "logs")  # type: ignore[arg-type]


def _logs(client: httpx.Client, job_id: str) -> list[str]:
    return client.get(f"/v1/jobs/{job_id}/logs").text.splitlines()


def _log_messages(client: httpx.Client, job_id: str) -> list[str]:
    import json

    return [json.loads(line)["message"] for line in _logs(client, job_id)]


def _wait_running(client: httpx.Client, job_id: str, attempt: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["attempts"] == attempt:
            return
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"attempt {attempt} of job {job_id} never started")


def test_sigkilled_worker_job_is_retried_then_fails_worker_lost(database: str, tmp_path: Path,
                                                               slow_model: Path) -> None:
    import redis

    redis.Redis.from_url(f"{REDIS_URL}/12").flushdb()
    env = service_env(database, f"{REDIS_URL}/12", tmp_path / "data", job_lease_s="3", job_max_attempts="2",
                      sweep_interval_s="0.5")
    logs = tmp_path / "logs"
    worker = start_worker(env, logs, "victim-1")
    svc = _service(env, tmp_path, worker)
    client = svc.client()
    try:
        model = upload_model(client, slow_model)
        first = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
        # Attempt 1: the worker dies (kill -9) mid-job; the reaper requeues it when the lease expires.
        _wait_running(client, first["id"], 1)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        time.sleep(1)
        assert not _engine_running(first["id"]), "the engine child outlived its killed worker"
        worker = start_worker(env, logs, "rescuer")
        done = wait_for(client, f"/v1/jobs/{first['id']}", until=("succeeded", "failed"), timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        assert [m for m in _log_messages(client, first["id"]) if m == "succeeded"] == ["succeeded"]
        assert any("lost its worker; requeued" in line for line in _logs(client, first["id"]))
        assert {a["kind"] for a in done["artifacts"]} == {"model", "report", "report_html"}

        # A job whose worker dies on every attempt ends as worker_lost after max_attempts; it never loops.
        second = submit(client, {"model_id": model["id"], "method": "dynamic", "name": "doomed"}).json()
        for attempt in (1, 2):
            _wait_running(client, second["id"], attempt)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            worker = start_worker(env, logs, f"victim-{attempt + 1}")
        failed = wait_for(client, f"/v1/jobs/{second['id']}", until=("failed", "succeeded"), timeout=60)
        assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
        assert failed["attempts"] == 2
    finally:
        stop(svc.api)
        stop(worker)


def _engine_running(job_id: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"job-{job_id}"], capture_output=True).returncode == 0


def test_job_accepted_while_redis_is_down_runs_once_redis_is_back(database: str, tmp_path: Path) -> None:
    port = free_port()
    redis_cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    broker = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    env = service_env(database, f"redis://127.0.0.1:{port}/0", tmp_path / "data")
    worker = start_worker(env, tmp_path / "logs", "redis-test")
    svc = _service(env, tmp_path, worker)
    client = svc.client()
    try:
        _, _, x, _ = models.digits_data()
        model = upload_model(client, models.export_onnx(models.train_digits_mlp(), torch.from_numpy(x[:2]),
                                                        tmp_path / "m.onnx"))
        assert model["status"] == "ready"
        broker.terminate()
        broker.wait()
        started = time.monotonic()
        response = submit(client, {"model_id": model["id"], "method": "dynamic"})
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < 10, "submission hung on the dead broker"
        job_id = response.json()["id"]
        time.sleep(2)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        broker = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
        done = wait_for(client, f"/v1/jobs/{job_id}", until=("succeeded", "failed"), timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1
        time.sleep(2)  # a duplicate message, if any, must find nothing to claim
        starts = [line for line in _logs(client, job_id) if "attempt" in line and "started" in line]
        assert len(starts) == 1
    finally:
        stop(svc.api)
        stop(worker)
        broker.terminate()


def test_database_outage_is_503_with_retry_after_and_recovers(database: str, tmp_path: Path) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.start()
    api_db = database.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    env = service_env(api_db, f"{REDIS_URL}/13", tmp_path / "data")
    api, base = start_api(env, tmp_path / "logs")
    try:
        svc = Service(base, env, tmp_path / "data", api, api, tmp_path / "logs")
        client = svc.client()
        assert client.get("/v1/models").status_code == 200
        proxy.stop()
        # The job read runs on psycopg's own connection (app/services/job_reads.py): an outage is a 503 there too.
        for path in ("/v1/models", "/v1/jobs", f"/v1/jobs/{uuid.uuid4()}"):
            response = client.get(path)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
            assert response.json()["code"] == "unavailable"
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 503 and "database" in ready.json()["detail"]
        proxy.start()  # same port: the server came back
        deadline = time.monotonic() + 20
        while client.get("/v1/models").status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover after the database came back"
            time.sleep(0.5)
        assert httpx.get(base + "/readyz").status_code == 200
    finally:
        stop(api)
        proxy.stop()


def test_time_and_memory_limits_end_as_timeout_and_out_of_memory(database: str, tmp_path: Path,
                                                                  slow_model: Path) -> None:
    env = service_env(database, f"{REDIS_URL}/14", tmp_path / "data", job_time_limit_s="2")
    import redis

    redis.Redis.from_url(f"{REDIS_URL}/14").flushdb()
    worker = start_worker(env, tmp_path / "logs", "limits")
    svc = _service(env, tmp_path, worker)
    client = svc.client()
    try:
        model = upload_model(client, slow_model)
        job = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
        failed = wait_for(client, f"/v1/jobs/{job['id']}", until=("failed", "succeeded"), timeout=60)
        assert failed["status"] == "failed" and failed["error"]["code"] == "timeout", failed["error"]
        assert not _engine_running(job["id"])
    finally:
        stop(worker)
    oom_env = {**env, "QUANTSERVE_JOB_TIME_LIMIT_S": "600", "QUANTSERVE_JOB_MEMORY_LIMIT_MB": "200"}
    worker = start_worker(oom_env, tmp_path / "logs", "oom")
    try:
        job = submit(client, {"model_id": model["id"], "method": "dynamic", "name": "oom"}).json()
        failed = wait_for(client, f"/v1/jobs/{job['id']}", until=("failed", "succeeded"), timeout=60)
        assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory", failed["error"]
        # ... and the worker itself is unharmed: it still serves.
        assert worker.poll() is None
    finally:
        stop(svc.api)
        stop(worker)
        os.environ.pop("QUANTSERVE_JOB_MEMORY_LIMIT_MB", None)


def test_queued_job_whose_message_was_lost_is_published_again(service: Service, tmp_path: Path) -> None:
    import redis

    client = service.client()
    _, _, x, _ = models.digits_data()
    model = upload_model(client, models.export_onnx(models.train_digits_mlp(), torch.from_numpy(x[:2]),
                                                    tmp_path / "m.onnx"))
    os.kill(service.worker.pid, signal.SIGSTOP)
    try:
        job = submit(client, {"model_id": model["id"], "method": "dynamic", "name": "lost-message"}).json()
        time.sleep(0.5)
        redis.Redis.from_url(service.env["QUANTSERVE_BROKER_URL"]).flushdb()  # the broker forgets it
    finally:
        os.kill(service.worker.pid, signal.SIGCONT)
    done = wait_for(client, f"/v1/jobs/{job['id']}", until=("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1
