"""Webhooks without services: the client's verifier against the server's signer, the SSRF policy, and one
delivery attempt at a time against a real local receiver (SQLite), including the delivery-time address check."""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app import webhooks
from app.db import make_engine, make_session_factory, transaction
from app.migrate import upgrade
from app.models import Job, JobLog, Outbox, Tenant, WebhookDelivery, utcnow
from app.services import webhooks as webhook_service
from app.settings import Settings
from quantserve_client import WebhookVerificationError, verify_webhook
from tests.webhook_receiver import Receiver
from worker import task_names
from worker import webhooks as delivery

SECRET = webhooks.tenant_secret(b"test signing key", "salt")


def _signed(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    at = int(time.time()) if at is None else at
    return {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(at),
            "Webhook-Signature": webhooks.sign(secret, "msg_1", at, body)}


def test_verifier_accepts_the_servers_signature_and_returns_the_body() -> None:
    body = b'{"type":"job.succeeded","data":{"job_id":"x"}}'
    assert verify_webhook(SECRET, _signed(body), body)["type"] == "job.succeeded"
    # The signature is Standard Webhooks': base64 HMAC-SHA256 of "id.timestamp.body" keyed by the decoded secret.
    import base64
    import hashlib
    import hmac
    headers = _signed(body)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(key, f"msg_1.{headers['Webhook-Timestamp']}.".encode() + body, hashlib.sha256).digest()
    assert headers["Webhook-Signature"] == "v1," + base64.b64encode(mac).decode()
    # One valid signature among several (a rotation) is enough.
    headers["Webhook-Signature"] = "v1,AAAA " + headers["Webhook-Signature"]
    assert verify_webhook(SECRET, headers, body)


@pytest.mark.parametrize("forgery", ["body", "secret", "stale", "future", "id", "missing", "scheme"])
def test_verifier_refuses_forged_altered_or_stale_webhooks(forgery: str) -> None:
    body = b'{"type":"job.succeeded"}'
    headers = _signed(body)
    if forgery == "body":
        body = b'{"type":"job.failed"}'
    elif forgery == "secret":
        headers = _signed(body, secret=webhooks.tenant_secret(b"another key", "salt"))
    elif forgery in ("stale", "future"):
        headers = _signed(body, at=int(time.time()) + (-301 if forgery == "stale" else 301))
    elif forgery == "id":
        headers["Webhook-Id"] = "msg_2"
    elif forgery == "missing":
        del headers["Webhook-Signature"]
    else:
        headers["Webhook-Signature"] = headers["Webhook-Signature"].replace("v1,", "v2,")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, headers, body)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.9", "172.16.5.5", "169.254.169.254",
                                     "100.100.100.200", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1",
                                     "0.0.0.0", "100.64.0.1"])
def test_non_public_addresses_are_refused_by_default(address: str) -> None:
    assert webhooks.TargetPolicy().address_problem(ipaddress.ip_address(address)) is not None


def test_the_operator_can_allow_private_ranges_but_not_metadata_without_naming_it() -> None:
    allow = webhooks.TargetPolicy(allow_private=True)
    assert allow.address_problem(ipaddress.ip_address("10.1.2.3")) is None
    assert allow.address_problem(ipaddress.ip_address("127.0.0.1")) is None
    assert "metadata" in allow.address_problem(ipaddress.ip_address("169.254.169.254"))
    listed = webhooks.TargetPolicy.from_settings(False, "127.0.0.1/32, 169.254.169.254/32")
    assert listed.address_problem(ipaddress.ip_address("127.0.0.1")) is None
    assert listed.address_problem(ipaddress.ip_address("169.254.169.254")) is None
    assert listed.address_problem(ipaddress.ip_address("127.0.0.2")) is not None
    assert webhooks.TargetPolicy().address_problem(ipaddress.ip_address("93.184.216.34")) is None


@pytest.mark.parametrize(("url", "why"), [("ftp://example.com/x", "http"), ("http:///nohost", "no host"),
                                          ("https://user:pw@example.com/", "credentials"),
                                          ("https://example.com/" + "a" * 2048, "longer"),
                                          ("https://example.com:99999/", "valid")])
def test_url_shape_problems_are_named(url: str, why: str) -> None:
    assert why in (webhooks.url_problem(url) or "")


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(data_dir=tmp_path, webhook_signing_key="unit-test-key", webhook_retry_base_s=0.2,
                    webhook_max_attempts=3, **extra)


def _ended_job(factory: sessionmaker[Session], settings: Settings, url: str) -> tuple[uuid.UUID, str]:
    """A tenant with a secret and a job that just failed with a callback_url; returns (delivery id, secret)."""
    with transaction(factory) as session:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        session.flush()
        secret = webhook_service.rotate_secret(session, tenant.id, delivery.signing_key(settings)).secret
        job = Job(tenant_id=tenant.id, model_id=uuid.uuid4(), method="dynamic", config={}, status="failed",
                  error={"code": "target_not_met", "message": "m", "reason": None}, finished_at=utcnow(),
                  callback_url=url)
        session.add(job)
        session.flush()
        webhook_service.enqueue_completion(session, job.id)
        row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id))
        # written with the job's end, with the outbox message that sends it
        outbox = session.scalars(select(Outbox).where(Outbox.task_name == task_names.DELIVER_WEBHOOK)).all()
        assert [o.args for o in outbox][-1] == [str(row.id), 1]
        return row.id, secret


def _log_lines(factory: sessionmaker[Session], delivery_id: uuid.UUID) -> list[str]:
    with factory() as session:
        job_id = session.get(WebhookDelivery, delivery_id).job_id
        return [line.message for line in session.scalars(select(JobLog).where(JobLog.job_id == job_id)
                                                         .order_by(JobLog.id))]


def test_delivery_is_signed_and_verifiable_and_a_duplicate_message_sends_nothing(
        factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_allowed_cidrs="127.0.0.1/32")
    with Receiver() as receiver:
        delivery_id, secret = _ended_job(factory, settings, receiver.url())
        delivery.deliver(settings, factory, delivery_id, 1)
        delivery.deliver(settings, factory, delivery_id, 1)  # redelivered message: attempt 1 is taken
        [hook] = receiver.wait(1)
    event = verify_webhook(secret, hook.headers, hook.body)
    assert event["type"] == "job.failed" and event["data"]["error"]["code"] == "target_not_met"
    assert hook.headers["webhook-id"] == str(delivery_id)
    with factory() as session:
        assert session.get(WebhookDelivery, delivery_id).status == "delivered"
    assert any("attempt 1/3" in line and "delivered" in line for line in _log_lines(factory, delivery_id))


def test_a_target_that_now_resolves_to_a_private_address_is_refused_at_delivery(
        factory: sessionmaker[Session], tmp_path: Path) -> None:
    # Allowed when the job was written (as at submit), refused by the worker's own check: what a DNS rebinding
    # looks like from here. Nothing may reach the receiver, and retrying cannot help.
    allowed = _settings(tmp_path, webhook_allowed_cidrs="127.0.0.1/32")
    with Receiver() as receiver:
        delivery_id, _ = _ended_job(factory, allowed, receiver.url(host="localhost"))
        delivery.deliver(_settings(tmp_path), factory, delivery_id, 1)
        time.sleep(0.2)
        assert receiver.received == []
    with factory() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row.status == "failed" and "loopback" in row.last_error
    assert any("refused" in line and "giving up" in line for line in _log_lines(factory, delivery_id))


def test_a_failing_receiver_is_retried_with_backoff_until_it_accepts(
        factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_allowed_cidrs="127.0.0.1/32")
    with Receiver(statuses=(500, 302)) as receiver:
        delivery_id, secret = _ended_job(factory, settings, receiver.url())
        delivery.deliver(settings, factory, delivery_id, 1)
        assert delivery.dispatch_due(settings, factory) == 0  # its message is still in flight (the first lease)
        with transaction(factory) as session:  # as the lease of a delivered first message would be cleared
            session.execute(update(WebhookDelivery).values(lease_until=None))
        assert delivery.dispatch_due(settings, factory) == 0  # the backoff has not passed
        time.sleep(0.25)
        assert delivery.dispatch_due(settings, factory) == 1
        assert delivery.dispatch_due(settings, factory) == 0  # published once, not every sweep
        delivery.deliver(settings, factory, delivery_id, 2)  # a 302: not followed, retried
        with transaction(factory) as session:
            session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        delivery.deliver(settings, factory, delivery_id, 3)
        hooks = receiver.wait(3)
    assert {h.headers["webhook-id"] for h in hooks} == {str(delivery_id)}  # one id for every attempt
    assert all(verify_webhook(secret, h.headers, h.body) for h in hooks)
    assert json.loads(hooks[0].body) == json.loads(hooks[2].body)
    lines = _log_lines(factory, delivery_id)
    assert any("attempt 1/3" in line and "HTTP 500" in line and "next attempt in 0.2 s" in line for line in lines)
    assert any("attempt 2/3" in line and "redirects are not followed" in line and "0.4 s" in line for line in lines)
    assert any("attempt 3/3" in line and "delivered" in line for line in lines)


def test_a_worker_with_another_signing_key_does_not_sign(factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_allowed_cidrs="127.0.0.1/32")
    with Receiver() as receiver:
        delivery_id, _ = _ended_job(factory, settings, receiver.url())
        delivery.deliver(settings.model_copy(update={"webhook_signing_key": "other"}), factory, delivery_id, 1)
        assert receiver.received == []
    with factory() as session:
        assert "QUANTSERVE_WEBHOOK_SIGNING_KEY" in session.get(WebhookDelivery, delivery_id).last_error
