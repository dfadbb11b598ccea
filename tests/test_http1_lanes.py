"""The HTTP/1.1 server as a fast lane: handing connections to a fallback,
streamed answers and relayed answers, on raw loopback sockets.

The fallback is either a recording protocol (which checks it was given exactly
the request's bytes, from its first byte) or aiohttp's own low-level server,
which is what the proxy's front end hands connections to.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, cast

import aiohttp
import pytest
import trustme
import uvloop
from aiohttp import web

from proxy.http1 import Answer, Limits, Request, Route, Server
from proxy.kube import status_body

#: Small bounds, so that each way past them is cheap to send.
LIMITS = Limits(
    max_head_bytes=1024,
    max_headers=16,
    max_body_bytes=256,
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


# -- the lean handler and the fallbacks -------------------------------------


class _Lean:
    """A lean-lane route that records its requests and names itself in the answer."""

    def __init__(self, delay: float = 0.0) -> None:
        self.seen: list[Request] = []
        self.delay = delay

    def __call__(self, request: Request) -> Answer | Coroutine[Any, Any, Answer]:
        self.seen.append(request)
        body = b"lean %s %s %s" % (
            request.method.encode(),
            request.target.encode(),
            request.body,
        )
        answer = Answer(200, body, content_type="text/plain")
        if not self.delay:
            return answer
        return self._later(answer)

    async def _later(self, answer: Answer) -> Answer:
        await asyncio.sleep(self.delay)
        return answer


class _Recording(asyncio.Protocol):
    """A fallback that records every event and byte, and answers the requests
    it expects, in turn, once each has fully arrived.
    """

    def __init__(self, expected: list[bytes]) -> None:
        self.expected = expected
        self.events: list[str] = []
        self.data = bytearray()
        self.answered = 0
        self._consumed = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        self.data += data
        while self.answered < len(self.expected):
            end = self._consumed + len(self.expected[self.answered])
            if len(self.data) < end or self.transport is None:
                return
            self._consumed = end
            self.answered += 1
            body = b"fallback %d" % self.answered
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


class _Recordings:
    """The factory of recording fallbacks, keeping each one made."""

    def __init__(self, expected: list[bytes]) -> None:
        self.expected = expected
        self.made: list[_Recording] = []

    def __call__(self) -> asyncio.Protocol:
        protocol = _Recording(self.expected)
        self.made.append(protocol)
        return protocol

    def abort(self) -> None:
        """Drop every connection handed over (a failed test may leave one open)."""
        for protocol in self.made:
            if protocol.transport is not None:
                protocol.transport.abort()


class _Aiohttp:
    """aiohttp's low-level server as the fallback, as the proxy's front end uses it.

    Its handler answers with what aiohttp parsed, so a test can tell that the
    request reached it whole and from its first byte.
    """

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.server = web.Server(self._handle)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        record = {
            "by": "aiohttp",
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "body": body.decode("utf-8", "replace"),
            "headers": [[k, v] for k, v in request.headers.items()],
        }
        self.seen.append(record)
        return web.json_response(record)

    def __call__(self) -> asyncio.Protocol:
        return self.server()


@asynccontextmanager
async def aiohttp_fallback() -> AsyncIterator[_Aiohttp]:
    fallback = _Aiohttp()
    try:
        yield fallback
    finally:
        await fallback.server.shutdown(1.0)


class _AnyDate(str):
    """Equal to any ``Date`` value an answer carries."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.endswith(" GMT")

    def __hash__(self) -> int:
        return 0


ANY_DATE = _AnyDate()


def _admit(method: str, target: str, headers: Mapping[str, str]) -> bool:
    """Decline watches and upgrades, as the proxy does."""
    return not target.startswith("/watch") and "upgrade" not in headers


@asynccontextmanager
async def serving(
    routes: Mapping[str, Route] | None = None,
    *,
    default: Route | None = None,
    fallback: Callable[[], asyncio.Protocol] | None = None,
    admit: Callable[[str, str, Mapping[str, str]], bool] | None = None,
    tls: bool = False,
    limits: Limits = LIMITS,
) -> AsyncIterator[tuple[Server, int]]:
    server = Server(
        routes or {},
        default=default,
        limits=limits,
        error_body=status_body,
        fallback=fallback,
        admit=admit,
    )
    port = await server.start("127.0.0.1", 0, ssl_context=_tls()[0] if tls else None)
    try:
        yield server, port
    finally:
        await server.drain(1.0)
        if isinstance(fallback, _Recordings):
            fallback.abort()


# -- the client side ---------------------------------------------------------


@asynccontextmanager
async def _connection(
    port: int, tls: bool = False, *, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection, closed however the test ends.

    ``rcvbuf``: the client socket's receive buffer, set before connecting (a
    small one makes a client that does not read push back at once).
    """
    sock = None
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        except BaseException:
            sock.close()
            raise
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            None if sock else "127.0.0.1",
            None if sock else port,
            sock=sock,
            ssl=_tls()[1] if tls else None,
            server_hostname="127.0.0.1" if tls else None,
        ),
        5,
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def _head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    """A response's status line and its header fields, in order and as sent."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
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


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


# -- handing over ------------------------------------------------------------

#: (name, raw request, method, path, body): each is one the lean lane must not
#: serve itself; each goes, whole and from its first byte, to the fallback.
HANDOFFS: list[tuple[str, bytes, str, str, bytes]] = [
    (
        "chunked-body",
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "POST",
        "/chunked",
        b"hello world",
    ),
    (
        "oversized-head",
        b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n",
        "GET",
        "/big",
        b"",
    ),
    (
        "too-many-headers",
        b"GET /many HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(20))
        + b"\r\n",
        "GET",
        "/many",
        b"",
    ),
    (
        "body-over-the-limit",
        b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: 600\r\n\r\n" + b"L" * 600,
        "POST",
        "/large",
        b"L" * 600,
    ),
    (
        "non-ascii-value",
        "GET /accent HTTP/1.1\r\nHost: x\r\nX-Name: café\r\n\r\n".encode(),
        "GET",
        "/accent",
        b"",
    ),
    (
        "admit-declines-path",
        b"GET /watch/pods?watch=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET",
        "/watch/pods",
        b"",
    ),
    (
        "admit-declines-upgrade",
        b"GET /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: SPDY/3.1\r\n\r\n",
        "GET",
        "/exec",
        b"",
    ),
    (
        "continue-over-the-limit",
        b"POST /continue HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 300\r\n\r\n" + b"C" * 300,
        "POST",
        "/continue",
        b"C" * 300,
    ),
    (
        "non-ascii-target",
        "GET /café HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "GET",
        "/café",
        b"",
    ),
]
HANDOFF_IDS = [h[0] for h in HANDOFFS]


async def _send(writer: asyncio.StreamWriter, raw: bytes, trickle: bool) -> None:
    if not trickle:
        writer.write(raw)
        return
    for i in range(0, len(raw), 97):
        writer.write(raw[i : i + 97])
        await writer.drain()
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("trickle", [False, True], ids=["one-write", "trickled"])
@pytest.mark.parametrize("raw", [h[1] for h in HANDOFFS], ids=HANDOFF_IDS)
async def test_a_request_the_lane_would_refuse_goes_whole_to_the_fallback(
    raw: bytes, trickle: bool
) -> None:
    lean = _Lean()
    fallbacks = _Recordings([raw])
    async with (
        serving(
            default=Route(lean, methods=None), fallback=fallbacks, admit=_admit
        ) as (server, port),
        _connection(port) as (reader, writer),
    ):
        await _send(writer, raw, trickle)
        status, _, body = await _response(reader)
        assert (status, body) == (200, b"fallback 1")
        (fallback,) = fallbacks.made
        assert bytes(fallback.data) == raw, "exactly the request, from its first byte"
        assert fallback.events[0] == "made"
        assert server.handed_off == 1
        assert not server.connections, "the lane lets go of the connection"
        assert lean.seen == []


#: Requests that are wrong, not merely beyond the lane's limits: the lane
#: refuses them itself and closes; a second parser never gets to read them.
REFUSED_BY_THE_LANE: list[tuple[str, bytes, int]] = [
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
]


@pytest.mark.parametrize(
    ("raw", "status"),
    [r[1:] for r in REFUSED_BY_THE_LANE],
    ids=[r[0] for r in REFUSED_BY_THE_LANE],
)
async def test_a_wrong_request_is_refused_by_the_lane_never_handed_on(
    raw: bytes, status: int
) -> None:
    lean = _Lean()
    fallbacks = _Recordings([raw])
    async with (
        serving(
            default=Route(lean, methods=None), fallback=fallbacks, admit=_admit
        ) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(raw + _get("/after"))
        got, headers, _ = await _response(reader)
        assert got == status
        assert headers.get("connection") == "close"
        assert await _until_closed(reader) == b"", "nothing after the refusal"
        assert server.handed_off == 0
        assert fallbacks.made == []
        assert lean.seen == []


async def _handoff_to_aiohttp(case: str, tls: bool = False) -> None:
    (_, raw, method, path, sent) = HANDOFFS[HANDOFF_IDS.index(case)]
    lean = _Lean()
    async with (
        aiohttp_fallback() as fallback,
        serving(
            default=Route(lean, methods=None),
            fallback=fallback,
            admit=_admit,
            tls=tls,
        ) as (server, port),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(raw)
        status, _, body = await _response(reader)
        assert server.handed_off == 1
        if case == "non-ascii-target":
            # aiohttp's to refuse (RFC 9112 §3.2 allows no such target).
            assert status == 400
            return
        assert status == 200
        answer = json.loads(body)
        assert (answer["method"], answer["path"], answer["body"]) == (
            method,
            path,
            sent.decode(),
        )
        if case == "non-ascii-value":
            assert ["X-Name", "café"] in answer["headers"]
        assert server.handed_off == 1
        assert lean.seen == []
        # The connection is aiohttp's now: it serves the next request too.
        writer.write(_get("/after"))
        status, _, body = await _response(reader)
        assert (status, json.loads(body)["path"]) == (200, "/after")
        assert lean.seen == []


@pytest.mark.parametrize("case", HANDOFF_IDS)
async def test_aiohttp_as_the_fallback_serves_each_handed_off_request(
    case: str,
) -> None:
    await _handoff_to_aiohttp(case)


async def _pipelined_handoff(kind: str, tls: bool = False) -> None:
    """A lean request, a declined one and another, in one write."""
    lean = _Lean(delay=0.05)  # so a hasty handover would answer out of order
    first = _get("/lean")
    declined = _get("/watch/pods", "X-Order: 2\r\n")
    third = _get("/lean/again")
    recordings = _Recordings([declined, third])
    async with aiohttp_fallback() as aio:
        fallback: Callable[[], asyncio.Protocol] = (
            recordings if kind == "recording" else aio
        )
        async with (
            serving(
                default=Route(lean, methods=None),
                fallback=fallback,
                admit=_admit,
                tls=tls,
            ) as (server, port),
            _connection(port, tls) as (reader, writer),
        ):
            writer.write(first + declined + third)
            answers = [await _response(reader) for _ in range(3)]
            assert [a[0] for a in answers] == [200, 200, 200]
            assert answers[0][2] == b"lean GET /lean "
            if kind == "recording":
                assert [a[2] for a in answers[1:]] == [b"fallback 1", b"fallback 2"]
                (recording,) = recordings.made
                assert bytes(recording.data) == declined + third
            else:
                paths = [json.loads(a[2])["path"] for a in answers[1:]]
                assert paths == ["/watch/pods", "/lean/again"]
                # Still aiohttp's, for good: the lane never reads it again.
                writer.write(_get("/lean/third"))
                status, _, body = await _response(reader)
                assert (status, json.loads(body)["path"]) == (200, "/lean/third")
            assert [r.target for r in lean.seen] == ["/lean"]
            assert server.handed_off == 1


@pytest.mark.parametrize("kind", ["recording", "aiohttp"])
async def test_pipelined_requests_before_a_handover_are_answered_first(
    kind: str,
) -> None:
    await _pipelined_handoff(kind)


async def test_the_lane_serves_what_admit_accepts_and_sees_its_arguments() -> None:
    calls: list[tuple[str, str, dict[str, str]]] = []

    def admit(method: str, target: str, headers: Mapping[str, str]) -> bool:
        calls.append((method, target, dict(headers)))
        return _admit(method, target, headers)

    lean = _Lean()
    declined = _get("/watch/later", "X-Pad: " + "p" * 300 + "\r\n")
    fallbacks = _Recordings([declined])
    async with (
        serving(default=Route(lean, methods=None), fallback=fallbacks, admit=admit) as (
            server,
            port,
        ),
        _connection(port) as (reader, writer),
    ):
        for i in range(3):
            writer.write(
                b"PATCH /api/v1/x?i=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                b"\r\n%d" % (i, i)
            )
            status, _, body = await _response(reader)
            assert (status, body) == (200, b"lean PATCH /api/v1/x?i=%d %d" % (i, i))
        assert calls == [
            ("PATCH", f"/api/v1/x?i={i}", {"host": "x", "content-length": "1"})
            for i in range(3)
        ]
        assert server.handed_off == 0
        assert fallbacks.made == []
        # Later on the same keep-alive connection, one admit declines,
        # arriving in pieces.
        await _send(writer, declined, trickle=True)
        assert (await _response(reader))[2] == b"fallback 1"
        assert calls[-1][:2] == ("GET", "/watch/later")
        assert bytes(fallbacks.made[0].data) == declined
        assert server.handed_off == 1
        assert len(lean.seen) == 3


async def test_a_handover_waits_for_a_streamed_answer_to_finish() -> None:
    async def stream_slowly(request: Request) -> None:
        request.start_stream(200, [])
        for piece in (b"one ", b"two ", b"three"):
            await asyncio.sleep(0.02)
            await request.send(piece)
        request.end_stream()

    declined = _get("/watch/pods")
    fallbacks = _Recordings([declined])
    async with (
        serving(
            default=Route(stream_slowly, methods=None),
            fallback=fallbacks,
            admit=_admit,
        ) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get("/stream") + declined)
        assert await _response(reader) == (
            200,
            {"date": ANY_DATE, "transfer-encoding": "chunked"},
            b"one two three",
        )
        assert (await _response(reader))[2] == b"fallback 1"
        assert bytes(fallbacks.made[0].data) == declined
        assert server.handed_off == 1


async def _handover_resumes_reading(tls: bool = False) -> None:
    """Reading paused behind a busy request resumes for the fallback."""
    lean = _Lean(delay=0.2)
    declined = (
        b"POST /watch/big HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n"
        + b"B" * 4000
    )
    fallbacks = _Recordings([declined])
    async with (
        serving(
            default=Route(lean, methods=None),
            fallback=fallbacks,
            admit=_admit,
            tls=tls,
        ) as (server, port),
        _connection(port, tls) as (reader, writer),
    ):
        # More than a head and a body's worth waits behind the busy request,
        # so the lane stops reading; the rest comes while it is stopped.
        writer.write(_get("/busy") + declined[:1000])
        await asyncio.sleep(0.03)
        writer.write(declined[1000:3000])
        await asyncio.sleep(0.03)
        (conn,) = server.connections
        assert conn._paused_reading
        writer.write(declined[3000:])
        assert (await _response(reader))[2] == b"lean GET /busy "
        assert (await _response(reader))[2] == b"fallback 1"
        assert bytes(fallbacks.made[0].data) == declined


async def test_a_handover_resumes_reading_paused_behind_a_busy_request() -> None:
    await _handover_resumes_reading()


async def test_the_lane_forgets_a_handed_off_connection() -> None:
    """Its idle deadline and its drain are the fallback's business now."""
    declined = _get("/watch/pods")
    fallbacks = _Recordings([declined])
    limits = Limits(max_head_bytes=1024, head_timeout=0.2, body_timeout=0.2)
    async with (
        serving(
            default=Route(_Lean(), methods=None),
            fallback=fallbacks,
            admit=_admit,
            limits=limits,
        ) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(declined)
        assert (await _response(reader))[2] == b"fallback 1"
        await asyncio.sleep(0.5)  # past the lane's head_timeout, swept twice over
        await server.drain(0.1)
        (fallback,) = fallbacks.made
        assert "lost" not in fallback.events
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.1)


async def test_without_a_fallback_the_same_requests_are_still_refused() -> None:
    lean = _Lean()
    async with serving(default=Route(lean, methods=None)) as (server, port):
        for _, raw, *_ in HANDOFFS:
            if b"watch" in raw or b"Upgrade" in raw or "é".encode() in raw:
                continue  # only the fallback's admit declines these
            async with _connection(port) as (reader, writer):
                writer.write(raw)
                status, headers, _ = await _response(reader)
                assert 400 <= status < 500
                assert headers["connection"] == "close"
        assert server.handed_off == 0
        assert lean.seen == []


# -- the request's extra fields and routes -------------------------------------


@pytest.mark.parametrize(
    ("with_fallback", "version"),
    [(True, "1.1"), (False, "1.1"), (True, "1.0")],
    ids=["fallback-http11", "no-fallback-http11", "fallback-http10"],
)
async def test_fields_keep_case_order_and_repeats_and_peer_needs_a_fallback(
    with_fallback: bool, version: str
) -> None:
    lean = _Lean()
    async with (
        serving(
            default=Route(lean, methods=None),
            fallback=_Recordings([]) if with_fallback else None,
        ) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(
            f"GET /f HTTP/{version}\r\nX-Dup: 1\r\nhost: x\r\nX-Dup:  2 \r\n"
            "CamelCase-Name: v\r\n\r\n".encode()
        )
        assert (await _response(reader))[0] == 200
        (request,) = lean.seen
        assert request.fields == [
            ("X-Dup", "1"),
            ("host", "x"),
            ("X-Dup", "2"),
            ("CamelCase-Name", "v"),
        ]
        assert request.headers["x-dup"] == "1, 2"
        assert request.http11 is (version == "1.1")
        assert request.peer == ("127.0.0.1" if with_fallback else None)


async def test_the_default_route_takes_every_path_and_method_routes_come_first() -> (
    None
):
    exact = _Lean()
    catch_all = _Lean()
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
        ]:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body = await _response(reader)
            assert (status, body) == (200, f"lean {method} {target} ".encode())
        writer.write(b"POST /exact HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _response(reader))[0] == 200
        writer.write(b"GET /exact HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await _response(reader)
        assert (status, headers["allow"]) == (405, "POST")
        assert [r.method for r in exact.seen] == ["POST"]
        assert len(catch_all.seen) == 4


async def test_a_default_route_with_methods_refuses_the_others() -> None:
    async with (
        serving(default=Route(_Lean(), methods=frozenset({"GET"}))) as (_, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(b"PUT /x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await _response(reader)
        assert (status, headers["allow"]) == (405, "GET")


# -- streamed answers ----------------------------------------------------------

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


PIECE = 1024 * 1024
#: Far more than the kernel's loopback buffers and the transport's hold.
COUNT = 32


async def _backpressure(tls: bool = False) -> None:
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


async def test_a_stream_waits_for_a_client_that_does_not_read() -> None:
    await _backpressure()


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
        assert not server.connections


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
        assert not server.connections


async def test_a_handler_that_neither_answers_nor_streams_cuts_the_connection() -> None:
    async def silent(request: Request) -> None:
        await asyncio.sleep(0)

    async with (
        serving(default=Route(silent, methods=None)) as (server, port),
        _connection(port) as (reader, writer),
    ):
        writer.write(_get("/silent") + _get("/next"))
        assert await _until_closed(reader) == b""
        assert not server.connections


async def _client_leaves_mid_stream(tls: bool = False) -> None:
    errors: list[BaseException] = []
    gone = asyncio.Event()

    async def endless(request: Request) -> None:
        request.start_stream(200, [])
        try:
            for _ in range(100_000):
                await request.send(b"z" * 65536)
        except ConnectionResetError as err:
            errors.append(err)
            gone.set()

    async with (
        serving(default=Route(endless, methods=None), tls=tls) as (_, port),
        _connection(port, tls) as (reader, writer),
    ):
        writer.write(_get("/endless"))
        await _head(reader)
        assert (await asyncio.wait_for(reader.readexactly(10), 5))[:5] == b"10000"
        writer.transport.abort()
        await asyncio.wait_for(gone.wait(), 5)
        assert len(errors) == 1


async def test_send_raises_once_the_client_has_gone() -> None:
    await _client_leaves_mid_stream()


# -- relayed answers -----------------------------------------------------------

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
            {"/relay": Route(relay, methods=None)}, default=Route(_Lean(), methods=None)
        ) as (_, port),
        _connection(port) as (reader, writer),
    ):
        # A lean request pipelined behind: a stray body byte would spoil it.
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
        assert (status, body) == (200, b"lean GET /after ")


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


# -- on uvloop, and over TLS ---------------------------------------------------

#: The scenarios above again on the loop the service runs on (uvloop's
#: transports, its TLS one above all, are not asyncio's: ``set_protocol`` must
#: hand over a TLS connection), plain and over TLS.
ON_UVLOOP: list[tuple[str, Scenario, tuple[Any, ...]]] = [
    *[
        (f"handoff-to-aiohttp-{case}", _handoff_to_aiohttp, (case,))
        for case in HANDOFF_IDS
    ],
    ("pipelined-handoff-recording", _pipelined_handoff, ("recording",)),
    ("pipelined-handoff-aiohttp", _pipelined_handoff, ("aiohttp",)),
    ("chunked-to-aiohttp-client", _chunked_to_aiohttp_client, ()),
    ("backpressure", _backpressure, ()),
    ("client-leaves-mid-stream", _client_leaves_mid_stream, ()),
    ("handover-resumes-reading", _handover_resumes_reading, ()),
]


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize(
    ("scenario", "args"), [s[1:] for s in ON_UVLOOP], ids=[s[0] for s in ON_UVLOOP]
)
def test_on_uvloop(scenario: Scenario, args: tuple[Any, ...], tls: bool) -> None:
    uvloop.run(asyncio.wait_for(scenario(*args, tls=tls), 30))


@pytest.mark.parametrize(
    ("scenario", "args"), [s[1:] for s in ON_UVLOOP], ids=[s[0] for s in ON_UVLOOP]
)
async def test_over_tls_on_asyncio(scenario: Scenario, args: tuple[Any, ...]) -> None:
    await asyncio.wait_for(scenario(*args, tls=True), 30)
