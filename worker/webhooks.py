"""Webhook delivery: one attempt per task, fenced like a job attempt; retries with backoff via the sweeper."""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
import uuid
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app import __version__, webhooks
from app.broker import enqueue
from app.db import transaction
from app.models import JobLog, WebhookDelivery, utcnow
from app.services.webhooks import DISPATCH_LEASE_S, secret_of
from app.settings import Settings
from worker import task_names

log = logging.getLogger("quantserve.worker")
MAX_BACKOFF_S = 3600.0


@functools.cache
def _signing_key(configured: str | None, data_dir: str) -> bytes:
    from pathlib import Path

    return webhooks.load_signing_key(configured, Path(data_dir))


def signing_key(settings: Settings) -> bytes:
    return _signing_key(settings.webhook_signing_key, str(settings.data_dir.resolve()))


def backoff_s(settings: Settings, attempt: int) -> float:
    """Wait after failed attempt n: base, 2 x base, 4 x base, ... capped at an hour."""
    return min(settings.webhook_retry_base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def _pinned(url: str, ip: webhooks.IPAddress) -> tuple[str, str, str]:
    """The URL with its host replaced by the address that was checked, plus the Host header and TLS server name.

    Connecting to the checked address, not the name, is what defeats DNS rebinding: a second lookup by the HTTP
    library could answer differently (a 0-TTL record flipping to 127.0.0.1)."""
    parts = urlsplit(url)
    host = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), parts.netloc, parts.hostname or ""


def send(url: str, body: str, msg_id: str, secret: str, policy: webhooks.TargetPolicy,
         timeout_s: float) -> tuple[bool, bool, str]:
    """One POST. Returns (delivered, retryable, what happened). No redirect is followed: a 3xx is a failure."""
    try:
        addresses = policy.resolve(url)  # checked again now: the name may point elsewhere than at submit
    except webhooks.UnresolvedTargetError as exc:
        return False, True, str(exc)
    except webhooks.TargetRefusedError as exc:
        return False, False, f"refused: {exc}"
    target, host_header, server_name = _pinned(url, addresses[0])
    timestamp = int(time.time())
    payload = body.encode()
    headers = {"content-type": "application/json", "host": host_header, "user-agent": f"quantserve/{__version__}",
               "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": webhooks.sign(secret, msg_id, timestamp, payload)}
    started = time.monotonic()
    try:
        # trust_env=False: an HTTP(S)_PROXY from the environment would connect to the name, not the checked address.
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.post(target, content=payload, headers=headers,
                                   extensions={"sni_hostname": server_name} if target.startswith("https") else {})
    except httpx.HTTPError as exc:
        return False, True, f"{type(exc).__name__}: {exc}"[:300]
    took = f"in {time.monotonic() - started:.2f} s"
    if 200 <= response.status_code < 300:
        return True, False, f"HTTP {response.status_code} {took}"
    extra = " (redirects are not followed)" if 300 <= response.status_code < 400 else ""
    return False, True, f"HTTP {response.status_code}{extra} {took}"


def deliver(settings: Settings, factory: sessionmaker[Session], delivery_id: uuid.UUID, attempt: int) -> None:
    """Attempt `attempt` of a delivery; a duplicate message (or a stale one) finds nothing to claim and returns."""
    with transaction(factory) as session:
        row = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                   WebhookDelivery.attempts == attempt - 1)
            .values(attempts=attempt, lease_until=utcnow() + timedelta(seconds=3 * settings.webhook_timeout_s + 30))
            .returning(WebhookDelivery.url, WebhookDelivery.body, WebhookDelivery.tenant_id, WebhookDelivery.job_id)
        ).first()
        if row is None:
            return
        try:
            secret: str | None = secret_of(session, row.tenant_id, signing_key(settings))
        except ValueError as exc:
            secret, problem = None, str(exc)
    if secret is None:  # an operator's mistake or a deleted secret: retrying cannot help
        delivered, retryable, what = False, False, problem
    else:
        delivered, retryable, what = send(row.url, row.body, str(delivery_id), secret, settings.webhook_policy(),
                                          settings.webhook_timeout_s)
    _record(settings, factory, delivery_id, row.job_id, attempt, webhooks.redacted(row.url), delivered, retryable,
            what)


def _record(settings: Settings, factory: sessionmaker[Session], delivery_id: uuid.UUID, job_id: uuid.UUID,
            attempt: int, where: str, delivered: bool, retryable: bool, what: str) -> None:
    now = utcnow()
    of = f"{attempt}/{settings.webhook_max_attempts}"
    if delivered:
        values, level, message = ({"status": "delivered", "delivered_at": now, "lease_until": None},
                                  "info", f"webhook attempt {of} to {where}: delivered, {what}")
    elif retryable and attempt < settings.webhook_max_attempts:
        wait = backoff_s(settings, attempt)
        values = {"next_attempt_at": now + timedelta(seconds=wait), "lease_until": None, "last_error": what[:500]}
        level, message = "warning", f"webhook attempt {of} to {where} failed: {what}; next attempt in {wait:g} s"
    else:
        values = {"status": "failed", "lease_until": None, "last_error": what[:500]}
        level, message = "error", f"webhook attempt {of} to {where} failed: {what}; giving up"
    with transaction(factory) as session:
        result = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt,
            WebhookDelivery.status == "pending").values(**values))
        if result.rowcount:
            session.add(JobLog(job_id=job_id, level=level, message=message))
    log.info("webhook %s for job %s: %s", delivery_id, job_id, message)


def dispatch_due(settings: Settings, factory: sessionmaker[Session]) -> int:
    """Publish the next attempt of every delivery that is due and has no message in flight (run by the sweeper):
    retries after their backoff, and attempts whose message or worker was lost once their lease ran out."""
    now = utcnow()
    sent = 0
    with transaction(factory) as session:
        due = session.execute(select(WebhookDelivery.id, WebhookDelivery.attempts, WebhookDelivery.job_id).where(
            WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
            (WebhookDelivery.lease_until.is_(None)) | (WebhookDelivery.lease_until < now)).limit(100)).all()
        for delivery_id, attempts, job_id in due:
            mine = (WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempts,
                    WebhookDelivery.status == "pending")
            if attempts >= settings.webhook_max_attempts:  # its last attempt's worker died mid-request
                if session.execute(update(WebhookDelivery).where(*mine).values(status="failed")).rowcount:
                    session.add(JobLog(job_id=job_id, level="error",
                                       message=f"webhook: attempt {attempts} was lost with its worker; giving up"))
                continue
            lease = now + timedelta(seconds=DISPATCH_LEASE_S)
            if session.execute(update(WebhookDelivery).where(*mine).values(lease_until=lease)).rowcount:
                enqueue(session, task_names.DELIVER_WEBHOOK, [str(delivery_id), attempts + 1],
                        task_names.WEBHOOK_QUEUE)
                sent += 1
    return sent
