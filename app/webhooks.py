"""Webhook targets and secrets, shared by the API (submit) and the worker (delivery): the SSRF policy, signing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048
SECRET_PREFIX = "whsec_"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud metadata services that are publicly routable addresses, so `is_global` alone would let them through
# (Alibaba Cloud's sits in 100.64/10, which Python already counts as not global; kept here to say so).
METADATA = (ipaddress.ip_network("100.100.100.200/32"), ipaddress.ip_network("fd00:ec2::254/128"))


class TargetRefusedError(ValueError):
    """A callback URL that quantserve will not call: its message says why and which setting would allow it."""


class UnresolvedTargetError(TargetRefusedError):
    """The host did not resolve: refused at submit, but only a failed attempt (retried) at delivery."""


def url_problem(url: str) -> str | None:
    """Why `url` is not an acceptable callback URL by its shape alone (no DNS), or None."""
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port out of range)
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would be echoed in job logs; a receiver checks the signature instead.
        return "must not carry credentials (user:password@); verify the webhook signature instead"
    if parts.fragment:
        return "must not have a #fragment"
    return None


@dataclass(frozen=True)
class TargetPolicy:
    """Which addresses a webhook may reach: public ones always; others only as the operator allows."""

    allow_private: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_settings(cls, allow_private: bool, allowed_cidrs: str) -> TargetPolicy:
        nets = tuple(ipaddress.ip_network(c.strip(), strict=False) for c in allowed_cidrs.split(",") if c.strip())
        return cls(allow_private, nets)

    def address_problem(self, ip: IPAddress) -> str | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
        if any(ip in net for net in self.allowed_networks):
            return None
        metadata = any(ip in net for net in METADATA) or ip == ipaddress.ip_address("169.254.169.254")
        if metadata:
            kind = "a cloud metadata address"
        elif ip.is_loopback:
            kind = "a loopback address"
        elif ip.is_link_local:
            kind = "a link-local address"
        elif ip.is_private:
            kind = "a private address"
        elif ip.is_multicast or ip.is_unspecified or ip.is_reserved or not ip.is_global:
            kind = "a non-public address"
        else:
            return None
        if self.allow_private and not metadata:
            return None
        how = ("add it to QUANTSERVE_WEBHOOK_ALLOWED_CIDRS" if metadata else
               "set QUANTSERVE_WEBHOOK_ALLOW_PRIVATE=true or add it to QUANTSERVE_WEBHOOK_ALLOWED_CIDRS")
        return f"resolves to {ip}, {kind}; the operator must allow it ({how})"

    def resolve(self, url: str) -> list[IPAddress]:
        """The addresses `url`'s host resolves to, every one of them allowed; else TargetRefusedError.

        Every address is checked, not just the first: a host with one public and one private record would
        otherwise reach the private one whenever the connection picks it."""
        problem = url_problem(url)
        if problem:
            raise TargetRefusedError(problem)
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise UnresolvedTargetError(f"host {parts.hostname!r} does not resolve ({exc})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
        for ip in addresses:
            if (problem := self.address_problem(ip)) is not None:
                raise TargetRefusedError(problem)
        return addresses


def redacted(url: str) -> str:
    """scheme://host[:port]/path, for logs: a query string may carry a receiver's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# Secrets. A tenant's secret is derived, not stored: HMAC(signing key, the tenant's random salt). The database
# holds only the salt and a fingerprint of the signing key, so a copy of the database alone signs nothing; the
# key lives in the environment (QUANTSERVE_WEBHOOK_SIGNING_KEY) or, embedded, in a 0600 file in the data dir.

def load_signing_key(configured: str | None, data_dir: Path) -> bytes:
    if configured:
        return configured.encode()
    path = data_dir / "webhook-signing.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:  # first process to get here writes it; the others read it
        key = secrets.token_urlsafe(48).encode()
        fh.write(key)
    return key


def key_fingerprint(signing_key: bytes) -> str:
    return hmac.new(signing_key, b"quantserve webhook signing key fingerprint", hashlib.sha256).hexdigest()[:16]


def new_salt() -> str:
    return secrets.token_hex(16)


def tenant_secret(signing_key: bytes, salt: str) -> str:
    """The Standard Webhooks secret: whsec_ + base64 of 32 key bytes."""
    raw = hmac.new(signing_key, f"tenant webhook secret {salt}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: v1,<base64 HMAC-SHA256 of "id.timestamp.body"> (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
