"""Every API connection gets TCP_NODELAY, also on the socket `uvicorn --workers N` binds (app/http_protocol.py)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.cli import UVICORN_OPTIONS
from app.http_protocol import NoDelayHttpToolsProtocol


async def hello(scope, receive, send) -> None:  # noqa: ANN001 - a bare ASGI app
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def nodelay_of_a_served_connection(protocol: type[HttpToolsProtocol]) -> int:
    """TCP_NODELAY on the server side of one request, on a socket bound the way uvicorn binds for --workers."""

    async def scenario() -> int:
        config = uvicorn.Config(hello, loop="asyncio", http=protocol, log_level="warning")
        config.load()
        listening = socket.socket(family=socket.AF_INET)  # proto 0, as uvicorn's Config.bind_socket makes it
        listening.bind(("127.0.0.1", 0))
        seen: list[int] = []

        class Probe(protocol):  # type: ignore[misc, valid-type]
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        state = ServerState()
        server = await asyncio.get_running_loop().create_server(
            lambda: Probe(config=config, server_state=state, app_state={}), sock=listening)
        reader, writer = await asyncio.open_connection(*listening.getsockname())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        writer.close()
        server.close()
        return seen[0]

    return asyncio.run(scenario())


def test_connections_on_a_socket_bound_like_uvicorn_workers_get_tcp_nodelay() -> None:
    assert nodelay_of_a_served_connection(HttpToolsProtocol) == 0  # the gap: Nagle stays on, answers wait 40 ms
    assert nodelay_of_a_served_connection(NoDelayHttpToolsProtocol) != 0


def test_the_api_and_serve_use_that_protocol_on_asyncio_loop() -> None:
    assert UVICORN_OPTIONS["http"] == "app.http_protocol:NoDelayHttpToolsProtocol"
    assert UVICORN_OPTIONS["loop"] == "asyncio"
