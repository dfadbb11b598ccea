"""The upgraded-connection relay, on its own: a ``proxy.http1`` handler that
takes the connection over after a 101 (``Request.upgrade_to``) and splices it to
what the pool hands over after an upstream's 101 (``proxy.upstream_pool.Upgraded``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from proxy import http1, tunnel
from proxy.kube import status_body
from proxy.upstream_pool import ConnectionPool


@dataclass
class Echo:
    """A server that answers an upgrade request with ``101``, then upper-cases
    what it gets; ``BYE`` makes it hang up.
    """

    port: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0


@contextlib.asynccontextmanager
async def echo_server(*, silent: bool = False) -> AsyncIterator[Echo]:
    echo = Echo()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: x\r\n\r\n"
            )
            while data := await reader.read(65536):
                echo.received += len(data)
                if data.strip() == b"BYE":
                    break
                if not silent:
                    writer.write(data.upper())
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            echo.closed.set()
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    echo.port = server.sockets[0].getsockname()[1]
    try:
        yield echo
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@dataclass
class Server:
    port: int
    server: http1.Server
    results: list[tunnel.TunnelResult]


@contextlib.asynccontextmanager
async def tunnel_app(echo: Echo, idle: float = 0.0) -> AsyncIterator[Server]:
    pool = ConnectionPool(
        host="127.0.0.1",
        port=echo.port,
        ssl_context=None,
        server_hostname=None,
        resolver=None,
        limit=0,
        keepalive_timeout=30,
        host_header="echo.test",
        buffer_limit=64 * 1024,
    )
    results: list[tunnel.TunnelResult] = []

    async def splice(request: http1.Request) -> http1.Answer | None:
        protocol = request.headers["upgrade"]
        answer = await pool.upgrade(
            "POST", "/", [], protocol=protocol, connect_timeout=5
        )
        assert answer.status == 101
        upstream = answer.detach()
        client = request.upgrade_to(
            [("Connection", "Upgrade"), ("Upgrade", protocol)],
            reason="Switching Protocols",
        )
        try:
            result = await tunnel.relay(client, upstream, idle_seconds=idle)
        finally:
            client.close()
            await upstream.close()
        results.append(result)
        return None

    def hello(_: http1.Request) -> http1.Answer:
        return http1.Answer(200, b"still serving", content_type="text/plain")

    server = http1.Server(
        {
            "/hello": http1.Route(hello, methods=frozenset({"GET"})),
            "/tunnel": http1.Route(splice, methods=None),
        },
        limits=http1.Limits(head_timeout=5, body_timeout=5),
        error_body=status_body,
    )
    port = await server.start("127.0.0.1", 0, ssl_context=None)
    try:
        yield Server(port, server, results)
    finally:
        await server.drain(0.1)
        await pool.close()


async def open_tunnel(
    port: int, upgrade: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /tunnel HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "upgrade", ["SPDY/3.1", "websocket"], ids=["spdy", "websocket"]
)
async def test_bytes_flow_both_ways_and_are_never_parsed_as_http(upgrade: str) -> None:
    async with echo_server() as echo, tunnel_app(echo) as server:
        reader, writer, head = await open_tunnel(server.port, upgrade)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert f"Upgrade: {upgrade}".encode() in head
        # looks like an HTTP request: aiohttp must not see it
        smuggled = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(smuggled)
        echoed = await asyncio.wait_for(reader.readexactly(len(smuggled)), 5)
        assert echoed == smuggled.upper()
        writer.close()
        await wait_for(lambda: server.results)
        assert server.results[0].closed_by == "client"
        assert server.results[0].bytes_to_upstream == len(smuggled)
        assert server.results[0].bytes_to_client == len(smuggled)


async def test_large_transfer_with_backpressure() -> None:
    async with echo_server() as echo, tunnel_app(echo) as server:
        reader, writer, _ = await open_tunnel(server.port, "SPDY/3.1")
        payload = b"abcdefghijklmnop" * (512 * 1024)  # 8 MiB

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        await sender
        assert got == payload.upper()
        writer.close()
        await wait_for(lambda: server.results)
        assert server.results[0].bytes_to_client == len(payload)


async def test_client_close_closes_upstream_and_frees_the_connection() -> None:
    async with echo_server() as echo, tunnel_app(echo) as server:
        reader, writer, _ = await open_tunnel(server.port, "SPDY/3.1")
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"X"
        writer.close()
        await asyncio.wait_for(echo.closed.wait(), 5)
        await wait_for(lambda: server.results)
        await wait_for(lambda: not server.server.connections)
        await wait_for(lambda: not server.server.inflight)


async def test_upstream_close_closes_client_and_server_keeps_serving() -> None:
    async with echo_server() as echo, tunnel_app(echo) as server:
        reader, writer, _ = await open_tunnel(server.port, "SPDY/3.1")
        writer.write(b"BYE")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await wait_for(lambda: server.results)
        assert server.results[0].closed_by == "upstream"
        r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
        w2.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"still serving" in await asyncio.wait_for(r2.read(), 5)
        w2.close()


async def test_idle_tunnel_is_closed() -> None:
    async with echo_server(silent=True) as echo, tunnel_app(echo, idle=0.2) as server:
        reader, writer, _ = await open_tunnel(server.port, "SPDY/3.1")
        writer.write(b"no answer")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await wait_for(lambda: server.results)
        assert server.results[0].closed_by == "idle"
        await asyncio.wait_for(echo.closed.wait(), 5)


@pytest.mark.slow
async def test_activity_keeps_a_tunnel_open_past_the_idle_limit() -> None:
    async with echo_server() as echo, tunnel_app(echo, idle=0.3) as server:
        reader, writer, _ = await open_tunnel(server.port, "SPDY/3.1")
        for _ in range(6):
            writer.write(b"tick")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"TICK"
            await asyncio.sleep(0.1)
        assert server.results == []
        writer.close()
        await wait_for(lambda: server.results)
        assert server.results[0].closed_by == "client"
