"""Time-ordered UUIDv7 ids: Python 3.11's uuid module has no uuid7 (it arrives in 3.14)."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last = 0


def uuid7() -> uuid.UUID:
    """RFC 9562 UUIDv7: 48-bit unix milliseconds, then random bits; strictly increasing within a process,
    so rows created in the same millisecond (a job's artifacts) keep their creation order."""
    global _last
    ms = time.time_ns() // 1_000_000
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big") >> 8  # 72 random bits
    value = value & ~(0xF << 76) | (0x7 << 76)  # version 7
    value = value & ~(0x3 << 62) | (0x2 << 62)  # RFC 4122 variant
    with _lock:
        if value <= _last:  # same millisecond: count up from the previous id instead
            value = _last + 1
            value = value & ~(0xF << 76) | (0x7 << 76)
            value = value & ~(0x3 << 62) | (0x2 << 62)
        _last = value
    return uuid.UUID(int=value)
