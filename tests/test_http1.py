"""The HTTP/1.1 server of both front ends, on raw loopback sockets: what it accepts
and refuses; and hostile clients (many idle connections, slowloris, oversized
headers) against the real listeners that ``serve()`` starts, webhook and proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from proxy.http1 import Answer, Limits, Request, Route, Server
from proxy.kube import status_body
from proxy.log import REQUEST_ID
from tests.fakes.issuer import FakeIssuer
from tests.support.running_gate import (
    PODS,
    normal_request,
    running_gate,
)


class _Recorder:
    """A route that echoes what it was given, at once or after a wait."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = asyncio.Event()
        self.slow = False
        self.ids: list[str] = []

    def __call__(self, request: Request) -> Any:
        self.seen.append(request)
        self.ids.append(REQUEST_ID.get())
        body = json.dumps(
            {"method": request.method, "body": request.body.decode("latin-1")}
        ).encode()
        if not self.slow:
            return Answer(200, body)
        return self._later(body)

    async def _later(self, body: bytes) -> Answer:
        await self.release.wait()
        # Still the request's context after waiting.
        self.ids.append(REQUEST_ID.get())
        return Answer(200, body)


@asynccontextmanager
async def serving(
    limits: Limits | None = None,
    ssl_context: ssl.SSLContext | None = None,
    counted: list[tuple[str, int]] | None = None,
    timed: list[float] | None = None,
) -> AsyncIterator[tuple[Server, _Recorder, int]]:
    recorder = _Recorder()

    def count(name: str, code: int, seconds: float) -> None:
        if counted is not None:
            counted.append((name, code))
        if timed is not None:
            timed.append(seconds)

    server = Server(
        {"/authenticate": Route(recorder)},
        limits=limits or Limits(max_body_bytes=1024, head_timeout=5, body_timeout=5),
        error_body=status_body,
        on_answer=count,
    )
    port = await server.start("127.0.0.1", 0, ssl_context=ssl_context)
    try:
        yield server, recorder, port
    finally:
        await server.drain(1.0)


async def _open(
    port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=ssl_context,
            server_hostname="127.0.0.1" if ssl_context else None,
        ),
        5,
    )


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body (Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), 5
    )
    return status, headers, body


def _post(body: bytes = b'{"a":1}', *, extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST /authenticate HTTP/{version}\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    counted: list[tuple[str, int]] = []
    async with serving(counted=counted) as (_, recorder, port):
        reader, writer = await _open(port)
        for i in range(5):
            writer.write(_post(b'{"n":%d}' % i))
            status, headers, body = await _response(reader)
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert "date" in headers
            assert "connection" not in headers
            assert json.loads(body) == {"method": "POST", "body": f'{{"n":{i}}}'}
        writer.close()
        assert len(recorder.seen) == 5
        assert counted == [("authenticate", 200)] * 5


async def test_pipelined_requests_are_answered_in_order_even_when_one_waits() -> None:
    async with serving() as (_, recorder, port):
        reader, writer = await _open(port)
        recorder.slow = True
        writer.write(_post(b"first") + _post(b"second") + _post(b"third"))
        await asyncio.sleep(0.05)
        assert [r.body for r in recorder.seen] == [b"first"], "one at a time"
        recorder.release.set()
        bodies = [json.loads((await _response(reader))[2])["body"] for _ in range(3)]
        assert bodies == ["first", "second", "third"]
        writer.close()


async def test_each_answer_reports_the_time_since_its_request_was_whole() -> None:
    counted: list[tuple[str, int]] = []
    timed: list[float] = []
    async with serving(counted=counted, timed=timed) as (_, recorder, port):
        reader, writer = await _open(port)
        writer.write(_post(b"quick"))
        await _response(reader)
        recorder.slow = True
        writer.write(_post(b"waits"))
        await asyncio.sleep(0.2)
        recorder.release.set()
        await _response(reader)
        # Refused by the parser: no whole request, so no time of its own
        # (not the time since the previous request).
        writer.write(b"garbage\r\n\r\n")
        await _response(reader)
        writer.close()
    assert counted == [("authenticate", 200), ("authenticate", 200), ("other", 400)]
    quick, waited, refused = timed
    assert 0 < quick < 0.1
    assert 0.2 <= waited < 2
    assert refused == 0


async def test_request_id_is_the_clients_or_a_fresh_one_and_survives_a_wait() -> None:
    async with serving() as (_, recorder, port):
        reader, writer = await _open(port)
        writer.write(_post(extra="X-Request-Id: abc-123\r\n"))
        await _response(reader)
        writer.write(_post())
        await _response(reader)
        recorder.slow = True
        recorder.release.set()
        writer.write(_post(extra="X-Request-Id: waited\r\n"))
        await _response(reader)
        writer.close()
    assert recorder.ids[0] == "abc-123"
    assert len(recorder.ids[1]) == 16
    assert recorder.ids[1] != "abc-123"
    assert recorder.ids[2:] == ["waited", "waited"]
    assert REQUEST_ID.get() == "", "no id leaks out of a request"


#: (name, raw request, status). Each is refused and the connection closed; the
#: handler never runs; nothing of the request is quoted back.
MALFORMED: list[tuple[str, bytes, int]] = [
    ("garbage", b"\x16\x03\x01 hello there\r\n\r\n", 400),
    ("no-version", b"POST /authenticate\r\nHost: x\r\n\r\n", 400),
    ("http-2", b"POST /authenticate HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    ("absolute-form", b"POST http://x/authenticate HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("space-in-target", b"POST /auth enticate HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("missing-host", b"POST /authenticate HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400),
    ("two-hosts", b"POST /authenticate HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("space-before-colon", b"POST /authenticate HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("obs-fold", b"POST /authenticate HTTP/1.1\r\nHost: x\r\n X-Fold: y\r\n\r\n", 400),
    ("bare-lf", b"POST /authenticate HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
    (
        "nul-in-value",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
        400,
    ),
    (
        "conflicting-lengths",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Content-Length: 4\r\n\r\nabcd",
        400,
    ),
    (
        "signed-length",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        400,
    ),
    (
        "chunked",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        411,
    ),
    (
        "smuggling-cl-te",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        400,
    ),
    (
        "equal-lengths",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "length-list",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
        400,
    ),
    (
        "te-obfuscated",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
        400,
    ),
    ("lower-case-method", b"post /authenticate HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("unknown-method", b"FOO /authenticate HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (
        "body-over-the-limit",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
        413,
    ),
    (
        "unknown-expectation",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n",
        417,
    ),
    (
        "head-over-the-limit",
        b"POST /authenticate HTTP/1.1\r\nX-A: " + b"a" * 20_000,
        431,
    ),
    (
        "too-many-headers",
        b"POST /authenticate HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
        431,
    ),
]


@pytest.mark.parametrize(
    ("raw", "status"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_malformed_requests_are_refused_and_the_connection_closed(
    raw: bytes, status: int
) -> None:
    limits = Limits(max_body_bytes=1024, max_head_bytes=16 * 1024, max_headers=64)
    async with serving(limits) as (_, recorder, port):
        reader, writer = await _open(port)
        writer.write(raw)
        got, headers, body = await _response(reader)
        assert got == status
        assert headers["connection"] == "close"
        answer = json.loads(body)
        assert answer["kind"] == "Status"
        assert answer["code"] == status
        for marker in (b"hello", b"enticate", b"magic", b"Fold", b"abc"):
            assert marker not in body
        assert await _closed(reader)
        assert recorder.seen == []
        writer.close()


async def test_unknown_path_is_404_and_wrong_method_405_keeping_the_connection() -> (
    None
):
    counted: list[tuple[str, int]] = []
    async with serving(counted=counted) as (_, recorder, port):
        reader, writer = await _open(port)
        writer.write(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _response(reader))[0] == 404
        writer.write(b"GET /authenticate?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await _response(reader)
        assert (status, headers["allow"]) == (405, "POST")
        writer.write(_post())
        assert (await _response(reader))[0] == 200
        writer.close()
        assert len(recorder.seen) == 1
        assert counted == [("other", 404), ("authenticate", 405), ("authenticate", 200)]


async def test_http10_and_connection_close_end_the_connection_after_the_answer() -> (
    None
):
    async with serving() as (_, _recorder, port):
        for raw in (_post(version="1.0"), _post(extra="Connection: close\r\n")):
            reader, writer = await _open(port)
            writer.write(raw)
            status, headers, _ = await _response(reader)
            assert (status, headers["connection"]) == (200, "close")
            assert await _closed(reader)
            writer.close()


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    async with serving() as (_, recorder, port):
        reader, writer = await _open(port)
        head = _post(b"late body", extra="Expect: 100-continue\r\n")
        writer.write(head[: -len(b"late body")])
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"late body")
        status, _, body = await _response(reader)
        assert status == 200
        assert json.loads(body)["body"] == "late body"
        writer.close()
        assert len(recorder.seen) == 1


async def test_queued_output_keeps_its_order_across_pipelined_requests() -> None:
    """Answers are written at the end of a loop iteration: an interim 100
    for a later request must still follow the answer to an earlier one, and
    an answer that closes must go out whole before the connection ends.
    """
    async with serving() as (_, recorder, port):
        reader, writer = await _open(port)
        second = _post(b"second", extra="Expect: 100-continue\r\n")
        writer.write(_post(b"first") + second[: -len(b"second")])
        status, _, body = await _response(reader)
        assert (status, json.loads(body)["body"]) == (200, "first")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"second" + _post(b"third", extra="Connection: close\r\n"))
        for expected in ("second", "third"):
            status, headers, body = await _response(reader)
            assert (status, json.loads(body)["body"]) == (200, expected)
        assert headers.get("connection") == "close"
        assert await _closed(reader)
        assert len(recorder.seen) == 3
        writer.close()


async def test_body_split_across_packets_is_reassembled() -> None:
    async with serving() as (_, _recorder, port):
        reader, writer = await _open(port)
        raw = _post(b'{"token":"' + b"t" * 600 + b'"}')
        for i in range(0, len(raw), 7):
            writer.write(raw[i : i + 7])
            await writer.drain()
        status, _, body = await _response(reader)
        assert status == 200
        assert json.loads(body)["body"].startswith('{"token":"ttt')
        writer.close()


@pytest.mark.parametrize(
    ("sent", "expect_408"),
    [
        (b"", False),
        (b"POST /authent", False),
        (b"POST /authenticate HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n", False),
        (
            b"POST /authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{",
            True,
        ),
    ],
    ids=["silent", "partial-line", "header-trickle", "slow-body"],
)
async def test_slow_clients_are_cut_off(sent: bytes, expect_408: bool) -> None:
    limits = Limits(max_body_bytes=1024, head_timeout=0.3, body_timeout=0.3)
    async with serving(limits) as (_, recorder, port):
        loop = asyncio.get_running_loop()
        reader, writer = await _open(port)
        started = loop.time()
        writer.write(sent)
        if expect_408:
            status, headers, _ = await _response(reader)
            assert (status, headers["connection"]) == (408, "close")
        assert await _closed(reader)
        assert loop.time() - started < 3.0
        assert recorder.seen == []
        writer.close()


@pytest.mark.slow
async def test_an_idle_keep_alive_connection_is_closed_after_the_head_timeout() -> None:
    limits = Limits(max_body_bytes=1024, head_timeout=0.3, body_timeout=5)
    async with serving(limits) as (server, _recorder, port):
        reader, writer = await _open(port)
        writer.write(_post())
        assert (await _response(reader))[0] == 200
        assert len(server.connections) == 1
        assert await _closed(reader)
        assert not server.connections
        writer.close()


async def test_drain_finishes_in_flight_answers_and_closes_idle_connections() -> None:
    async with serving() as (server, recorder, port):
        idle_reader, idle_writer = await _open(port)
        busy_reader, busy_writer = await _open(port)
        recorder.slow = True
        busy_writer.write(_post(b"in flight"))
        await asyncio.sleep(0.05)
        drained = asyncio.create_task(server.drain(5.0))
        assert await _closed(idle_reader), "an idle connection closes at once"
        recorder.release.set()
        status, headers, body = await _response(busy_reader)
        assert (status, headers["connection"]) == (200, "close")
        assert json.loads(body)["body"] == "in flight"
        await asyncio.wait_for(drained, 5)
        with pytest.raises(OSError):
            await _open(port)
        idle_writer.close()
        busy_writer.close()


@pytest.mark.slow
async def test_drain_cancels_what_outlives_the_grace_period() -> None:
    async with serving() as (server, recorder, port):
        reader, writer = await _open(port)
        recorder.slow = True
        writer.write(_post())
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.drain(0.2), 5)
        assert await _closed(reader)
        assert not server.inflight
        writer.close()


@pytest.mark.slow
async def test_a_client_that_does_not_read_stops_being_read() -> None:
    """Pipelined requests from a client that never reads its answers stay bounded."""
    limits = Limits(max_body_bytes=1024, head_timeout=5, body_timeout=5)
    async with serving(limits) as (server, recorder, port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        request = _post(b"x" * 1000)
        # Up to ~22 MB of requests whose answers are never read: more than the
        # kernel's loopback buffers hold, so drain blocks once the server has
        # stopped reading.
        for _ in range(20_000):
            writer.write(request)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break
        else:
            pytest.fail("the server kept reading a client that never reads")
        await asyncio.sleep(0.2)
        (conn,) = server.connections
        assert conn._paused_writing, "the answers back up: the client reads nothing"
        assert conn._paused_reading, "so the server stops reading"
        assert len(recorder.seen) < 20_000
        # The limit, plus what one read delivered before the pause took effect.
        assert (
            conn.buffered()
            <= limits.max_head_bytes + limits.max_body_bytes + 256 * 1024
        )
        writer.transport.abort()


async def test_tls_listener_serves_and_the_handler_error_is_a_500(
    tmp_path: Any,
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with serving(ssl_context=server_ctx) as (server, _recorder, port):
        reader, writer = await _open(port, client_ctx)
        writer.write(_post())
        assert (await _response(reader))[0] == 200

        def broken(_: Request) -> Answer:
            raise RuntimeError("a bug")

        server.routes["/authenticate"] = Route(broken)
        writer.write(_post())
        status, _, body = await _response(reader)
        assert status == 500
        assert json.loads(body)["message"] == "internal error"
        writer.close()


#: The tests above again, on the loop the service runs on: uvloop's transports
#: (its TLS one above all) are not asyncio's.
ON_UVLOOP = [
    test_keep_alive_serves_many_requests_on_one_connection,
    test_pipelined_requests_are_answered_in_order_even_when_one_waits,
    test_request_id_is_the_clients_or_a_fresh_one_and_survives_a_wait,
    test_unknown_path_is_404_and_wrong_method_405_keeping_the_connection,
    test_expect_100_continue_is_answered_before_the_body,
    test_queued_output_keeps_its_order_across_pipelined_requests,
    test_an_idle_keep_alive_connection_is_closed_after_the_head_timeout,
    test_drain_finishes_in_flight_answers_and_closes_idle_connections,
    test_a_client_that_does_not_read_stops_being_read,
]


@pytest.mark.slow
@pytest.mark.parametrize("test", ON_UVLOOP, ids=[t.__name__[5:] for t in ON_UVLOOP])
def test_on_uvloop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 30))


def test_tls_on_uvloop() -> None:
    uvloop.run(
        asyncio.wait_for(
            test_tls_listener_serves_and_the_handler_error_is_a_500(None), 30
        )
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def closed_without_answer(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (bounded: 5 s)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, ssl.SSLError):
        return b""


# --------------------------------------------------------------------------
# Many connections, slow clients


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["webhook", "proxy"])
async def test_hundreds_of_idle_tls_connections_do_not_starve_a_request(
    issuer: FakeIssuer, tmp_path: Path, mode: Any
) -> None:
    async with running_gate(
        tmp_path, mode, issuer, serve_settings={"idle_timeout": 30.0}
    ) as gate:
        opened = await asyncio.wait_for(
            asyncio.gather(*(gate.open_tls() for _ in range(300))), 30
        )
        try:
            await normal_request(gate)
            # Still held open by the server (no request yet, deadline far away).
            reader, _ = opened[0]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.2)
        finally:
            for _, writer in opened:
                writer.transport.abort()


SLOW_CLIENTS = [
    ("tcp-without-tls-handshake", False, []),
    ("tls-without-request", True, []),
    ("partial-request-line", True, [b"GET /api/v1/na"]),
    (
        "header-trickle",
        True,
        [b"GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n"]
        + [b"X-Slow: 1\r\n"] * 25,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tls", "chunks"),
    [c[1:] for c in SLOW_CLIENTS],
    ids=[c[0] for c in SLOW_CLIENTS],
)
async def test_slowloris_on_the_proxy_is_cut_off(
    issuer: FakeIssuer, tmp_path: Path, tls: bool, chunks: list[bytes]
) -> None:
    async with running_gate(
        tmp_path, "proxy", issuer, serve_settings={"idle_timeout": 0.5}
    ) as gate:
        assert gate.fake is not None
        host, port = gate.host_port
        if tls:
            reader, writer = await gate.open_tls()
        else:
            reader, writer = await asyncio.open_connection(host, port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for chunk in chunks:
            if reader.at_eof():
                break
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(chunk)
                await writer.drain()
            await asyncio.sleep(0.1)
        assert await closed_without_answer(reader) == b""
        assert loop.time() - started < 4.0, "closed by the first-request deadline"
        writer.transport.abort()
        assert gate.fake.requests == []
        await normal_request(gate)


# --------------------------------------------------------------------------
# Oversized headers


def _oversized_jwt(marker: str) -> str:
    header = _b64(json.dumps({"alg": "RS256", "kid": marker}).encode())
    return f"{header}.{_b64(b'x' * 30_000)}.{_b64(b'sig')}"


#: (name, headers made from a unique marker, status). A valid bearer token is
#: added unless the case brings its own ``Authorization``. Every one is the
#: listener's 431 (RFC 6585): a field over ``max_field_bytes`` (20 KiB), more
#: fields than it takes, or a head over its total.
OVERSIZED: list[tuple[str, Any, int]] = [
    ("one-huge-value", lambda m: [("X-Big", m + "v" * 30_000)], 431),
    ("one-huge-name", lambda m: [("X-" + m + "n" * 30_000, "v")], 431),
    ("too-many-headers", lambda m: [(f"X-{m}-{i}", "v") for i in range(5000)], 431),
    (
        "many-large-headers-over-the-total",
        lambda m: [(f"X-{m}-{i}", "v" * 7000) for i in range(40)],
        431,
    ),
    (
        "authorization-over-the-field-limit",
        lambda m: [("Authorization", f"Bearer {_oversized_jwt(m)}")],
        431,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "code"),
    [c[1:] for c in OVERSIZED],
    ids=[c[0] for c in OVERSIZED],
)
async def test_oversized_headers_are_refused_before_anything_goes_upstream(
    issuer: FakeIssuer,
    tmp_path: Path,
    make: Any,
    code: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "m" + secrets.token_hex(12)
    async with running_gate(tmp_path, "proxy", issuer) as gate:
        assert gate.fake is not None
        headers = make(marker)
        if all(name != "Authorization" for name, _ in headers):
            headers.append(("Authorization", f"Bearer {gate.token()}"))
        async with gate.client.get(gate.url + PODS, headers=headers) as r:
            assert r.status == code
            body = await r.text()
            assert marker not in body, "the answer quotes the refused header"
            assert (await r.json())["kind"] == "Status"
        assert gate.fake.requests == []
        await normal_request(gate)
    trace = "\n".join(
        f"{rec.getMessage()} {vars(rec)} {rec.exc_text or ''}" for rec in caplog.records
    )
    assert marker not in trace, "the refused header's bytes reached a log line"
    if code == 431:
        refused = [
            r
            for r in caplog.records
            if r.getMessage() == "request refused by the http parser"
        ]
        assert refused
        assert all(r.levelno == logging.INFO for r in refused)
        assert all(r.exc_info is None for r in refused)
