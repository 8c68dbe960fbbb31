"""uvicorn's httptools protocol with TCP_NODELAY on every connection, whatever the listening socket.

asyncio sets TCP_NODELAY only on sockets whose `proto` is IPPROTO_TCP. `uvicorn --workers N` binds its shared
socket with `socket.socket(family)`, so `proto` is 0 and the accepted connections keep Nagle's algorithm:
each small answer then waits for the client's delayed ACK. Measured with wrk, one keep-alive client, two
processes: 22 rps at p50 44 ms, on quantserve's poll and on a bare FastAPI hello alike; with this, the
latency of one process. (uvloop set it unconditionally, which hid this until the API moved to asyncio's loop.)
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
