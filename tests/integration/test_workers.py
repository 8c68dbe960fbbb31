"""Real workers publish the devices they have; capabilities and the job check believe only live ones."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import Engine, create_engine, delete, select
from sqlalchemy.orm import Session

from app.models import Worker, utcnow
from tests import models
from tests.conftest import Service, start_worker, stop
from tests.integration.helpers import submit, upload_model
from worker.devices import cpu_flags
from worker.engine import registry
from worker.engine.report import host_info


@pytest.fixture(scope="module")
def db(service: Service) -> Iterator[Engine]:
    engine = create_engine(service.env["QUANTSERVE_DATABASE_URL"])
    yield engine
    engine.dispose()


def _capabilities(service: Service, until=lambda doc: True, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    with service.client("devices") as client:
        while True:
            response = client.get("/v1/capabilities")
            assert response.status_code == 200, response.text
            doc = response.json()
            if until(doc) or time.monotonic() > deadline:
                return doc
            time.sleep(0.5)


def test_capabilities_list_the_live_workers_cpu_with_its_flags(service: Service) -> None:
    doc = _capabilities(service, until=lambda d: "cpu" in d["served_devices"])
    assert doc["served_devices"] == ["cpu"], doc  # this host has no CUDA: the worker dropped the gpu queue
    (cpu,) = [d for d in doc["live_devices"] if d["device"] == "cpu"]
    assert cpu["name"] == host_info()["model"] and cpu["flags"] == cpu_flags()
    assert "onnx/dynamic" in cpu["methods"] and cpu["queue"] == "cpu" and cpu["workers"] >= 1
    assert doc["devices"] == registry.devices()  # the registry's own view, as before


def test_a_cuda_job_on_a_host_without_a_gpu_is_422_naming_cpu_as_served(service: Service, tmp_path: Path) -> None:
    _capabilities(service, until=lambda d: "cpu" in d["served_devices"])
    client = service.client("devices")
    path = models.export_onnx(models.wide_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    model = upload_model(client, path)
    response = submit(client, {"model_id": model["id"], "method": "dynamic", "device": "cuda"})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert "no live worker serves device 'cuda'; served: cpu" in problem["detail"], problem
    assert ["body", "device"] in [e["loc"] for e in problem["errors"]]


def _cuda_pair() -> tuple[str, str] | None:
    pairs = sorted((f.value, m.value) for (f, m), spec in registry.SPECS.items() if "cuda" in spec.devices)
    return ("torch_export", "weight_only") if ("torch_export", "weight_only") in pairs else None


@pytest.mark.skipif(_cuda_pair() is None, reason="the registry has no cuda entry for torch_export/weight_only")
def test_a_cuda_job_goes_to_the_gpu_queue_only_while_a_live_worker_serves_cuda(service: Service, db: Engine,
                                                                               tmp_path: Path) -> None:
    import redis

    _capabilities(service, until=lambda d: "cpu" in d["served_devices"])
    client = service.client("devices")
    path = models.save_torch_export(models.wide_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "m.pt2")
    body = {"model_id": upload_model(client, path)["id"], "method": "weight_only", "device": "cuda",
            "config": {"dtype": "int4", "group_size": 32}}  # torch.export weight-only on cuda is int4, group-wise
    refused = submit(client, body)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == "no live worker serves device 'cuda'; served: cpu"
    hostname = f"gpu-{uuid.uuid4().hex[:6]}@test"
    with Session(db) as session, session.begin():  # a gpu worker that has published, but takes nothing here
        session.add(Worker(hostname=hostname, queues=["gpu"], devices={"cuda": {"name": "Test GPU"}},
                           capabilities={"cuda": ["torch_export/weight_only"]}, started_at=utcnow(),
                           last_seen=utcnow()))
    try:
        accepted = submit(client, body)
        assert accepted.status_code == 202, accepted.text
        queue = redis.Redis.from_url(service.env["QUANTSERVE_BROKER_URL"])
        gpu_key = service.env["QUANTSERVE_BROKER_KEY_PREFIX"] + "gpu"
        deadline = time.monotonic() + 30
        while queue.llen(gpu_key) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue.llen(gpu_key) > 0, "the cuda job was not published to the gpu queue"
        assert client.post(f"/v1/jobs/{accepted.json()['id']}/cancel").status_code == 200
    finally:
        with Session(db) as session, session.begin():
            session.execute(delete(Worker).where(Worker.hostname == hostname))


def test_a_worker_whose_heartbeat_is_stale_is_not_listed(service: Service, db: Engine) -> None:
    gpu = {"name": f"Stale GPU {uuid.uuid4().hex[:6]}", "count": 1, "memory_mb": 1024}
    hostname = f"stale-{uuid.uuid4().hex[:6]}@nowhere"
    with Session(db) as session, session.begin():
        session.add(Worker(hostname=hostname, queues=["gpu"], devices={"cuda": gpu}, capabilities={"cuda": []},
                           started_at=utcnow() - timedelta(hours=1), last_seen=utcnow() - timedelta(minutes=5)))
    try:
        doc = _capabilities(service)
        assert "cuda" not in doc["served_devices"], doc
        assert gpu["name"] not in [d["name"] for d in doc["live_devices"]]
        with Session(db) as session, session.begin():  # the same row, fresh: now it counts
            session.get(Worker, hostname).last_seen = utcnow()
        doc = _capabilities(service)
        assert "cuda" in doc["served_devices"] and gpu["name"] in [d["name"] for d in doc["live_devices"]]
    finally:
        with Session(db) as session, session.begin():
            session.execute(delete(Worker).where(Worker.hostname == hostname))


def test_a_worker_that_stops_removes_itself(service: Service, db: Engine) -> None:
    name = f"leaving-{uuid.uuid4().hex[:6]}"
    worker = start_worker(service.env, service.logs, name)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Session(db) as session:
                row = session.scalar(select(Worker).where(Worker.hostname.startswith(f"{name}@")))
            if row is not None:
                break
            assert worker.poll() is None, "the worker exited"
            time.sleep(0.5)
        assert row is not None, "the worker never registered"
        assert row.queues == ["cpu", "webhooks"]  # asked for cpu,gpu,webhooks on a host without CUDA
        assert row.capabilities["cpu"] and "cuda" not in row.devices
    finally:
        stop(worker)
    with Session(db) as session:
        assert session.scalar(select(Worker).where(Worker.hostname.startswith(f"{name}@"))) is None


def test_the_worker_reports_its_engine_isolation_at_start_up_and_in_readyz(service: Service) -> None:
    from worker import sandbox

    mode = sandbox.isolation().mode  # this host's answer; the worker probes the same way
    _capabilities(service, until=lambda d: "cpu" in d["served_devices"])
    ready = httpx.get(service.base_url + "/readyz", timeout=30).json()
    assert ready["isolation"].get(mode, 0) >= 1, ready
    logs = "".join(p.read_text(errors="replace") for p in service.logs.glob("worker-*.log"))
    assert f"engine isolation: {mode}" in logs
