"""Verify a quantserve webhook (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature); stdlib only.

Written apart from the server's signer (app/webhooks.py) on purpose: the tests check one against the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(Exception):
    """The webhook is forged, altered, stale or malformed: do not act on it."""


def _header(headers: Mapping[str, str], name: str) -> str:
    # HTTP header names are case-insensitive, and frameworks hand them over in any case.
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise WebhookVerificationError(f"missing {name} header")


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str,
                   tolerance_s: float = 300) -> dict[str, Any]:
    """Check the signature and the timestamp of a webhook, then return its JSON body.

    `secret` is the whsec_… string from POST /v1/webhooks/secret; `body` the raw request bytes, exactly as
    received (re-serialised JSON would not match). A timestamp more than `tolerance_s` away from now is refused,
    so a captured webhook cannot be replayed later. Raises WebhookVerificationError."""
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not an integer") from None
    if abs(time.time() - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp} is more than {tolerance_s:g} s from now")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise WebhookVerificationError("the secret is not a whsec_… base64 string") from None
    payload = body.encode() if isinstance(body, str) else bytes(body)
    expected = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256).digest()
    # Several space-separated signatures may come (e.g. while a secret rotates); one valid v1 is enough.
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except binascii.Error:
            continue
        if hmac.compare_digest(given, expected):  # constant time: no timing oracle on the signature
            try:
                return json.loads(payload)
            except ValueError:
                raise WebhookVerificationError("the signed body is not JSON") from None
    raise WebhookVerificationError("no valid v1 signature: the webhook is forged, altered or signed with another "
                                   "secret")
