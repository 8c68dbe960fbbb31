"""The Python client against the real service (PostgreSQL, Redis, a Celery worker, the API): typed errors,
idempotent submits, cursor paging, resumed downloads, and retries through a real database outage (503 +
Retry-After) and a real connection loss."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from quantserve_client import ApiError, Client
from quantserve_client.schemas import JobPublic
from tests import models
from tests.conftest import REDIS_URL, Service, fresh_pg_database, service_env, start_api, stop
from tests.integration.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    return models.export_onnx(net, torch.zeros(1, 64), tmp_path_factory.mktemp("client") / "mlp.onnx", dynamo=False)


@pytest.fixture(scope="module")
def qs(service: Service) -> Iterator[Client]:
    with Client(service.base_url, service.key("client-tenant")) as client:
        yield client


@pytest.fixture(scope="module")
def done_job(qs: Client, mlp: Path) -> JobPublic:
    model = qs.upload_model(mlp, name="client-mlp")
    return qs.wait(qs.submit(model, "dynamic", name="client-job"), timeout_s=180)


def _statuses(client: Client) -> list[tuple[int, str | None]]:
    """Every answer this client receives from now on: (status, the Range it asked for)."""
    seen: list[tuple[int, str | None]] = []
    client.http.event_hooks["response"].append(lambda r: seen.append((r.status_code, r.request.headers.get("range"))))
    return seen


def test_errors_arrive_as_the_servers_problem_details(qs: Client, tmp_path: Path, done_job: JobPublic) -> None:
    garbage = tmp_path / "not-a-model.bin"
    garbage.write_bytes(b"\x00definitely not a model" * 10)
    with pytest.raises(ApiError) as refused:
        qs.upload_model(garbage)
    assert (refused.value.status, refused.value.code) == (415, "unsupported_format")
    with pytest.raises(ApiError) as invalid:
        qs.submit(done_job.model_id, "qat")
    assert invalid.value.status == 422 and invalid.value.code == "unsupported_method"
    assert invalid.value.errors and invalid.value.detail


def test_a_submit_is_idempotent_with_its_key_and_separate_submits_are_separate_jobs(
        qs: Client, done_job: JobPublic) -> None:
    first = qs.submit(done_job.model_id, "dynamic", idempotency_key="client-test-1")
    again = qs.submit(done_job.model_id, "dynamic", idempotency_key="client-test-1")
    assert again.id == first.id
    other = qs.submit(done_job.model_id, "dynamic")  # a generated key: a new job
    assert other.id != first.id
    for job in (first, other):
        assert qs.wait(job, timeout_s=180).status == "succeeded"


def test_jobs_follow_the_cursor_newest_first(qs: Client, done_job: JobPublic) -> None:
    listed = list(qs.jobs(page_size=1, limit=3))
    assert len(listed) == 3 and len({j.id for j in listed}) == 3
    assert [j.created_at for j in listed] == sorted((j.created_at for j in listed), reverse=True)
    assert done_job.id in {j.id for j in qs.jobs(status="succeeded")}


def test_a_cut_download_resumes_with_a_range_and_a_damaged_part_is_fetched_again(
        qs: Client, done_job: JobPublic, tmp_path: Path) -> None:
    (artifact,) = [a for a in done_job.artifacts if a.kind == "model"]
    head = qs.http.get(artifact.download_url, headers={"Range": "bytes=0-999"})
    assert head.status_code == 206
    part = tmp_path / f"{artifact.filename}.{artifact.sha256[:16]}.part"
    part.write_bytes(head.content)  # what a download cut after 1000 bytes leaves behind
    seen = _statuses(qs)
    (path,) = qs.download(done_job, tmp_path)
    assert (206, "bytes=1000-") in seen, seen
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256 and not part.exists()

    path.unlink()
    part.write_bytes(b"\xff" * 1000)  # a .part whose bytes are not the artifact's
    seen.clear()
    (path,) = qs.download(done_job, tmp_path)
    assert [s for s, _ in seen] == [206, 200], seen  # resumed, failed its sha256, fetched whole
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256


def test_reports_come_back_as_json(qs: Client, done_job: JobPublic) -> None:
    report = qs.report(done_job)
    assert report["job_id"] == str(done_job.id) and report["metrics"]["size"]["quantized_bytes"] > 0
    assert any(line.message for line in qs.logs(done_job))


def test_calls_ride_out_a_database_outage_and_a_lost_connection(tmp_path: Path) -> None:
    db_proxy, api_proxy = TcpProxy("127.0.0.1", 5432), None
    db_proxy.start()
    with fresh_pg_database() as database:
        env = service_env(database.replace("127.0.0.1:5432", f"127.0.0.1:{db_proxy.port}"), f"{REDIS_URL}/14",
                          tmp_path / "data")
        api, base = start_api(env, tmp_path / "logs")
        try:
            key = Service(base, env, tmp_path / "data", api, api, tmp_path / "logs").key("outage")
            api_proxy = TcpProxy("127.0.0.1", int(base.rsplit(":", 1)[1]))
            api_proxy.start()
            with Client(f"http://127.0.0.1:{api_proxy.port}", key, retries=12, max_backoff_s=1) as qs:
                seen = _statuses(qs)
                assert list(qs.jobs()) == []
                # The database goes away for 3 s: the API answers 503 + Retry-After, and the client waits it out.
                db_proxy.stop()
                threading.Timer(3.0, db_proxy.start).start()
                started = time.monotonic()
                assert list(qs.jobs()) == []
                assert 503 in [s for s, _ in seen] and time.monotonic() - started >= 2.5, seen
                # The API itself becomes unreachable for 2 s (connections refused): the client reconnects.
                api_proxy.stop()
                threading.Timer(2.0, api_proxy.start).start()
                started = time.monotonic()
                assert qs.capabilities().version
                assert time.monotonic() - started >= 1.5
        finally:
            stop(api)
            db_proxy.stop()
            if api_proxy:
                api_proxy.stop()
    with pytest.raises(httpx.ConnectError):  # and when nothing comes back, it gives up and says so
        Client(f"http://127.0.0.1:{api_proxy.port}", key, retries=1, backoff_s=0.01).capabilities()
