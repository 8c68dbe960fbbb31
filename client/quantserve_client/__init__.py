"""quantserve_client: the Python client of quantserve's REST API (API.md), and the `quantserve` client commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client", "ClientError", "ApiError", "JobFailedError", "UploadInvalidError", "DownloadError",
           "verify_webhook", "WebhookVerificationError", "__version__"]

if TYPE_CHECKING:
    from quantserve_client.client import (
        ApiError,
        Client,
        ClientError,
        DownloadError,
        JobFailedError,
        UploadInvalidError,
    )
    from quantserve_client.webhooks import WebhookVerificationError, verify_webhook


WEBHOOK_NAMES = ("verify_webhook", "WebhookVerificationError")


def __getattr__(name: str) -> Any:
    if name in WEBHOOK_NAMES:  # stdlib only: a receiver can verify without httpx
        from quantserve_client import webhooks

        return getattr(webhooks, name)
    # Lazy: the server imports quantserve_client.schemas, and its API image has no httpx; importing the package
    # must not pull the HTTP client in.
    if name in __all__ and name != "__version__":
        from quantserve_client import client

        return getattr(client, name)
    raise AttributeError(f"module 'quantserve_client' has no attribute {name!r}")
