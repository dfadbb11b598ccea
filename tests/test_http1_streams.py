"""The one listener (``proxy.http1``) beyond whole requests and whole answers,
on raw loopback sockets: streamed answers and relayed ones, streamed request
bodies, upgrades, pipelining with refusals, disconnects, the drain, and the
head's bounds.

Every scenario runs on asyncio in the test itself; the ones in ``SCENARIOS``
also run on uvloop (the loop the service runs on: its transports, its TLS one
above all, are not asyncio's), each over plain TCP and over TLS.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest
import trustme
import uvloop

from proxy.http1 import Answer, BodyError, Limits, Request, Route, Server
from proxy.kube import status_body

#: Small bounds, so that each way past them is cheap to send (the webhook's kind).
LIMITS = Limits(
    max_head_bytes=1024,
    max_headers=16,
    max_body_bytes=256,
    head_timeout=5,
    body_timeout=5,
)
#: The same, streaming what is chunked or over ``max_body_bytes`` (the proxy's kind).
STREAMING = Limits(
    max_head_bytes=1024,
    max_headers=16,
    max_body_bytes=256,
    stream_bodies=True,
    head_timeout=5,
    body_timeout=5,
)

Scenario = Callable[..., Coroutine[Any, Any, None]]


@functools.cache
def _tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client context trusting one throwaway CA."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


# -- the handlers ----------------------------------------------------------------


def _digest(body: bytes) -> bytes:
    """The body itself when short, its length and SHA-256 otherwise."""
    if len(body) <= 64:
        return body
    return b"%d:%s" % (len(body), hashlib.sha256(body).hexdigest().encode())


class _Echo:
    """A route that records its requests and names each in its answer.

    A streamed body is read whole with ``readany`` (after ``hold``, when set);
    a body that breaks off is recorded in ``errors``.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.seen: list[Request] = []
        self.pieces: list[int] = []
        self.errors: list[BaseException] = []
        self.delay = delay
        self.hold: asyncio.Event | None = None
        self.done: list[str] = []
        self.peers: list[str | None] = []

    def __call__(self, request: Request) -> Answer | Coroutine[Any, Any, Answer | None]:
        self.seen.append(request)
        self.peers.append(request.peer)
        if not request.streamed and not self.delay and self.hold is None:
            return self._answer(request, request.body)
        return self._read(request)

    async def _read(self, request: Request) -> Answer | None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hold is not None:
            await self.hold.wait()
        body = request.body
        if request.streamed:
            got = bytearray()
            try:
                for _ in range(10_000_000):
                    piece = await request.readany()
                    if not piece:
                        break
                    self.pieces.append(len(piece))
                    got += piece
            except BodyError as err:
                self.errors.append(err)
                request.abort()
                return None
            body = bytes(got)
        self.done.append(request.target)
        return self._answer(request, body)

    @staticmethod
    def _answer(request: Request, body: bytes) -> Answer:
        text = b"echo %s %s %s" % (
            request.method.encode(),
            request.target.encode(),
            _digest(body),
        )
        return Answer(200, text, content_type="text/plain")


def _echoed(method: str, target: str, body: bytes = b"") -> bytes:
    return b"echo %s %s %s" % (method.encode(), target.encode(), _digest(body))


class _AnyDate(str):
    """Equal to any ``Date`` value an answer carries."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.endswith(" GMT")

    def __hash__(self) -> int:
        return 0


ANY_DATE = _AnyDate()


@asynccontextmanager
async def serving(
    routes: Mapping[str, Route] | None = None,
    *,
    default: Route | None = None,
    tls: bool = False,
    limits: Limits = LIMITS,
) -> AsyncIterator[tuple[Server, int]]:
    server = Server(
        routes or {}, default=default, limits=limits, error_body=status_body
    )
    port = await server.start("127.0.0.1", 0, ssl_context=_tls()[0] if tls else None)
    try:
        yield server, port
    finally:
        await server.drain(1.0)


# -- the client side ---------------------------------------------------------------


@asynccontextmanager
async def _connection(
    port: int,
    tls: bool = False,
    *,
    rcvbuf: int | None = None,
    sndbuf: int | None = None,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection, closed however the test ends.

    ``rcvbuf``/``sndbuf``: the client socket's buffers, set before connecting
    (small ones make a client that does not read, or a server that does not,
    push back at once).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                sock=sock,
                ssl=_tls()[1] if tls else None,
                server_hostname="127.0.0.1" if tls else None,
            ),
            5,
        )
    except BaseException:
        sock.close()
        raise
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def _head(
    reader: asyncio.StreamReader, timeout: float = 5
) -> tuple[str, list[tuple[str, str]]]:
    """A response's status line and its header fields, in order and as sent."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.append((name, value.strip()))
    return lines[0], fields


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, checking its framing."""
    body = bytearray()
    for _ in range(100_000):
        size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 5), 16)
        chunk = await asyncio.wait_for(reader.readexactly(size + 2), 5)
        assert chunk[-2:] == b"\r\n"
        if size == 0:
            return bytes(body)
        body += chunk[:-2]
    raise AssertionError("too many chunks")


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), its framed body."""
    line, fields = await _head(reader)
    headers = {k.lower(): v for k, v in fields}
    if headers.get("transfer-encoding") == "chunked":
        body = await _chunked(reader)
    else:
        size = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(size), 5)
    return int(line.split(" ")[1]), headers, body


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything until the connection ends, however it ends."""
    data = bytearray()
    try:
        for _ in range(100_000):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return bytes(data)


async def _eventually(check: Callable[[], bool], what: str, seconds: float = 5) -> None:
    """Wait (bounded) until ``check()`` holds."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds}s: {what}")


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def _post_head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def _chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


# -- requests refused, and nothing read after them -----------------------------------

#: Requests that are wrong, whatever the limits: refused, and nothing after
#: them on the connection is read.
WRONG: list[tuple[str, bytes, int]] = [
    ("absolute-form", b"GET http://x/absolute HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (
        "unknown-expectation",
        b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n"
        b"Content-Length: 2\r\n\r\nok",
        417,
    ),
    (
        "equal-lengths",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 2\r\n\r\nok",
        400,
    ),
    (
        "length-and-chunked",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunked-obfuscated",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        400,
    ),
    ("obs-fold", b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n", 400),
    ("bare-lf", b"GET /x HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", 400),
    ("lower-case-method", b"get /x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("unknown-method", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("non-ascii-target", "GET /café HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    (
        "body-on-an-upgrade",
        b"POST /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: SPDY/3.1\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    (
        "chunked-body-on-an-upgrade",
        b"POST /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: SPDY/3.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "bad-chunk-size",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
]


@pytest.mark.parametrize("limits", [LIMITS, STREAMING], ids=["whole", "streaming"])
@pytest.mark.parametrize(
    ("raw", "status"), [r[1:] for r in WRONG], ids=[r[0] for r in WRONG]
)
async def test_a_wrong_request_is_refused_and_nothing_after_it_is_read(
    raw: bytes, status: int, limits: Limits
) -> None:
    echo = _Echo()
    if raw.endswith(b"zz\r\n") and not limits.stream_bodies:
        status = 411  # refused for being chunked before its chunks are read
    async with (
        serving(default=Route(echo, methods=None), limits=limits) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(raw + _get("/after"))
        got, headers, body = await _response(reader)
        assert got == status
        assert headers.get("connection") == "close"
        assert json.loads(body)["code"] == status
        assert await _until_closed(reader) == b"", "nothing after the refusal"
        assert echo.seen == []


#: (name, raw request, status without streaming, body the handler reads when
#: streaming or ``None`` for the same refusal).
BEYOND: list[tuple[str, bytes, int, bytes | None]] = [
    (
        "chunked-body",
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        411,
        b"hello world",
    ),
    (
        "oversized-head",
        b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n",
        431,
        None,
    ),
    (
        "too-many-headers",
        b"GET /many HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(20))
        + b"\r\n",
        431,
        None,
    ),
    (
        "body-over-the-limit",
        b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: 600\r\n\r\n" + b"L" * 600,
        413,
        b"L" * 600,
    ),
    (
        "continue-over-the-limit",
        b"POST /continue HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 300\r\n\r\n" + b"C" * 300,
        413,
        b"C" * 300,
    ),
]


@pytest.mark.parametrize("limits", [LIMITS, STREAMING], ids=["whole", "streaming"])
@pytest.mark.parametrize(
    ("raw", "status", "streamed"),
    [b[1:] for b in BEYOND],
    ids=[b[0] for b in BEYOND],
)
async def test_a_request_beyond_the_limits_is_refused_or_streamed(
    raw: bytes, status: int, streamed: bytes | None, limits: Limits
) -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None), limits=limits) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(raw)
        got, headers, body = await _response(reader)
        if limits.stream_bodies and streamed is not None:
            assert got == 200
            method, target = raw.split(b" ")[:2]
            assert body == _echoed(method.decode(), target.decode(), streamed)
            assert [r.streamed for r in echo.seen] == [True]
            # The connection serves the next request.
            writer.write(_get("/next"))
            assert (await _response(reader))[2] == _echoed("GET", "/next")
            assert len(server.connections) == 1
            return
        assert got == status
        assert headers["connection"] == "close"
        assert await _until_closed(reader) == b""
        assert echo.seen == []


async def test_a_non_ascii_value_is_read_as_latin_1_and_served() -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write("GET /accent HTTP/1.1\r\nHost: x\r\nX-Name: café\r\n\r\n".encode())
        assert (await _response(reader))[0] == 200
        (request,) = echo.seen
        assert request.headers["x-name"] == "café".encode().decode("latin-1")


# -- the request's fields and routes ---------------------------------------------------


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_fields_keep_case_order_and_repeats_and_the_peer_is_known(
    version: str,
) -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(
            f"GET /f HTTP/{version}\r\nX-Dup: 1\r\nhost: x\r\nX-Dup:  2 \r\n"
            "CamelCase-Name: v\r\n\r\n".encode()
        )
        assert (await _response(reader))[0] == 200
        (request,) = echo.seen
        assert request.fields == [
            ("X-Dup", "1"),
            ("host", "x"),
            ("X-Dup", "2"),
            ("CamelCase-Name", "v"),
        ]
        assert request.headers["x-dup"] == "1, 2"
        assert request.http11 is (version == "1.1")
        assert echo.peers == ["127.0.0.1"]


async def test_the_default_route_takes_every_path_and_method_routes_come_first() -> (
    None
):
    exact = _Echo()
    catch_all = _Echo()
    async with (
        serving({"/exact": Route(exact)}, default=Route(catch_all, methods=None)) as (
            _,
            port,
        ),
        _connection(port) as (reader, writer),
    ):
        for method, target in [
            ("GET", "/anything?x=1"),
            ("DELETE", "/a/b"),
            ("PATCH", "/pot"),
            ("POST", "/"),
            ("OPTIONS", "/exact/below"),
        ]:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body = await _response(reader)
            assert (status, body) == (200, _echoed(method, target))
        writer.write(b"POST /exact?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _response(reader))[0] == 200
        writer.write(b"GET /exact HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await _response(reader)
        assert (status, headers["allow"]) == (405, "POST")
        assert [r.method for r in exact.seen] == ["POST"]
        assert len(catch_all.seen) == 5


async def test_a_default_route_with_methods_refuses_the_others() -> None:
    async with (
        serving(default=Route(_Echo(), methods=frozenset({"GET"}))) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(b"PUT /x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await _response(reader)
        assert (status, headers["allow"]) == (405, "GET")
        writer.write(_get("/x"))
        assert (await _response(reader))[0] == 200, "the connection is kept"


# -- streamed answers ----------------------------------------------------------------

PIECES = [b"first piece ", b"", b"x" * 70_000, b" and the end"]


async def _stream_pieces(request: Request) -> None:
    length = sum(map(len, PIECES)) if request.path == "/length" else None
    request.start_stream(
        200, [("Content-Type", "text/plain"), ("X-Streamed", "yes")], length=length
    )
    for piece in PIECES:
        await request.send(piece)
    request.end_stream()


async def _chunked_to_aiohttp_client(tls: bool = False) -> None:
    async with serving(default=Route(_stream_pieces, methods=None), tls=tls) as (
        _,
        port,
    ):
        connector = aiohttp.TCPConnector(ssl=_tls()[1] if tls else False)
        scheme = "https" if tls else "http"
        async with aiohttp.ClientSession(connector=connector) as session:
            for path in ("/chunked", "/length", "/chunked"):
                async with asyncio.timeout(5):
                    async with session.get(
                        f"{scheme}://127.0.0.1:{port}{path}"
                    ) as resp:
                        assert resp.status == 200
                        assert resp.headers["X-Streamed"] == "yes"
                        if path == "/chunked":
                            assert resp.headers["Transfer-Encoding"] == "chunked"
                            assert "Content-Length" not in resp.headers
                        else:
                            assert "Transfer-Encoding" not in resp.headers
                        assert await resp.read() == b"".join(PIECES)


async def test_a_chunked_stream_is_reassembled_by_aiohttps_client() -> None:
    await _chunked_to_aiohttp_client()


@pytest.mark.parametrize("path", ["/chunked", "/length"])
async def test_a_streamed_answer_is_framed_and_the_connection_kept(path: str) -> None:
    async with (
        serving(default=Route(_stream_pieces, methods=None)) as (server, port),
        _connection(port) as (reader, writer),
    ):
        # Two streamed answers pipelined on one connection, then a third.
        writer.write(_get(path) + _get(path))
        for _ in range(2):
            line, fields = await _head(reader)
            headers = {k.lower(): v for k, v in fields}
            assert line == "HTTP/1.1 200 OK"
            assert "connection" not in headers
            assert sum(k.lower() == "date" for k, _ in fields) == 1
            if path == "/chunked":
                assert headers["transfer-encoding"] == "chunked"
                assert "content-length" not in headers
                assert await _chunked(reader) == b"".join(PIECES)
            else:
                assert "transfer-encoding" not in headers
                length = int(headers["content-length"])
                assert length == sum(map(len, PIECES))
                assert await reader.readexactly(length) == b"".join(PIECES)
        writer.write(_get(path))
        assert (await _response(reader))[2] == b"".join(PIECES)
        assert len(server.connections) == 1


async def test_an_http10_client_gets_a_close_delimited_stream() -> None:
    async with (
        serving(default=Route(_stream_pieces, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        line, fields = await _head(reader)
        headers = {k.lower(): v for k, v in fields}
        assert line == "HTTP/1.1 200 OK"
        assert headers["connection"] == "close"
        assert "content-length" not in headers
        assert "transfer-encoding" not in headers
        body = await asyncio.wait_for(reader.read(), 5)
        assert body == b"".join(PIECES), "the body ends where the connection does"


async def test_a_head_request_gets_a_streamed_head_without_a_body() -> None:
    async with (
        serving(default=Route(_stream_pieces, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(b"HEAD /chunked HTTP/1.1\r\nHost: x\r\n\r\n" + _get("/length"))
        line, fields = await _head(reader)
        assert line == "HTTP/1.1 200 OK"
        assert not any(k.lower() == "transfer-encoding" for k, _ in fields)
        # The next answer follows at once: no body bytes in between.
        status, _, body = await _response(reader)
        assert (status, body) == (200, b"".join(PIECES))


PIECE = 1024 * 1024
#: Far more than the kernel's loopback buffers and the transport's hold.
COUNT = 32


async def _answer_backpressure(tls: bool = False) -> None:
    """A client that does not read holds the handler back; then it gets it all."""
    written: list[int] = []

    async def flood(request: Request) -> None:
        request.start_stream(200, [], length=PIECE * COUNT)
        for i in range(COUNT):
            written.append(i)
            await request.send(bytes([i]) * PIECE)
        request.end_stream()

    async with (
        serving(default=Route(flood, methods=None), tls=tls) as (_, port),
        _connection(port, tls, rcvbuf=4096) as (reader, writer),
    ):
        writer.write(_get("/flood"))
        await asyncio.sleep(0.5)
        assert 1 <= len(written) <= 12, "the handler waits for the client"
        _, fields = await _head(reader)
        assert dict(fields)["Content-Length"] == str(PIECE * COUNT)
        body = await asyncio.wait_for(reader.readexactly(PIECE * COUNT), 10)
        assert len(written) == COUNT
        for i in range(COUNT):
            assert body[i * PIECE : (i + 1) * PIECE] == bytes([i]) * PIECE


@pytest.mark.slow
async def test_a_stream_waits_for_a_client_that_does_not_read() -> None:
    await _answer_backpressure()


#: (name, framing, how the handler ends): each leaves half an answer out, so
#: the connection is cut and no 500 follows the partial body.
BROKEN_STREAMS = [
    ("length-then-raise", "/length", "raise"),
    ("chunked-then-raise", "/chunked", "raise"),
    ("length-then-abort", "/length", "abort"),
    ("chunked-then-abort", "/chunked", "abort"),
]


@pytest.mark.parametrize(
    ("path", "end"),
    [b[1:] for b in BROKEN_STREAMS],
    ids=[b[0] for b in BROKEN_STREAMS],
)
async def test_a_stream_broken_off_cuts_the_connection(path: str, end: str) -> None:
    async def broken(request: Request) -> None:
        request.start_stream(200, [], length=1000 if path == "/length" else None)
        await request.send(b"a" * 100)
        if end == "abort":
            request.abort()
            return
        raise RuntimeError("the upstream went away")

    async with (
        serving(default=Route(broken, methods=None)) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get(path) + _get("/next"))
        line, _fields = await _head(reader)
        assert line == "HTTP/1.1 200 OK"
        rest = await _until_closed(reader)
        if path == "/length":
            assert rest == b"a" * 100, "fewer bytes than the declared length"
        else:
            assert rest == b"64\r\n" + b"a" * 100 + b"\r\n", "no last chunk"
        await _eventually(lambda: not server.connections, "the connection is gone")


@pytest.mark.parametrize(
    ("request_line", "extra"),
    [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")],
    ids=["http11-close", "http10-length"],
)
async def test_a_stream_to_a_closing_client_ends_with_the_connection(
    request_line: str, extra: str
) -> None:
    async with (
        serving(default=Route(_stream_pieces, methods=None)) as (server, port),
        _connection(port) as (reader, writer),
    ):
        path = "/chunked" if request_line == "HTTP/1.1" else "/length"
        writer.write(
            f"GET {path} {request_line}\r\nHost: x\r\n{extra}\r\n".encode()
            + _get("/never")
        )
        status, headers, body = await _response(reader)
        assert (status, headers["connection"], body) == (200, "close", b"".join(PIECES))
        assert await _until_closed(reader) == b"", "nothing more, not even /never"
        await _eventually(lambda: not server.connections, "the connection is gone")


async def test_a_handler_that_neither_answers_nor_streams_cuts_the_connection() -> None:
    async def silent(request: Request) -> None:
        await asyncio.sleep(0)

    async with (
        serving(default=Route(silent, methods=None)) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get("/silent") + _get("/next"))
        assert await _until_closed(reader) == b""
        await _eventually(lambda: not server.connections, "the connection is gone")


async def _client_leaves_mid_stream(tls: bool = False) -> None:
    """A client that leaves mid-answer cancels the handler (it waits to
    send); a send after that raises ``ConnectionResetError``."""
    outcomes: list[str] = []
    gone = asyncio.Event()

    async def endless(request: Request) -> None:
        request.start_stream(200, [])
        try:
            for _ in range(100_000):
                await request.send(b"z" * 65536)
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            try:
                await request.send(b"late")
            except ConnectionResetError:
                outcomes.append("send raised")
            raise
        finally:
            gone.set()

    async with (
        serving(default=Route(endless, methods=None), tls=tls) as (server, port),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(_get("/endless"))
        await _head(reader)
        assert (await asyncio.wait_for(reader.readexactly(10), 5))[:5] == b"10000"
        writer.transport.abort()
        await asyncio.wait_for(gone.wait(), 5)
        assert outcomes == ["cancelled", "send raised"]
        await _eventually(lambda: not server.inflight, "nothing in flight")


async def test_send_raises_once_the_client_has_gone() -> None:
    await _client_leaves_mid_stream()


# -- relayed answers -------------------------------------------------------------------

RELAYED = (
    ("X-B", "2"),
    ("Content-Type", "text/x-relayed"),
    ("Set-Cookie", "a=1"),
    ("set-cookie", "b=2"),
    ("X-A", "1"),
)


@pytest.mark.parametrize(
    ("answer", "status_line", "expect_headers", "expect_body"),
    [
        (
            Answer(200, b"hello", RELAYED, content_type=None),
            "HTTP/1.1 200 OK",
            list(RELAYED),
            b"hello",
        ),
        (
            Answer(
                200,
                b"dated",
                (("Date", "Mon, 01 Jan 2001 00:00:00 GMT"), ("X-A", "1")),
                content_type=None,
            ),
            "HTTP/1.1 200 OK",
            [("Date", "Mon, 01 Jan 2001 00:00:00 GMT"), ("X-A", "1")],
            b"dated",
        ),
        (
            Answer(
                404,
                b"",
                (("date", "Tue, 02 Jan 2001 00:00:00 GMT"),),
                content_type=None,
            ),
            "HTTP/1.1 404 Not Found",
            [("date", "Tue, 02 Jan 2001 00:00:00 GMT")],
            b"",
        ),
        (
            Answer(299, b"{}", (), content_type=None, reason="Quite Fine"),
            "HTTP/1.1 299 Quite Fine",
            [],
            b"{}",
        ),
        (
            Answer(503, b"x", (), content_type=None, reason="Try Later"),
            "HTTP/1.1 503 Try Later",
            [],
            b"x",
        ),
        (
            Answer(204, b"never sent", (("X-A", "1"),), content_type=None),
            "HTTP/1.1 204 No Content",
            [("X-A", "1")],
            None,
        ),
        (
            Answer(304, b"never sent", (("ETag", '"v1"'),), content_type=None),
            "HTTP/1.1 304 Not Modified",
            [("ETag", '"v1"')],
            None,
        ),
        (
            Answer(
                200,
                b"abc",
                (
                    ("X-A", "1"),
                    ("Content-Length", "999"),
                    ("transfer-encoding", "chunked"),
                    ("Connection", "close"),
                ),
                content_type=None,
            ),
            "HTTP/1.1 200 OK",
            [("X-A", "1")],
            b"abc",
        ),
    ],
    ids=[
        "in-order",
        "own-date",
        "own-lowercase-date",
        "reason",
        "reason-5xx",
        "204",
        "304",
        "own-framing-dropped",
    ],
)
async def test_a_relayed_answer_keeps_its_headers_and_gets_only_date_and_length(
    answer: Answer,
    status_line: str,
    expect_headers: list[tuple[str, str]],
    expect_body: bytes | None,
) -> None:
    def relay(_: Request) -> Answer:
        return answer

    async with (
        serving(
            {"/relay": Route(relay, methods=None)}, default=Route(_Echo(), methods=None)
        ) as (_, port),
        _connection(port) as (reader, writer),
    ):
        # A request pipelined behind: a stray body byte would spoil it.
        writer.write(_get("/relay") + _get("/after"))
        line, fields = await _head(reader)
        assert line == status_line
        assert fields[: len(expect_headers)] == expect_headers, "as given, in order"
        added = fields[len(expect_headers) :]
        dates = [v for k, v in fields if k.lower() == "date"]
        assert len(dates) == 1
        assert not any(k.lower() == "content-type" for k, _ in added)
        if expect_body is None:
            assert {k.lower() for k, _ in added} <= {"date"}
        else:
            assert ("Content-Length", str(len(expect_body))) in added
            assert {k.lower() for k, _ in added} <= {"date", "content-length"}
            assert await reader.readexactly(len(expect_body)) == expect_body
        status, _, body = await _response(reader)
        assert (status, body) == (200, _echoed("GET", "/after"))


async def test_a_streamed_answer_keeps_its_headers_and_reason() -> None:
    async def relay(request: Request) -> None:
        request.start_stream(
            202,
            [("X-B", "2"), ("Date", "Mon, 01 Jan 2001 00:00:00 GMT"), ("X-A", "1")],
            length=2,
            reason="Taken",
        )
        await request.send(b"ok")
        request.end_stream()

    async with (
        serving(default=Route(relay, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get("/r"))
        line, fields = await _head(reader)
        assert line == "HTTP/1.1 202 Taken"
        assert fields == [
            ("X-B", "2"),
            ("Date", "Mon, 01 Jan 2001 00:00:00 GMT"),
            ("X-A", "1"),
            ("Content-Length", "2"),
        ]
        assert await reader.readexactly(2) == b"ok"


# -- streamed request bodies -----------------------------------------------------------


async def _streamed_with_a_length(tls: bool = False) -> None:
    """A body over ``max_body_bytes`` with a length reaches the handler in
    pieces, exactly; the connection then serves the next request."""
    echo = _Echo()
    body = bytes(range(256)) * 4096  # 1 MiB
    async with (
        serving(default=Route(echo, methods=None), tls=tls, limits=STREAMING) as (
            server,
            port,
        ),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(_post_head("/up", f"Content-Length: {len(body)}\r\n"))
        for i in range(0, len(body), 100_000):
            writer.write(body[i : i + 100_000])
            await writer.drain()
        status, headers, answer = await _response(reader)
        assert (status, answer) == (200, _echoed("POST", "/up", body))
        assert "connection" not in headers
        (request,) = echo.seen
        assert request.streamed
        assert request.complete
        assert request.body == b""
        assert len(echo.pieces) > 1, "read in pieces"
        writer.write(_post_head("/small", "Content-Length: 3\r\n") + b"abc")
        assert (await _response(reader))[2] == _echoed("POST", "/small", b"abc")
        assert not echo.seen[1].streamed, "a small body is read whole"
        assert len(server.connections) == 1


async def test_a_long_body_is_streamed_to_the_handler() -> None:
    await _streamed_with_a_length()


#: Chunked bodies as llhttp (strict) takes them, and what the handler reads.
CHUNKED: list[tuple[str, bytes, bytes]] = [
    ("plain", _chunk(b"hello") + _chunk(b" world") + b"0\r\n\r\n", b"hello world"),
    (
        "extensions",
        _chunk(b"hello", b";name=value")
        + _chunk(b"!", b';q="quoted"')
        + b"0;x\r\n\r\n",
        b"hello!",
    ),
    (
        "trailers",
        _chunk(b"data") + b"0\r\nX-Trailer: yes\r\nHost: evil\r\nX-Other: 1\r\n\r\n",
        b"data",
    ),
    ("empty", b"0\r\n\r\n", b""),
    ("upper-case-hex", b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    ("big-chunk", _chunk(b"B" * 300_000) + b"0\r\n\r\n", b"B" * 300_000),
]


#: Each case in one write, and (short ones) a byte at a time.
CHUNKED_SENDS = [
    pytest.param(chunks, expected, split, id=f"{name}-{how}")
    for name, chunks, expected in CHUNKED
    for split, how in ((False, "one-write"), (True, "byte-by-byte"))
    if not split or len(chunks) <= 1000
]


@pytest.mark.parametrize(("chunks", "expected", "split"), CHUNKED_SENDS)
async def test_a_chunked_body_is_streamed_exactly(
    chunks: bytes, expected: bytes, split: bool
) -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None), limits=STREAMING) as (_, port),
        _connection(port) as (reader, writer),
    ):
        raw = (
            _post_head("/c", "Transfer-Encoding: chunked\r\nX-Before: 1\r\n")
            + chunks
            + _get("/next")
        )
        if split:
            for i in range(len(raw)):
                writer.write(raw[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(raw)
        status, _, answer = await _response(reader)
        assert (status, answer) == (200, _echoed("POST", "/c", expected))
        assert (await _response(reader))[2] == _echoed("GET", "/next")
        request = echo.seen[0]
        assert request.streamed
        # Trailers are not header fields: never seen as such, never forwarded.
        assert [k for k, _ in request.fields] == [
            "Host",
            "Transfer-Encoding",
            "X-Before",
        ]
        assert request.headers["host"] == "x"


#: A chunked body's framing that never ends, sent after a first chunk: each
#: grows past the head's limit without a body byte.
ENDLESS_FRAMING = [
    ("trailer", b"0\r\nX-Trailer: ", b"t"),
    ("extension", b"5;name=", b"e"),
]


@pytest.mark.parametrize(
    ("start", "filler"),
    [e[1:] for e in ENDLESS_FRAMING],
    ids=[e[0] for e in ENDLESS_FRAMING],
)
async def test_chunk_framing_that_never_ends_is_cut(
    start: bytes, filler: bytes
) -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None), limits=STREAMING) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(
            _post_head("/up", "Transfer-Encoding: chunked\r\n") + _chunk(b"one")
        )
        await _eventually(lambda: echo.pieces == [3], "the first chunk is read")
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(start)
        for _ in range(40):  # 4000 bytes, against a 1024-byte limit
            if echo.errors:
                break
            writer.write(filler * 100)
            await asyncio.sleep(0.01)
        await _eventually(lambda: len(echo.errors) == 1, "the handler learns it")
        # By the bytes' bound, not by the stall's (body_timeout is 5s).
        assert loop.time() - started < 2
        assert isinstance(echo.errors[0], BodyError)
        assert await _until_closed(reader) == b"", "cut, not answered"
        await _eventually(lambda: not server.connections, "the connection is gone")


async def _request_backpressure(tls: bool = False) -> None:
    """A streamed body the handler does not read stops being read (memory
    stays bounded), even past ``body_timeout``; then it arrives whole."""
    echo = _Echo()
    echo.hold = asyncio.Event()
    total = 32 * 1024 * 1024
    piece = bytes(range(256)) * 1024  # 256 KiB
    limits = Limits(
        max_head_bytes=1024,
        max_body_bytes=256,
        stream_bodies=True,
        head_timeout=5,
        body_timeout=0.5,
    )
    async with (
        serving(default=Route(echo, methods=None), tls=tls, limits=limits) as (
            server,
            port,
        ),
        _connection(port, tls, sndbuf=65536) as (reader, writer),
    ):
        writer.write(_post_head("/up", f"Content-Length: {total}\r\n"))
        sent = 0
        while sent < total:
            writer.write(piece)
            sent += len(piece)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break
        else:
            pytest.fail("the server read a body nobody reads")
        (conn,) = server.connections
        assert conn._paused_reading
        (request,) = echo.seen
        held = len(request.pending)
        assert held <= 256 * 1024 + 512 * 1024, "the high-water mark plus a read"
        # Past body_timeout: the pause is the server's, not a stalled client.
        await asyncio.sleep(1.2)
        assert server.connections == {conn}, "not cut for the server's own pause"
        echo.hold.set()

        async def rest() -> None:
            for _ in range((total - sent) // len(piece)):
                writer.write(piece)
                await writer.drain()

        sending = asyncio.create_task(rest())
        status, _, answer = await _response(reader)
        await asyncio.wait_for(sending, 5)
        assert (status, answer) == (
            200,
            _echoed("POST", "/up", piece * (total // len(piece))),
        )
        assert echo.errors == []


@pytest.mark.slow
async def test_a_streamed_body_nobody_reads_stops_being_read() -> None:
    await _request_backpressure()


async def _stalled_body(tls: bool = False) -> None:
    echo = _Echo()
    limits = Limits(
        max_body_bytes=256, stream_bodies=True, head_timeout=5, body_timeout=0.3
    )
    async with (
        serving(default=Route(echo, methods=None), tls=tls, limits=limits) as (
            server,
            port,
        ),
        _connection(port, tls) as (reader, writer),
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(_post_head("/up", "Content-Length: 1000\r\n") + b"s" * 500)
        assert await _until_closed(reader) == b"", "cut, not answered"
        assert 0.25 <= loop.time() - started < 3
        await _eventually(lambda: len(echo.errors) == 1, "the handler learns it")
        assert isinstance(echo.errors[0], BodyError)
        assert echo.pieces == [500]
        await _eventually(lambda: not server.connections, "the connection is gone")


@pytest.mark.slow
async def test_a_streamed_body_that_stalls_is_cut() -> None:
    await _stalled_body()


async def _broken_body(tls: bool = False) -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None), tls=tls, limits=STREAMING) as (
            server,
            port,
        ),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(
            _post_head("/up", "Transfer-Encoding: chunked\r\n") + _chunk(b"hello")
        )
        await _eventually(lambda: echo.pieces == [5], "the first chunk is read")
        writer.write(b"zz\r\nmore\r\n" + _get("/never"))
        assert await _until_closed(reader) == b"", "cut, not answered"
        await _eventually(lambda: len(echo.errors) == 1, "the handler learns it")
        assert isinstance(echo.errors[0], BodyError)
        assert len(echo.seen) == 1
        await _eventually(lambda: not server.connections, "the connection is gone")


async def test_a_streamed_body_that_breaks_raises_in_the_handler() -> None:
    await _broken_body()


async def test_a_streamed_body_that_ends_with_the_connection_raises() -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None), limits=STREAMING) as (_, port),
        _connection(port) as (_reader, writer),
    ):
        writer.write(_post_head("/up", "Content-Length: 1000\r\n") + b"h" * 300)
        await _eventually(lambda: echo.pieces == [300], "the first bytes are read")
        writer.transport.abort()
        await _eventually(lambda: len(echo.errors) == 1, "the handler learns it")


async def _continue_streamed(tls: bool = False) -> None:
    """``100 Continue`` goes out when the handler first reads, not before."""
    echo = _Echo()
    echo.hold = asyncio.Event()
    async with (
        serving(default=Route(echo, methods=None), tls=tls, limits=STREAMING) as (
            _,
            port,
        ),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(
            _post_head("/up", "Expect: 100-continue\r\nContent-Length: 1000\r\n")
        )
        await _eventually(lambda: len(echo.seen) == 1, "the handler runs at once")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.2)
        echo.hold.set()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"c" * 1000)
        status, _, answer = await _response(reader)
        assert (status, answer) == (200, _echoed("POST", "/up", b"c" * 1000))


async def test_expect_continue_on_a_streamed_body_waits_for_the_handler() -> None:
    await _continue_streamed()


async def test_a_streamed_body_left_unread_closes_the_connection_after_the_answer() -> (
    None
):
    """A handler may answer before the body is in (say, 401); the rest of the
    body is then not read, so the connection cannot be kept, and no ``100``
    invites a body nobody will read."""

    def refuse(_: Request) -> Answer:
        return Answer(401, b"{}")

    async with serving(default=Route(refuse, methods=None), limits=STREAMING) as (
        server,
        port,
    ):
        for extra in ("", "Expect: 100-continue\r\n"):
            async with _connection(port) as (reader, writer):
                writer.write(
                    _post_head("/up", f"{extra}Content-Length: 100000\r\n") + b"u" * 10
                )
                line, fields = await _head(reader)
                assert line == "HTTP/1.1 401 Unauthorized"
                assert ("Connection", "close") in fields
                assert await reader.readexactly(2) == b"{}"
                assert await _until_closed(reader) == b""
        await _eventually(lambda: not server.connections, "the connections are gone")


# -- upgrades ----------------------------------------------------------------------------

UPGRADE = (
    b"GET /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n"
)


class _Tunnel:
    """Takes the connection over and echoes the tunnel's bytes upper-cased."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def __call__(self, request: Request) -> None:
        assert request.upgrade
        client = request.upgrade_to(
            [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
        )
        try:
            for _ in range(10_000):
                data = await client.read()
                if not data:
                    break
                await client.write(data.upper())
            self.ended.append("eof")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        finally:
            client.close()


async def _upgraded(tls: bool = False) -> None:
    tunnel = _Tunnel()
    async with (
        serving(default=Route(tunnel, methods=None), tls=tls) as (server, port),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(UPGRADE + b"early bytes " + _get("/not-http"))
        line, fields = await _head(reader)
        assert line == "HTTP/1.1 101 Switching Protocols"
        assert fields == [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
        early = (b"early bytes " + _get("/not-http")).upper()
        got = bytearray()
        for _ in range(100):
            if len(got) >= len(early):
                break
            got += await asyncio.wait_for(reader.read(65536), 5)
        assert bytes(got) == early, "what came after the request is the tunnel's"
        writer.write(b"later")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"LATER"
        assert not server.connections, "the listener let go of it"
        # The client leaves: the tunnel ends by its own EOF, not cancelled.
        if tls:
            writer.transport.abort()
        else:
            writer.write_eof()
        await _eventually(lambda: tunnel.ended != [], "the tunnel ends")
        assert tunnel.ended == ["eof"]


async def test_an_upgrade_hands_the_connection_and_its_early_bytes_over() -> None:
    await _upgraded()


async def test_an_upgrade_answered_normally_closes_after_the_answer() -> None:
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(UPGRADE + _get("/not-http"))
        status, headers, body = await _response(reader)
        assert (status, headers["connection"], body) == (
            200,
            "close",
            _echoed("GET", "/exec"),
        )
        assert await _until_closed(reader) == b"", "what follows is not HTTP"
        assert [r.upgrade for r in echo.seen] == [True]


async def test_upgrade_to_refuses_a_request_that_asked_for_none() -> None:
    errors: list[BaseException] = []

    async def wrong(request: Request) -> Answer:
        try:
            request.upgrade_to([])
        except RuntimeError as err:
            errors.append(err)
        return Answer(200, b"{}")

    async with (
        serving(default=Route(wrong, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get("/plain", "Upgrade: SPDY/3.1\r\n"))
        assert (await _response(reader))[0] == 200
        assert len(errors) == 1


# -- pipelining, disconnects, the drain --------------------------------------------------


async def _refusal_behind_a_slow_request(tls: bool = False) -> None:
    echo = _Echo(delay=0.2)
    async with (
        serving(default=Route(echo, methods=None), tls=tls) as (_, port),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(
            _get("/slow")
            + b"GET /two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
            + _get("/never")
        )
        status, headers, body = await _response(reader)
        assert (status, body) == (200, _echoed("GET", "/slow"))
        assert "connection" not in headers
        status, headers, _ = await _response(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert await _until_closed(reader) == b""
        assert [r.target for r in echo.seen] == ["/slow"]


async def test_a_refusal_behind_a_slow_request_is_answered_in_its_place() -> None:
    await _refusal_behind_a_slow_request()


@pytest.mark.slow
async def test_a_parse_error_behind_a_slow_request_is_answered_in_its_place() -> None:
    echo = _Echo(delay=0.2)
    async with (
        serving(default=Route(echo, methods=None)) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get("/slow") + _get("/second") + b"GET /x HTTP/1.1\r\nHost: x\nX")
        for target in ("/slow", "/second"):
            status, _, body = await _response(reader)
            assert (status, body) == (200, _echoed("GET", target))
        status, headers, _ = await _response(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert await _until_closed(reader) == b""


async def _disconnect_cancels(tls: bool = False) -> None:
    cancelled = asyncio.Event()
    forever = asyncio.Event()

    async def waits(request: Request) -> Answer:
        try:
            await forever.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Answer(200, b"{}")

    async with (
        serving(default=Route(waits, methods=None), tls=tls) as (server, port),
        _connection(port, tls) as (_reader, writer),
    ):
        writer.write(_get("/wait"))
        await _eventually(lambda: bool(server.inflight), "the handler runs")
        writer.transport.abort()
        await asyncio.wait_for(cancelled.wait(), 5)
        await _eventually(lambda: not server.inflight, "nothing in flight")


async def test_a_client_that_leaves_cancels_its_waiting_handler() -> None:
    await _disconnect_cancels()


async def _drain_stops_watches(tls: bool = False) -> None:
    drained: list[str] = []

    async def watch(request: Request) -> None:
        request.start_stream(200, [("Content-Type", "application/json")])
        await request.send(b'{"type":"ADDED"}\n')
        await asyncio.wait_for(server.stopping.wait(), 10)
        await request.send(b'{"type":"BYE"}\n')
        request.end_stream()

    async with (
        serving(default=Route(watch, methods=None), tls=tls) as (server, port),
        _connection(port, tls) as (reader, writer),
    ):
        server.on_drained.append(lambda: drained.append("drained"))
        writer.write(_get("/watch"))
        line, fields = await _head(reader)
        assert line == "HTTP/1.1 200 OK"
        assert ("Connection", "close") not in fields
        assert not server.stopping.is_set()
        await asyncio.wait_for(server.drain(5.0), 6)
        assert server.stopping.is_set()
        assert await _chunked(reader) == b'{"type":"ADDED"}\n{"type":"BYE"}\n'
        assert await _until_closed(reader) == b""
        assert drained == ["drained"], "called once the drain is over"
    assert drained == ["drained"], "and only once"


async def test_the_drain_tells_long_answers_to_stop_and_reports_when_over() -> None:
    await _drain_stops_watches()


# -- the head's bounds --------------------------------------------------------------------


async def test_a_field_over_max_field_bytes_is_431() -> None:
    limits = Limits(max_head_bytes=4096, max_field_bytes=100)
    echo = _Echo()
    async with serving(default=Route(echo, methods=None), limits=limits) as (_, port):
        async with _connection(port) as (reader, writer):
            writer.write(_get("/ok", "X-Fits: " + "f" * 90 + "\r\n"))
            assert (await _response(reader))[0] == 200
            writer.write(_get("/big", "X-Big: " + "b" * 200 + "\r\n"))
            status, headers, _ = await _response(reader)
            assert (status, headers["connection"]) == (431, "close")
            assert await _until_closed(reader) == b""
        assert [r.target for r in echo.seen] == ["/ok"]


#: Heads that never end a line, sent in pieces: each grows past the limit.
UNTERMINATED = [
    ("value", b"GET /x HTTP/1.1\r\nHost: x\r\nX-Long: ", b"v"),
    ("name", b"GET /x HTTP/1.1\r\nHost: x\r\nX-Long", b"n"),
    ("target", b"GET /", b"t"),
]


async def _unterminated_head(case: str, tls: bool = False) -> None:
    _, start, filler = next(u for u in UNTERMINATED if u[0] == case)
    echo = _Echo()
    async with (
        serving(default=Route(echo, methods=None), tls=tls) as (server, port),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(start)
        # Up to 20 writes of 100 bytes: twice the 1024-byte limit, never a
        # line end. The answer is read as soon as it comes: writing on after
        # the server closed would reset the connection and lose it.
        line = ""
        fields: list[tuple[str, str]] = []
        for _ in range(20):
            writer.write(filler * 100)
            with suppress(TimeoutError):
                line, fields = await _head(reader, 0.05)
                break
        assert line.startswith("HTTP/1.1 431 "), line
        assert ("Connection", "close") in fields
        assert await _until_closed(reader) != b"", "the Status body, then the end"
        await _eventually(lambda: not server.connections, "the connection is gone")
        assert echo.seen == []


@pytest.mark.slow
@pytest.mark.parametrize("case", [u[0] for u in UNTERMINATED])
async def test_an_unterminated_head_over_the_limit_is_431(case: str) -> None:
    await _unterminated_head(case)


@pytest.mark.parametrize("newlines", [False, True], ids=["plain-body", "body-with-lf"])
async def test_a_head_after_a_large_body_in_the_same_read_is_not_refused(
    newlines: bool,
) -> None:
    """The head's bound counts the head's own bytes, not the body's before it."""
    limits = Limits(max_head_bytes=1024, max_body_bytes=512 * 1024)
    echo = _Echo()
    filler = b"line\n" if newlines else b"xxxxx"
    body = filler * (200 * 1024 // 5)
    second = _post_head("/second", "X-Pad: " + "p" * 600 + "\r\nContent-Length: 2\r\n")
    cut = second.index(b"X-Pad") + 300
    async with (
        serving(default=Route(echo, methods=None), limits=limits) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(
            _post_head("/first", f"Content-Length: {len(body)}\r\n")
            + body
            + second[:cut]
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(second[cut:] + b"ok")
        status, _, answer = await _response(reader)
        assert (status, answer) == (200, _echoed("POST", "/first", body))
        status, _, answer = await _response(reader)
        assert (status, answer) == (200, _echoed("POST", "/second", b"ok"))


# -- on uvloop, and over TLS ------------------------------------------------------------

#: The scenarios above again on uvloop, plain and over TLS, and over TLS on asyncio.
SCENARIOS: list[tuple[str, Scenario, tuple[Any, ...]]] = [
    ("chunked-to-aiohttp-client", _chunked_to_aiohttp_client, ()),
    ("answer-backpressure", _answer_backpressure, ()),
    ("client-leaves-mid-stream", _client_leaves_mid_stream, ()),
    ("streamed-with-a-length", _streamed_with_a_length, ()),
    ("request-backpressure", _request_backpressure, ()),
    ("stalled-body", _stalled_body, ()),
    ("broken-body", _broken_body, ()),
    ("continue-streamed", _continue_streamed, ()),
    ("upgraded", _upgraded, ()),
    ("refusal-behind-a-slow-request", _refusal_behind_a_slow_request, ()),
    ("disconnect-cancels", _disconnect_cancels, ()),
    ("drain-stops-watches", _drain_stops_watches, ()),
    *[
        (f"unterminated-{case}", _unterminated_head, (case,))
        for case, _, _ in UNTERMINATED
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize(
    ("scenario", "args"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
def test_on_uvloop(scenario: Scenario, args: tuple[Any, ...], tls: bool) -> None:
    uvloop.run(asyncio.wait_for(scenario(*args, tls=tls), 30))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "args"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
async def test_over_tls_on_asyncio(scenario: Scenario, args: tuple[Any, ...]) -> None:
    await asyncio.wait_for(scenario(*args, tls=True), 30)
