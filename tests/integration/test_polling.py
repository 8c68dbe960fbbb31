"""Polling under load (issue 13): no 500 and no hang when the pool is tiny, key cache TTL, ETag/304, long poll."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import torch

from tests import models
from tests.conftest import ROOT, Service, start_api, stop, wait_for
from tests.integration.helpers import submit, upload_model

KEY_TTL_S = 1.5


@pytest.fixture(scope="module")
def model(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("polling")
    _, _, x_test, _ = models.digits_data()
    onnx_path = models.export_onnx(models.train_digits_mlp(epochs=1), torch.from_numpy(x_test[:2]), tmp / "p.onnx")
    return upload_model(service.client("pollers"), onnx_path)


@pytest.fixture(scope="module")
def job(service: Service, model: dict) -> dict:
    client = service.client("pollers")
    body = wait_for(client, f"/v1/jobs/{submit(client, {'model_id': model['id'], 'method': 'dynamic'}).json()['id']}",
                    until=("succeeded", "failed"))
    assert body["status"] == "succeeded", body
    return body


@pytest.fixture(scope="module")
def tight_api(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process on the same database: 2 pooled connections, a 50 ms pool timeout, a short key TTL."""
    env = {**service.env, "QUANTSERVE_DB_POOL_SIZE": "2", "QUANTSERVE_DB_POOL_TIMEOUT_S": "0.05",
           "QUANTSERVE_KEY_CACHE_TTL_S": str(KEY_TTL_S), "QUANTSERVE_API_WORKERS": "1"}
    api, base = start_api(env, tmp_path_factory.mktemp("tight-logs"))
    yield base
    stop(api)


async def _poll_storm(base: str, key: str, paths: list[str], clients: int, rounds: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=30.0) as client:
        async def poller(i: int) -> list[httpx.Response]:
            return [await client.get(paths[i % len(paths)]) for _ in range(rounds)]

        batches = await asyncio.wait_for(asyncio.gather(*(poller(i) for i in range(clients))), timeout=120)
    return [r for batch in batches for r in batch]


def test_hundred_pollers_on_two_connections_get_only_200_or_503_and_never_hang(service: Service, job: dict,
                                                                             tight_api: str) -> None:
    # Half poll the job (async path, 2 connections), half its list (sync path, behind the admission limit).
    paths = [f"/v1/jobs/{job['id']}", "/v1/jobs?limit=5"]
    started = time.monotonic()
    responses = asyncio.run(_poll_storm(tight_api, service.key("pollers"), paths, clients=100, rounds=10))
    statuses = Counter((r.url.path, r.status_code) for r in responses)
    assert len(responses) == 1000 and {s for _, s in statuses} <= {200, 503}, statuses
    print(f"statuses of 100 pollers on 2 connections: {dict(statuses)}")
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"].isdigit(), r.headers
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "unavailable"
        elif r.url.path == paths[0]:
            assert r.json()["id"] == job["id"]
        else:
            assert "items" in r.json()
    assert time.monotonic() - started < 120
    # After the storm the process answers normally: nothing stayed stuck holding a connection or a thread.
    client = httpx.Client(base_url=tight_api, headers={"Authorization": f"Bearer {service.key('pollers')}"})
    assert client.get(paths[0]).status_code == 200 and client.get(paths[1]).status_code == 200


def test_a_revoked_key_is_refused_once_the_cache_ttl_has_passed(service: Service, tight_api: str) -> None:
    key = service.key("short-lived")
    client = httpx.Client(base_url=tight_api, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert client.get("/v1/jobs").status_code == 200  # looked up, and now cached
    subprocess.run([sys.executable, "-m", "app.cli", "keys", "revoke", key[:11]], env=service.env, cwd=ROOT,
                   check=True, capture_output=True)
    time.sleep(KEY_TTL_S + 0.5)  # the entry cached before the revoke has expired by now
    response = client.get("/v1/jobs")
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"


def test_an_unchanged_job_answers_304_to_its_etag(service: Service, job: dict) -> None:
    client = service.client("pollers")
    first = client.get(f"/v1/jobs/{job['id']}")
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and first.json()["artifacts"]
    again = client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": f"W/{etag}"}).status_code == 304
    assert client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": '"stale"'}).status_code == 200
    # Another tenant's ETag guess is still a 404, not a 304.
    other = service.client("not-pollers").get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert other.status_code == 404


def test_a_long_poll_returns_when_the_job_changes(service: Service, model: dict) -> None:
    client = service.client("pollers")
    created = submit(client, {"model_id": model["id"], "method": "dynamic"})
    assert created.status_code == 202
    first = client.get(created.headers["location"])
    started = time.monotonic()
    changed = client.get(created.headers["location"], params={"wait": 30},
                         headers={"If-None-Match": first.headers["etag"]})
    elapsed = time.monotonic() - started
    assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]
    seen = changed.json()
    assert (seen["status"], seen["stage"], seen["progress"]) != tuple(first.json()[k] for k in
                                                                      ("status", "stage", "progress"))
    assert elapsed < 20, f"the long poll took {elapsed:.1f} s to see the job change"
    final = wait_for(client, created.headers["location"], until=("succeeded", "failed"))
    # Nothing changes any more: the long poll waits its full time and answers 304.
    started = time.monotonic()
    idle = client.get(created.headers["location"], params={"wait": 1},
                      headers={"If-None-Match": client.get(created.headers["location"]).headers["etag"]})
    assert idle.status_code == 304 and time.monotonic() - started >= 0.9, final


def test_long_poll_wait_is_bounded_and_documented(service: Service, job: dict) -> None:
    client = service.client("pollers")
    response = client.get(f"/v1/jobs/{job['id']}", params={"wait": 61})
    assert response.status_code == 422 and response.json()["code"] == "validation_error"
    params = {p["name"]: p for p in client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}"]["get"]
              ["parameters"]}
    assert params["wait"]["schema"]["maximum"] == 60 and "Long poll" in params["wait"]["description"]


def test_uploads_do_not_hold_a_connection_while_the_body_streams(service: Service, tight_api: str) -> None:
    """More half-sent uploads than the sync admission limit (10) do not stop the sync routes: a streaming upload
    holds neither a connection nor an admission slot."""
    import socket
    from urllib.parse import urlparse

    url, key = urlparse(tight_api), service.key("pollers")
    socks = []
    try:
        for _ in range(12):
            sock = socket.create_connection((url.hostname, url.port), timeout=10)
            sock.sendall(f"PUT /v1/datasets/upload?name=slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         f"Content-Length: {10 * 1024 * 1024}\r\n\r\n".encode() + b"\0" * 65536)
            socks.append(sock)
        client = httpx.Client(base_url=tight_api, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        for _ in range(20):
            assert client.get("/v1/jobs?limit=1").status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_cached_poll_answer_goes_stale_only_until_the_change_is_notified(service: Service, job: dict) -> None:
    """Polls of an unchanged job are answered from memory (app/job_cache.py); a change written by anyone, here
    plain SQL from outside, reaches the next polls as soon as PostgreSQL's notification arrives."""
    from sqlalchemy import create_engine, text

    client, path = service.client("pollers"), f"/v1/jobs/{job['id']}"
    before = [client.get(path) for _ in range(3)]
    assert {r.headers["etag"] for r in before} == {before[0].headers["etag"]}
    engine = create_engine(service.env["QUANTSERVE_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET labels = CAST(:labels AS JSONB) WHERE id = :id"),
                         {"labels": '{"cache": "changed"}', "id": job["id"]})
        deadline, seen = time.monotonic() + 5, None
        while time.monotonic() < deadline:
            seen = client.get(path)
            if seen.json()["labels"] == {"cache": "changed"}:
                break
            time.sleep(0.02)
        assert seen is not None and seen.json()["labels"] == {"cache": "changed"}, "the change never showed"
        assert seen.headers["etag"] != before[0].headers["etag"]
        # another tenant still gets 404, never the cached answer
        assert service.client("not-pollers").get(path).status_code == 404
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET labels = CAST(:labels AS JSONB) WHERE id = :id"),
                         {"labels": json.dumps(job["labels"]), "id": job["id"]})
        engine.dispose()


def test_a_poll_right_after_a_cancel_sees_the_cancel(service: Service, model: dict) -> None:
    client = service.client("pollers")
    created = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
    for _ in range(3):
        client.get(f"/v1/jobs/{created['id']}")  # cache it, if it is still queued or running
    cancelled = client.post(f"/v1/jobs/{created['id']}/cancel")
    assert cancelled.status_code in (200, 409), cancelled.text  # 409: it ended first; then it shows how
    status = client.get(f"/v1/jobs/{created['id']}").json()["status"]
    assert status == "cancelled" if cancelled.status_code == 200 else status in ("succeeded", "failed")
