"""The one upstream client (``proxy.upstream_pool``) against a real loopback
server that scripts each answer and counts connections: keep-alive, answers
judged by llhttp's rules plus ours (502 and the connection never reused),
streams with backpressure; its wire and its reading of answers compared with
aiohttp's client as an oracle, on the same requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxy.errors import UpstreamError
from proxy.impersonate import ProxySettings
from proxy.upstream import Upstream, UpstreamSettings
from proxy.upstream_pool import ConnectionPool
from tests.fakes.apiserver_harness import run_proxy, upstream_kubeconfig

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
#: Read the request, then close without a byte of answer (a server that timed
#: the idle connection out just as the request arrived).
DROP = b"<drop>"
#: Read the request, answer ``OK`` after a pause.
SLOW = b"<slow>"
#: Prefix of an answer after which the server closes the connection.
THEN_CLOSE = b"<then-close>"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Server:
    """A loopback HTTP/1.1 server answering from ``script`` (``OK`` once empty)."""

    script: list[bytes] = field(default_factory=list)
    port: int = 0
    connections: int = 0
    active: int = 0
    most_active: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: list[asyncio.Event] = field(default_factory=list)

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        ended = asyncio.Event()
        self.ended.append(ended)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await _read_request_body(reader, head)
                self.requests.append((head, body))
                answer = self.script.pop(0) if self.script else OK
                if answer == DROP:
                    return
                if answer == SLOW:
                    await asyncio.sleep(0.2)
                    answer = OK
                closing = answer.startswith(THEN_CLOSE)
                writer.write(answer.removeprefix(THEN_CLOSE))
                await writer.drain()
                if closing:
                    return
        except ConnectionError:
            pass
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            ended.set()


async def _read_request_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


@contextlib.asynccontextmanager
async def serving(
    ca: trustme.CA | None = None, script: list[bytes] | None = None
) -> AsyncIterator[Server]:
    server = Server(script=list(script or []))
    ctx = None
    if ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await server.serve(reader, writer)
        finally:
            tasks.discard(task)

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await listener.wait_closed()


@contextlib.asynccontextmanager
async def pool_for(
    server: Server, ca: trustme.CA | None = None, **kw: Any
) -> AsyncIterator[ConnectionPool]:
    ctx = None
    if ca is not None:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
    settings: dict[str, Any] = {"limit": 0, "keepalive_timeout": 30.0, **kw}
    pool = ConnectionPool(
        host="127.0.0.1",
        port=server.port,
        ssl_context=ctx,
        server_hostname="127.0.0.1" if ctx else None,
        resolver=None,
        host_header=f"127.0.0.1:{server.port}",
        **settings,
    )
    try:
        yield pool
    finally:
        await pool.close()


async def get(
    pool: ConnectionPool, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    async with asyncio.timeout(5):
        response = await pool.send(
            method,
            "/api",
            [("Accept", "application/json")],
            body=body,
            connect_timeout=5,
        )
        async with response:
            return response.status, await response.read(1 << 24)


TLS = pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])


# --------------------------------------------------------------------------
# Keep-alive


@TLS
async def test_connections_are_reused(ca: trustme.CA, tls: bool) -> None:
    async with (
        serving(ca if tls else None) as server,
        pool_for(server, ca if tls else None) as pool,
    ):
        for _ in range(4):
            assert await get(pool) == (200, b"ok")
        assert pool.idle_connections == 1
    assert server.connections == 1
    assert len(server.requests) == 4
    head = server.requests[0][0].decode()
    assert head.startswith("GET /api HTTP/1.1\r\nHost: 127.0.0.1:")


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"abcde",
            True,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            False,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx",
            b"x",
            True,
        ),
    ],
    ids=[
        "content-length",
        "chunked",
        "no-content",
        "connection-close",
        "http-1.0",
        "continue",
    ],
)
async def test_bodies_and_reuse(answer: bytes, body: bytes, reused: bool) -> None:
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        final = int(answer.rsplit(b"HTTP/1.", 1)[1][2:5])  # after any 1xx
        assert await get(pool) == (final, body)
        assert await get(pool) == (200, b"ok")
    assert server.connections == (1 if reused else 2)


async def test_until_close_body_is_read_and_not_reused() -> None:
    answer = THEN_CLOSE + b"HTTP/1.1 200 OK\r\n\r\nuntil close"
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        assert await get(pool) == (200, b"until close")
        assert pool.idle_connections == 0
        assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_small_length_body_is_read_before_send_returns() -> None:
    big = b"x" * 5000
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + big,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ]
    async with (
        serving(script=answers) as server,
        pool_for(server, buffer_limit=1024) as pool,
    ):
        first = await pool.send("GET", "/a", [], connect_timeout=5)
        assert first.body == b"0123456789"
        assert first.complete
        assert pool.idle_connections == 1  # back before the caller is done
        first.close()
        second = await pool.send("GET", "/b", [], connect_timeout=5)
        assert second.body is None  # beyond the bound: streamed
        pieces = []
        async with asyncio.timeout(5):
            while chunk := await second.read_chunk():
                assert len(chunk) <= 1024 + 65536
                pieces.append(chunk)
        assert b"".join(pieces) == big
        assert second.complete
        third = await pool.send("GET", "/c", [], connect_timeout=5)
        assert third.body is None  # chunked: streamed, as the client sees it
        assert await third.read(100) == b"ok"
    assert server.connections == 1


# --------------------------------------------------------------------------
# Malformed answers: 502, and the connection is never reused


MALFORMED = [
    ("bad-status-line", b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("bad-status-code", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"),
    ("folded-header", b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n"),
    (
        "control-character",
        b"HTTP/1.1 200 OK\r\nX-A: b\x01c\r\nContent-Length: 0\r\n\r\n",
    ),
    ("bare-lf", b"HTTP/1.1 200 OK\r\nX-A: b\nX-B: c\r\nContent-Length: 0\r\n\r\n"),
    (
        "length-and-chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "two-lengths",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    ),
    ("signed-length", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
    (
        "gzip-transfer",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "bad-chunk-size",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    ),
    (
        "chunk-without-crlf",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
    ),
    ("switching-protocols", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
    (
        "switching-protocols-upgrade",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: x\r\n\r\n",
    ),
    # What llhttp refuses in its strict mode (the pool turns nothing lenient).
    ("obs-fold-first", b"HTTP/1.1 200 OK\r\nX-A:\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("bare-lf-head", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("bare-cr", b"HTTP/1.1 200 OK\rX-A: b\r\nContent-Length: 0\r\n\r\n"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 0\r\n\r\n"),
    ("listed-length", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"),
    (
        "different-lengths",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ),
    (
        "length-overflow",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    ),
    (
        "chunk-size-with-blank",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nab\r\n0\r\n\r\n",
    ),
    (
        "chunk-size-negative",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n",
    ),
    (
        "chunk-size-overflow",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffff\r\nab\r\n0\r\n\r\n",
    ),
    (
        "chunk-bare-lf",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
    ),
    (
        "length-in-trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nContent-Length: 2\r\n\r\n",
    ),
    # Our policy on top of llhttp's.
    ("http-2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("http-0.9", b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n"),
    (
        "chunked-then-gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nxyz",
    ),
    (
        "chunked-twice",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "informational-with-length",
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ),
    (
        "garbage-after-body",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
    ),
    ("short-body", THEN_CLOSE + b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
]


@pytest.mark.parametrize(
    "answer", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_malformed_answer_is_502_and_not_reused(answer: bytes) -> None:
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        if answer.endswith(b"okHTTP/1.1 200 OK\r\n"):
            # The answer itself is fine; what follows it is not: no reuse.
            assert await get(pool) == (200, b"ok")
        else:
            with pytest.raises(UpstreamError) as info:
                await get(pool)
            assert info.value.status == 502
        assert pool.idle_connections == 0
        assert await get(pool) == (200, b"ok")
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, b"ok"),
        (b"HTTP/1.1 199 Odd\r\n\r\nHTTP/1.1 100 Go\r\n\r\n" + OK, b"ok"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'1;a=b;c="d"\r\no\r\n1\r\nk\r\n0\r\n'
            b"Impersonate-User: admin\r\n\r\n",
            b"ok",
        ),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", b""),
        (
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"",
        ),
    ],
    ids=[
        "informational-skipped",
        "several-informational",
        "chunk-extensions-and-trailers-dropped",
        "not-modified-bodiless",
        "no-content-bodiless",
    ],
)
async def test_llhttps_framing_and_reuse(answer: bytes, body: bytes) -> None:
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        _, got = await get(pool)
        assert got == body
        response = await pool.send("GET", "/", [], connect_timeout=5)
        async with response:
            assert response.headers.get("Impersonate-User") is None
        assert pool.idle_connections == 1
    assert server.connections == 1


async def test_a_head_answer_is_bodiless_and_its_connection_not_reused() -> None:
    """httptools cannot tell llhttp that an answer to HEAD has no body: the
    pool stops at its head and never reuses that connection.
    """
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        response = await pool.send("HEAD", "/", [], connect_timeout=5)
        assert response.body == b""
        assert response.headers["Content-Length"] == "5"
        assert response.body_length is None
        assert pool.idle_connections == 0
        assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_head_too_large_is_502() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000 + b"\r\nContent-Length: 0\r\n\r\n"
    )
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        with pytest.raises(UpstreamError) as info:
            await pool.send("GET", "/", [], connect_timeout=5, max_head_bytes=1024)
        assert info.value.status == 502
        assert pool.open_connections == 0


async def test_an_endless_head_is_cut_at_the_limit() -> None:
    """A head that never ends is refused once the limit is past, however it
    is sliced: the bytes received while it is incomplete count.
    """
    received: list[int] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            for _ in range(200):
                writer.write(b"a" * 512)
                await writer.drain()
                received.append(1)
                await asyncio.sleep(0.001)
        except ConnectionError:
            pass
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = _offline_pool(server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(UpstreamError) as info:
            async with asyncio.timeout(5):
                await pool.send("GET", "/", [], connect_timeout=5, max_head_bytes=4096)
        assert info.value.status == 502
        assert "head too long" in str(info.value)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    assert len(received) < 200


# --------------------------------------------------------------------------
# A stale pooled connection


@pytest.mark.parametrize(
    ("method", "body", "retried"),
    [
        ("GET", None, True),
        ("HEAD", None, True),
        ("POST", b"{}", False),
        ("DELETE", None, False),
    ],
    ids=["get", "head", "post", "delete"],
)
async def test_stale_connection_is_retried_once_for_idempotent_methods(
    method: str, body: bytes | None, retried: bool
) -> None:
    async with serving(script=[OK, DROP]) as server, pool_for(server) as pool:
        assert await get(pool) == (200, b"ok")
        if retried:
            status, _ = await get(pool, method, body)
            assert status == 200
            assert server.connections == 2
            assert len(server.requests) == 3
        else:
            with pytest.raises(UpstreamError) as info:
                await get(pool, method, body)
            assert info.value.status == 502
            assert server.connections == 1  # sent once, never again
            assert len(server.requests) == 2


async def test_retry_is_only_once_and_never_on_a_fresh_connection() -> None:
    async with (
        serving(script=[OK, DROP, DROP, DROP]) as server,
        pool_for(server) as pool,
    ):
        assert await get(pool) == (200, b"ok")
        with pytest.raises(UpstreamError):
            await get(pool)  # stale, then the fresh one fails too: no third try
        assert server.connections == 2
        with pytest.raises(UpstreamError):
            await get(pool)  # a fresh connection failing is not retried
        assert server.connections == 3


# --------------------------------------------------------------------------
# Bound, expiry, close


@pytest.mark.slow
async def test_pool_bound_is_respected() -> None:
    async with serving(script=[SLOW] * 4) as server, pool_for(server, limit=2) as pool:
        results = await asyncio.gather(*(get(pool) for _ in range(6)))
        assert results == [(200, b"ok")] * 6
        assert pool.open_connections <= 2
    assert server.most_active == 2
    assert server.connections == 2


async def test_idle_connections_expire() -> None:
    async with serving() as server, pool_for(server, keepalive_timeout=0.1) as pool:
        assert await get(pool) == (200, b"ok")
        assert pool.idle_connections == 1
        await asyncio.wait_for(server.ended[0].wait(), 5)
        assert pool.idle_connections == 0
        assert await get(pool) == (200, b"ok")
    assert server.connections == 2


@TLS
async def test_close_closes_idle_connections(ca: trustme.CA, tls: bool) -> None:
    async with (
        serving(ca if tls else None) as server,
        pool_for(server, ca if tls else None) as pool,
    ):
        await asyncio.gather(*(get(pool) for _ in range(3)))
        assert pool.idle_connections == server.connections
        await pool.close()
        assert pool.open_connections == 0
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in server.ended)), 5)
        with pytest.raises(UpstreamError):
            await get(pool)


async def test_a_stream_is_read_with_backpressure_and_kept_out_of_the_pool() -> None:
    """A watch: a chunked answer read piece by piece, reading paused while
    the caller does not read, the connection out of the pool until the end.
    """
    events = [b'{"type":"ADDED","n":%d}\n' % i + b"x" * 4000 for i in range(400)]
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events)
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with (
        serving(script=[answer + chunks + b"0\r\n\r\n"]) as server,
        pool_for(server, buffer_limit=8192) as pool,
    ):
        response = await pool.send("GET", "/api/v1/pods?watch=1", [], connect_timeout=5)
        assert response.body is None
        first = await response.read_chunk()
        assert first.startswith(b'{"type":"ADDED","n":0}')
        await asyncio.sleep(0.2)  # the caller is slow: the server must wait
        conn = response._conn
        assert conn is not None
        assert conn._queued <= 8192 + 65536 + 256 * 1024  # bounded, not 1.6 MB
        assert pool.idle_connections == 0
        got = first
        async with asyncio.timeout(10):
            while chunk := await response.read_chunk():
                got += chunk
        assert got == b"".join(events)
        assert response.complete
        assert pool.idle_connections == 1
        assert await get(pool) == (200, b"ok")
    assert server.connections == 1


async def test_a_stream_given_up_is_aborted_not_pooled() -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    async with serving(script=[answer]) as server, pool_for(server) as pool:
        response = await pool.send("GET", "/w", [], connect_timeout=5)
        assert await response.read_chunk() == b"abc"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):  # the caller's idle limit
                await response.read_chunk()
        response.close()
        assert pool.open_connections == 0
        assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_unread_response_is_not_returned_to_the_pool() -> None:
    size = 8 << 20
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with (
        serving(script=[big]) as server,
        pool_for(server, buffer_limit=1024) as pool,
    ):
        response = await pool.send("GET", "/", [], connect_timeout=5)
        assert await response.read_chunk()
        response.close()  # the caller gave up (its client left)
        assert pool.idle_connections == 0
        assert await get(pool) == (200, b"ok")
    assert server.connections == 2


def _offline_pool(port: int = 1) -> ConnectionPool:
    """A pool for a port nothing listens on (nothing is connected until a send)."""
    return ConnectionPool(
        host="127.0.0.1",
        port=port,
        ssl_context=None,
        server_hostname=None,
        resolver=None,
        limit=0,
        keepalive_timeout=30,
        host_header="api.test",
    )


async def test_unreachable_is_503() -> None:
    async with serving() as server:
        port = server.port
    pool = _offline_pool(port)
    with pytest.raises(UpstreamError) as info:
        await pool.send("GET", "/", [], connect_timeout=5)
    assert info.value.status == 503
    await pool.close()


@pytest.mark.parametrize(
    "bad", ["\r", "\n", "\r\n", "\x00", "\x08", "\x0b", "\x0c", "\x1f", "\x7f"]
)
@pytest.mark.parametrize("where", ["value", "name", "target"])
def test_a_control_character_never_goes_out_in_a_head(bad: str, where: str) -> None:
    """Header injection: whatever checked the values before, the head's own
    check refuses every control character but a value's tab.
    """
    pool = _offline_pool()
    name, value, target = "X-Test", "a" * 2000, "/api/v1/pods"
    if where == "value":
        value = f"a{bad}Impersonate-User: admin"
    elif where == "name":
        name = f"X{bad}Y"
    else:
        target = f"/api{bad}v1"
    with pytest.raises(ValueError, match="forbidden control character"):
        pool.head("GET", target, [(name, value)], None)


def test_a_head_keeps_tabs_and_non_ascii_values() -> None:
    pool = _offline_pool()
    head, chunked = pool.head(
        "POST",
        "/api/v1/pods",
        [
            ("X-Tab", "a\tb"),
            ("X-Name", "Zoë"),
            ("Authorization", "Bearer " + "t" * 1500),
        ],
        b"{}",
    )
    assert not chunked
    assert head == (
        b"POST /api/v1/pods HTTP/1.1\r\nHost: api.test\r\nX-Tab: a\tb\r\n"
        + "X-Name: Zoë".encode()
        + b"\r\nAuthorization: Bearer "
        + b"t" * 1500
        + b"\r\nContent-Length: 2\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("method", "body", "body_length", "framing_line"),
    [
        ("GET", None, None, None),
        ("DELETE", None, None, b"Content-Length: 0"),
        ("POST", b"", None, b"Content-Length: 0"),
        ("POST", b"abc", None, b"Content-Length: 3"),
        # A bytes body is declared by its own length, whatever was claimed.
        ("POST", b"abc", 52, b"Content-Length: 3"),
        ("PATCH", "stream", 6, b"Content-Length: 6"),
        ("PUT", "stream", None, b"Transfer-Encoding: chunked"),
    ],
    ids=[
        "get",
        "delete",
        "post-empty",
        "post-bytes",
        "bytes-beat-a-claimed-length",
        "stream-of-known-length",
        "stream-chunked",
    ],
)
def test_the_pool_writes_exactly_one_framing_field_of_its_own(
    method: str, body: Any, body_length: int | None, framing_line: bytes | None
) -> None:
    pool = _offline_pool()
    source = Chunks(b"abc", b"def") if body == "stream" else body
    head, chunked = pool.head(
        method, "/x", [("X-A", "1")], source, body_length=body_length
    )
    lines = head.split(b"\r\n")
    framing = [
        line
        for line in lines
        if line.lower().startswith((b"content-length:", b"transfer-encoding:"))
    ]
    assert framing == ([framing_line] if framing_line is not None else [])
    assert chunked is (framing_line == b"Transfer-Encoding: chunked")


@pytest.mark.parametrize(
    "name",
    ["Content-Length", "content-length", "Transfer-Encoding", "Host", "Connection"],
)
def test_a_callers_framing_or_host_is_refused(name: str) -> None:
    """The pool's framing is the only one: a caller's would stand beside it."""
    pool = _offline_pool()
    with pytest.raises(ValueError, match="the pool's to write"):
        pool.head("POST", "/x", [(name, "5")], b"abc")


async def test_a_streamed_body_shorter_than_its_length_fails_the_request() -> None:
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        with contextlib.suppress(Exception):
            received.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = _offline_pool(port)
    try:
        with pytest.raises(UpstreamError):
            async with asyncio.timeout(5):
                await pool.send(
                    "PUT",
                    "/x",
                    [],
                    body=Chunks(b"abc"),
                    body_length=6,
                    connect_timeout=5,
                )
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    assert b"Content-Length: 6" in received[0]


# --------------------------------------------------------------------------
# Same wire as aiohttp's client (the oracle: what the proxy sent before the pool)


class Chunks:
    """A request body read piece by piece, like ``aiohttp.StreamReader``."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def readany(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


async def _gen(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


WIRE_CASES: list[tuple[str, str, str, list[tuple[str, str]], Any]] = [
    (
        "get",
        "GET",
        "/api/v1/pods?labelSelector=a%3Db&watch=0",
        [("Accept", "a/b")],
        None,
    ),
    ("empty-query", "GET", "/api?", [], None),
    ("delete-no-body", "DELETE", "/api/v1/x", [], None),
    ("post-no-body", "POST", "/x", [("X-A", "1"), ("X-A", "2")], None),
    ("post-bytes", "POST", "/x", [("Content-Type", "application/json")], b'{"a":1}'),
    ("put-stream-chunked", "PUT", "/x", [("X-Z", "z")], ("abc", "defg")),
    ("utf8-header", "GET", "/x", [("X-Name", "jürgen")], None),
    ("surrogate-header", "GET", "/x", [("X-Raw", "a\udcffb")], None),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [c[1:] for c in WIRE_CASES],
    ids=[c[0] for c in WIRE_CASES],
)
async def test_request_wire_matches_aiohttp(
    tmp_path: Path,
    ca: trustme.CA,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: Any,
) -> None:
    async with serving(ca) as server:
        config = upstream_kubeconfig(
            tmp_path / "kc",
            f"https://127.0.0.1:{server.port}/prefix",
            ca.cert_pem.bytes(),
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        await upstream.start()
        try:

            def data() -> Any:
                if isinstance(body, tuple):
                    return _gen(*(p.encode() for p in body))
                return body

            trust = ssl.create_default_context()
            ca.configure_trust(trust)
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=trust),
                    auto_decompress=False,
                ) as session,
                session.request(
                    method,
                    upstream.url(path),
                    headers=headers,
                    data=data(),
                    skip_auto_headers=_NO_AUTO_HEADERS,
                ) as old,
            ):
                await old.read()
            new = await upstream.fetch(
                method,
                path,
                headers=headers,
                body=Chunks(*(p.encode() for p in body))
                if isinstance(body, tuple)
                else body,
                connect_timeout=5,
            )
            async with new:
                await new.read(100)
        finally:
            await upstream.close()
    (old_head, old_body), (new_head, new_body) = server.requests
    assert new_head == old_head
    assert new_body == old_body


#: What aiohttp adds unless told not to (the proxy forwards only what it got).
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

RESPONSE_CASES = [
    (
        "length",
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\n\r\nok",
    ),
    (
        "chunked",
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
    ),
    (
        "utf8-and-raw-bytes",
        b"HTTP/1.1 200 Fine\r\nX-U: j\xc3\xbcrgen\r\nX-R: a\xffb\r\nContent-Length: 0\r\n\r\n",
    ),
    ("no-reason", b"HTTP/1.1 200\r\nX-Space:   padded  \r\nContent-Length: 0\r\n\r\n"),
    (
        "empty-and-tab-values",
        b"HTTP/1.1 200 OK\r\nX-E:\r\nX-T:\tv w\t\r\nX-B: \r\nContent-Length: 0\r\n\r\n",
    ),
    (
        "chunk-extensions-and-trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;x=y\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n",
    ),
    (
        "informational-first",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    ),
    ("http-1.0", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("obs-text-reason", b"HTTP/1.1 200 D\xc3\xa9j\xe0\r\nContent-Length: 0\r\n\r\n"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "answer", [c[1] for c in RESPONSE_CASES], ids=[c[0] for c in RESPONSE_CASES]
)
async def test_response_reading_matches_aiohttp(tmp_path: Path, answer: bytes) -> None:
    async with serving(script=[answer, answer]) as server:
        config = upstream_kubeconfig(
            tmp_path / "kc", f"http://127.0.0.1:{server.port}", b""
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        await upstream.start()
        try:
            async with (
                aiohttp.ClientSession(auto_decompress=False) as session,
                session.get(upstream.url("/")) as old,
            ):
                expected = (
                    old.status,
                    old.reason,
                    list(old.headers.items()),
                    await old.read(),
                )
            new = await upstream.fetch("GET", "/", headers=[], connect_timeout=5)
            async with new:
                got = (
                    new.status,
                    new.reason,
                    list(new.headers.items()),
                    await new.read(100),
                )
        finally:
            await upstream.close()
    assert got == expected


# --------------------------------------------------------------------------
# Through the proxy: a client leaving mid-response costs the connection


@pytest.mark.slow
async def test_client_leaving_mid_response_does_not_pool_the_connection(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca, tls=False) as stack:
        async with stack.client.get(stack.url + "/api", headers=stack.bearer()) as r:
            assert r.status == 200
        pool = stack.upstream.pool
        assert pool.idle_connections == 1
        made = pool.connections_made
        r = await stack.client.get(
            stack.url + "/api/v1/namespaces/default/configmaps", headers=stack.bearer()
        )
        assert r.status == 200
        await r.content.readexactly(1024)
        r.close()  # the client leaves with most of the body unread
        await _until(lambda: pool.open_connections == 0, "upstream side closed")
        async with stack.client.get(stack.url + "/api", headers=stack.bearer()) as r:
            assert r.status == 200
        assert pool.connections_made == made + 1


async def _until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.02)
    assert check(), what


# --------------------------------------------------------------------------
# Through the proxy: one client, one reading, on every path


PATHS = [
    ("ordinary", "/api/v1/namespaces/default/configmaps", {}),
    ("streaming", "/api/v1/namespaces/default/pods?watch=1", {}),
    (
        "upgrade",
        "/api/v1/namespaces/default/pods/p/exec?command=sh",
        {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"},
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["obs-fold", "bare-lf", "two-lengths", "gzip-chunked", "http-2.0"],
)
@pytest.mark.parametrize(
    ("target", "headers"), [p[1:] for p in PATHS], ids=[p[0] for p in PATHS]
)
async def test_a_malformed_answer_is_502_on_every_path(
    tmp_path: Path,
    ca: trustme.CA,
    answer: bytes,
    target: str,
    headers: dict[str, str],
) -> None:
    async with serving(script=[answer, answer]) as server:
        config = upstream_kubeconfig(
            tmp_path / "kc", f"http://127.0.0.1:{server.port}", b""
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        async with run_proxy(
            tmp_path,
            ca,
            tls=False,
            upstream=upstream,
            settings=ProxySettings(request_timeout=5),
        ) as stack:
            async with stack.client.get(
                stack.url + target, headers={**stack.bearer(), **headers}
            ) as r:
                assert r.status == 502
                assert (await r.json())["kind"] == "Status"
            assert upstream.pool.open_connections == 0
    assert len(server.requests) == 1
