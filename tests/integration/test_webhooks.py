"""Webhooks end to end: PostgreSQL + Redis + a real Celery worker + the API, POSTing to a real local receiver
that the operator allowed (127.0.0.1/32 only), verified with the client's own verifier."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
import torch

from quantserve_client import WebhookVerificationError, verify_webhook
from tests import models
from tests.conftest import REDIS_URL, Service, fresh_pg_database, service_env, start_api, start_worker, stop, wait_for
from tests.integration.helpers import submit, upload_model
from tests.webhook_receiver import Receiver


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Its own API and worker (and Redis database 15): webhooks to 127.0.0.1/32 allowed, quick retries."""
    import redis

    redis.Redis.from_url(f"{REDIS_URL}/15").flushdb()
    with fresh_pg_database() as database_url:
        data_dir = tmp_path_factory.mktemp("hooks-data")
        env = service_env(database_url, f"{REDIS_URL}/15", data_dir, webhook_allowed_cidrs="127.0.0.1/32",
                          webhook_retry_base_s="0.5", webhook_max_attempts="4",
                          webhook_signing_key=uuid.uuid4().hex)
        logs = tmp_path_factory.mktemp("hooks-logs")
        worker = start_worker(env, logs, f"hooks-{uuid.uuid4().hex[:6]}")
        api, base = start_api(env, logs)
        try:
            yield Service(base, env, data_dir, api, worker, logs)
        finally:
            stop(api)
            stop(worker)


@pytest.fixture(scope="module")
def setup(hooks: Service, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    path = models.export_onnx(models.DigitsMLP(), torch.zeros(2, 1, 8, 8), tmp_path_factory.mktemp("m") / "mlp.onnx")
    client = hooks.client("acme")
    model = upload_model(client, path)
    assert client.get("/v1/webhooks/secret").status_code == 404
    # No secret yet: a callback_url cannot be signed, so it is refused before the job exists.
    refused = submit(client, {"model_id": model["id"], "method": "dynamic", "callback_url": "http://127.0.0.1:9/"})
    assert refused.status_code == 422 and "POST /v1/webhooks/secret" in refused.json()["detail"], refused.text
    created = client.post("/v1/webhooks/secret")
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert secret.startswith("whsec_")
    described = client.get("/v1/webhooks/secret").json()
    assert described["secret"] is None and secret.startswith(described["prefix"])  # shown once, never again
    return {"model": model, "secret": secret, "client": client}


def _logs(client: httpx.Client, job_id: str) -> list[str]:
    return [json.loads(line)["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").text.splitlines()]


def _wait_logged(client: httpx.Client, job_id: str, text: str, timeout: float = 30.0) -> list[str]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _logs(client, job_id)
        if any(text in line for line in lines):
            return lines
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in the job's logs: {_logs(client, job_id)}")


def test_a_succeeded_job_posts_a_signed_webhook_that_the_client_verifies(setup: dict) -> None:
    client, secret = setup["client"], setup["secret"]
    with Receiver() as receiver:
        job = submit(client, {"model_id": setup["model"]["id"], "method": "dynamic",
                              "callback_url": receiver.url("/hook?token=abc")}).json()
        assert job["callback_url"] == receiver.url("/hook?token=abc")
        wait_for(client, f"/v1/jobs/{job['id']}", until=("succeeded", "failed"))
        [hook] = receiver.wait(1)
    assert hook.path == "/hook?token=abc"
    event = verify_webhook(secret, hook.headers, hook.body)
    assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job["id"]
    assert event["data"]["url"] == f"/v1/jobs/{job['id']}"
    with pytest.raises(WebhookVerificationError):  # the body altered on the way
        verify_webhook(secret, hook.headers, hook.body.replace(b"succeeded", b"failed"))
    with pytest.raises(WebhookVerificationError):  # signed by anyone but quantserve with this tenant's secret
        verify_webhook(client.post("/v1/webhooks/secret").json()["secret"], hook.headers, hook.body)
    lines = _wait_logged(client, job["id"], "delivered")
    assert not any("token=abc" in line for line in lines)  # the query string may be a credential: not logged


def test_a_failing_receiver_is_retried_and_each_attempt_is_in_the_job_logs(setup: dict) -> None:
    client = setup["client"]
    with Receiver(statuses=(503, 500)) as receiver:
        job = submit(client, {"model_id": setup["model"]["id"], "method": "dynamic",
                              "callback_url": receiver.url()}).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")  # from the API: its outbox sends the webhook
        assert cancelled.status_code == 200, cancelled.text
        hooks = receiver.wait(3)
        lines = _wait_logged(client, job["id"], "attempt 3/4")
    assert {h.headers["webhook-id"] for h in hooks} == {hooks[0].headers["webhook-id"]}
    assert json.loads(hooks[2].body)["type"] == "job.cancelled"
    assert any("attempt 1/4" in line and "HTTP 503" in line and "next attempt in 0.5 s" in line for line in lines)
    assert any("attempt 2/4" in line and "HTTP 500" in line and "next attempt in 1 s" in line for line in lines)
    assert any("attempt 3/4" in line and "delivered" in line for line in lines)


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.2:9/hook", "loopback"),  # loopback, but not the allowed 127.0.0.1/32
    ("http://10.0.0.7/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[::1]:9/", "loopback"),
    ("ftp://example.com/hook", "http"),
    ("https://example.com/" + "a" * 2100, "2048"),
])
def test_a_callback_url_the_policy_refuses_is_a_422_naming_the_field(setup: dict, url: str, why: str) -> None:
    response = submit(setup["client"], {"model_id": setup["model"]["id"], "method": "dynamic", "callback_url": url})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "validation_error" and why in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "callback_url"]

