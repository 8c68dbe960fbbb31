"""The optional access log (QUANTSERVE_ACCESS_LOG=json): one JSON line per request on stderr.

Off by default: at thousands of polls a second, a line per request costs the API a noticeable share of its
time, and uvicorn's own text access log (always off now) carried neither the tenant nor the request id.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson


class AccessLog:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def write(self, method: str, path: str, status: int, duration_s: float, request_state: dict[str, Any]) -> None:
        tenant_id = request_state.get("tenant_id")
        line = orjson.dumps({"ts": time.time(), "event": "http_request", "method": method, "path": path,
                             "status": status, "duration_ms": round(duration_s * 1000, 3),
                             "request_id": request_state.get("request_id"),
                             "tenant_id": str(tenant_id) if tenant_id else None})
        self.stream.write(line.decode() + "\n")
        self.stream.flush()
