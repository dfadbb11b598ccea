"""A small, strict HTTP/1.1 server: the webhook's, and the proxy's fast lane.

Why not aiohttp? The webhook's HTTP surface is tiny and fixed: kube-apiserver
(Go's net/http) POSTs a JSON ``TokenReview`` of a few KiB with a
``Content-Length`` to one path, on keep-alive TLS connections, and reads back a
JSON answer. Everything else a general framework does per request (a task per
request, request and response objects, header multidicts, a router, middleware
frames) cost about twice as much CPU as the review itself on a cached token:
measured under the same load, a bare aiohttp echo of a review spends ~45 µs of
CPU per request, the same echo on this protocol ~18 µs. The webhook sits in
front of every API request of a cluster, so it gets this purpose-built path.

The proxy needs all of HTTP (chunked uploads, upgrades, watches), which stays
aiohttp's job; but most of what kubectl sends is a short request with a small
body or none. So the proxy's listener is this server with a *fallback*: it
serves what its ``admit`` takes and hands every other connection, at the first
byte of the first request it does not take, to aiohttp's connection handler
for good (see ``Server``). Answers may be streamed (``Request.start_stream``)
for the API server's large or chunked bodies, with backpressure.

What it accepts, and nothing else (anything else is refused with a Kubernetes
``Status`` and, where the stream can no longer be trusted, a closed connection):

- origin-form request targets, ``HTTP/1.1`` (with ``Host``) or ``HTTP/1.0``;
- header names that are RFC 9110 tokens, values without control characters, no
  obsolete line folding, no bare ``CR`` or ``LF``; the whole head within
  ``max_head_bytes`` and ``max_headers`` (431 beyond);
- bodies delimited by one ``Content-Length``; ``proxy.framing`` refuses with
  400 any ambiguity (a second length, even equal; a length with a
  ``Transfer-Encoding``; any coding but ``chunked``) and any method the
  Kubernetes API does not serve; a ``chunked`` body is refused with 411
  (kube-apiserver always sends a length), so there is no chunked decoder to
  get wrong. With a fallback, a malformed or ambiguous request is refused
  here too, never handed on: a second parser must not get to read it its
  own way;
- no body in an answer to ``HEAD`` (refusals included), nor with 1xx, 204 or
  304;
- ``Expect: 100-continue`` is honoured; other expectations get 417.

Bounds, all enforced by one sweeper per server rather than a timer per request:
a connection must complete a request head within ``head_timeout`` of opening
or of its previous answer (slowloris, and the keep-alive idle limit), and a
body within ``body_timeout`` of its head (408). Requests pipelined on one
connection are answered in order, one at a time; reading pauses while a request
is being handled and more than one request's worth of bytes is waiting, or
while the client does not read its answers.

Handlers return an ``Answer`` at once (a cached verdict needs no waiting, and
then no task is created) or an awaitable that the connection runs as a task.
Nothing a client sent is ever quoted back or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import re
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast

from proxy import framing
from proxy.log import REQUEST_ID, new_request_id

__all__ = ["Admit", "Answer", "Handler", "Limits", "Request", "Route", "Server"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The bounds of one listener (defaults suit a webhook)."""

    #: Request line and headers together; kube-apiserver sends well under 1 KiB.
    max_head_bytes: int = 16 * 1024
    max_headers: int = 64
    max_body_bytes: int = 1024 * 1024
    #: A request head must be complete within this long of the connection
    #: opening or of the previous answer; an idle keep-alive connection is
    #: closed after it too.
    head_timeout: float = 75.0
    #: A body must be complete within this long of its head (then 408).
    body_timeout: float = 10.0


class Request:
    """One parsed request.

    ``headers`` has lower-case names with repeated fields joined (RFC 9110
    §5.3); ``fields`` keeps every field as sent, in order and in its case, for
    a handler that forwards them (the proxy). ``path`` is the target's path,
    undecoded.
    """

    __slots__ = (
        "_conn",
        "body",
        "fields",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "path",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        *,
        fields: list[tuple[str, str]] | None = None,
        http11: bool = True,
        conn: _Connection | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.partition("?")[0]
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.fields = fields if fields is not None else []
        self.http11 = http11
        self._conn = conn

    @property
    def peer(self) -> str | None:
        """The client's address (no port), ``None`` when unknown."""
        conn = self._conn
        return conn.peer if conn is not None else None

    def start_stream(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        *,
        length: int | None = None,
        reason: str = "",
    ) -> None:
        """Begin an answer whose body follows in pieces (``send``, then ``end_stream``).

        For a handler whose coroutine then returns ``None``. The body is framed
        by ``length`` when given, otherwise chunked (or, to an HTTP/1.0 client,
        by closing the connection). ``headers`` must not carry framing.
        """
        self._stream().start_stream(self, status, headers, length, reason)

    async def send(self, data: bytes) -> None:
        """Write one piece of a streamed body, waiting while the client lags.

        Raises ``ConnectionResetError`` once the client has gone.
        """
        await self._stream().send(data)

    def end_stream(self) -> None:
        """Finish a streamed body (the last chunk, for chunked framing)."""
        self._stream().end_stream()

    def abort(self) -> None:
        """Cut the connection: an answer under way cannot be completed honestly."""
        if self._conn is not None:
            self._conn.abort()

    def _stream(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("http: this request has no connection")
        return self._conn

    @property
    def content_type(self) -> str:
        """The media type, lower-case, without parameters (``""`` if absent)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()


class Answer(NamedTuple):
    """A complete response: status, body, and anything beyond the usual headers.

    A named tuple rather than a frozen dataclass: one is built per request,
    and a tuple is built in C.
    """

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    #: Close the connection after this answer (the rest of the request may
    #: still be arriving, or the stream cannot be trusted).
    close: bool = False
    #: ``None``: ``headers`` are the answer's own (a relayed answer), and a
    #: ``Date`` is added only if they have none.
    content_type: str | None = "application/json"
    #: The reason phrase; ``""`` for the standard one.
    reason: str = ""


#: A handler answers at once, or returns a coroutine the connection runs as a
#: task; that coroutine returns the answer, or ``None`` when it has streamed
#: the answer itself (``Request.start_stream``).
Handler = Callable[[Request], "Answer | Coroutine[Any, Any, Answer | None]"]

#: ``admit(method, target, headers)``: whether this listener serves a request
#: itself or hands its connection to the fallback (see ``Server``).
Admit = Callable[[str, str, Mapping[str, str]], bool]


@dataclass(frozen=True, slots=True)
class Route:
    """A path's handler and the methods it takes (others get 405; ``None``: all)."""

    handler: Handler
    methods: frozenset[str] | None = frozenset({"POST"})


#: RFC 9110 token characters (header names, methods).
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: Every header line of a head at once: ``name: value`` CRLF, values of visible
#: characters, spaces, tabs and obs-text; no folding, no bare CR or LF.
_HEADERS: Final = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.([01])")
#: One header line of a head ``_HEADERS`` accepted, on its Latin-1 text. The
#: value is ``.*`` rather than ``[^\r\n]*``: the same match on such a line (no
#: CR or LF in a value), and ``re`` scans ``.*`` about six times as fast, which
#: matters for a kilobyte-long ``Authorization`` value (4.96 -> 0.79 µs).
_FIELD: Final = re.compile(r"(" + _TOKEN.decode() + r"):(.*)\r\n")
_REASONS: Final = {s.value: s.phrase for s in http.HTTPStatus}
#: Fields of a relayed answer this server writes itself (``proxy.framing``).
_FRAMING: Final = framing.HOP_BY_HOP | framing.FRAMING
#: Refusals that mean "beyond this lane's limits" (a head too large, a chunked
#: body, a body too large), not "wrong": the fallback may serve those.
_BEYOND_LIMITS: Final = frozenset({411, 413, 431})
#: ``_next_request``'s word for "this connection goes to the fallback".
_HANDOFF: Final = object()


class _Refused(Exception):
    """A request the server answers itself, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class _Head:
    method: str
    target: str
    headers: dict[str, str]
    fields: list[tuple[str, str]]
    length: int
    keep_alive: bool
    http11: bool
    continue_sent: bool = False


class Server:
    """Routes, limits and the connections of one listener.

    With a ``fallback`` (a protocol factory, for the proxy: aiohttp's
    connection handler), this server is a fast lane in front of a general
    one. A request beyond this lane's limits (a chunked body, a body over
    ``max_body_bytes``, an oversized head), a head that is not plain ASCII,
    and one ``admit`` declines (an upgrade, a watch) are not refused: the
    connection is handed, at that
    request's first byte, to a protocol from ``fallback``, which keeps it for
    the rest of its life. Only one parser ever reads a given byte, and the
    handover happens between requests, when every earlier answer has been
    written, so the two cannot disagree about where a request ends.
    """

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        limits: Limits,
        error_body: Callable[[int, str], bytes],
        on_answer: Callable[[str, int, float], None] | None = None,
        default: Route | None = None,
        fallback: Callable[[], asyncio.Protocol] | None = None,
        admit: Admit | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.default = default
        self.limits = limits
        self.error_body = error_body
        self.on_answer = on_answer
        self.fallback = fallback
        self.admit = admit
        #: Connections handed to the fallback so far (for tests and metrics).
        self.handed_off = 0
        self.connections: set[_Connection] = set()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date_second = -1
        self._date = b""
        #: Connections with answers queued this loop iteration (see ``_Connection.queue``).
        self._dirty: list[_Connection] = []

    # -- listening --------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> int:
        """Listen; return the port bound (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("http: this server is already listening")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            ssl=ssl_context,
            # A connection stuck in its TLS handshake is asyncio's to close.
            ssl_handshake_timeout=self.limits.head_timeout if ssl_context else None,
            backlog=backlog,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self._sweeper = asyncio.create_task(self._sweep())
        # typeshed types ``sockets`` as a tuple but uvloop's is a list, which a
        # compiled build (``make compiled``) would refuse: read it untyped.
        listening: Any = self._server
        return int(listening.sockets[0].getsockname()[1])

    async def drain(self, grace: float) -> None:
        """Stop accepting; finish in-flight requests within ``grace``; close all.

        Idle connections close at once, busy ones after their answer (which
        says ``Connection: close``), as kube-apiserver's own shutdown does.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        pending = set(self.inflight)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        if pending:
            log.warning(
                "grace period over: cancelling requests",
                extra={"requests": len(pending)},
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        """Close connections past their deadline; one pass per fraction of a bound."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        interval = max(0.01, min(1.0, limits.head_timeout, limits.body_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                if conn.deadline and now >= conn.deadline:
                    conn.expire()

    # -- answering --------------------------------------------------------

    def date(self) -> bytes:
        """The ``Date`` header value, formatted once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date = email.utils.formatdate(now, usegmt=True).encode()
            self._date_second = now
        return self._date

    def mark(self, conn: _Connection) -> None:
        """Have ``conn``'s queued output written at the end of this iteration."""
        dirty = self._dirty
        dirty.append(conn)
        if len(dirty) == 1:
            conn.loop.call_soon(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    def refusal(self, status: int, message: str) -> Answer:
        """A server-made answer (no route ran): a ``Status`` body, then close."""
        return Answer(status, self.error_body(status, message), close=True)


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch, answer, in order."""

    __slots__ = (
        "_buffer",
        "_busy",
        "_close_after",
        "_closing",
        "_drained",
        "_head",
        "_loop",
        "_marked",
        "_out",
        "_paused_reading",
        "_paused_writing",
        "_server",
        "_started",
        "_stream",
        "_transport",
        "deadline",
        "loop",
        "peer",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self.loop = self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        #: Output queued this iteration, written by ``flush`` (see ``queue``).
        self._out: list[bytes] = []
        self._marked = False
        #: Close once the queued output is written; read nothing more meanwhile.
        self._close_after = False
        self._closing = False
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._busy = False
        self._paused_reading = False
        self._paused_writing = False
        #: The streamed answer under way: ``None``, ``"length"``, ``"chunked"``
        #: or ``"close"`` (delimited by closing, for an HTTP/1.0 client).
        self._stream: str | None = None
        #: ``perf_counter`` when the request being answered was dispatched; 0:
        #: none (a refusal before a whole request arrived takes no time).
        self._started = 0.0
        #: Resolved when writing may go on (``resume_writing``) or never will.
        self._drained: asyncio.Future[None] | None = None
        #: Loop time by which the current wait (head or body) must end; 0: none.
        self.deadline = 0.0
        self.peer: str | None = None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has
        # its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        self.deadline = self._loop.time() + self._server.limits.head_timeout
        if self._server.fallback is not None:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple | list) and peer:
                self.peer = str(peer[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        self._buffer.clear()
        self._out.clear()
        self.deadline = 0.0
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if self._busy or self._paused_writing:
            self._throttle()
            return
        self._process()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._wake_writer()
        if not self._busy:
            self._process()

    def _wake_writer(self) -> None:
        waiter = self._drained
        if waiter is not None:
            self._drained = None
            if not waiter.done():
                waiter.set_result(None)

    # -- lifecycle --------------------------------------------------------

    def expire(self) -> None:
        """The deadline passed: 408 for a late body, otherwise just close."""
        self.deadline = 0.0
        if self._transport is None:
            return
        if self._head is not None:
            limits = self._server.limits
            self._answer(
                "",
                self._server.refusal(
                    408, f"http: body not received within {limits.body_timeout:g}s"
                ),
            )
            return
        if self._buffer:
            log.info("connection closed: request head not complete in time")
        self._close_soon()

    def close_if_idle(self) -> None:
        """Close now unless a request is being handled or has begun to arrive."""
        if self._transport is not None and not self._busy and not self._buffer:
            self.flush()
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        """Drop the connection (the drain is over, or an answer broke off)."""
        self._out.clear()
        if self._transport is not None:
            self._transport.abort()

    # -- output -----------------------------------------------------------

    def queue(self, data: bytes) -> None:
        """Queue ``data``; it is written at the end of this loop iteration.

        Why not write at once: the answers of one iteration then leave
        together, after its reads. Measured under load (64 connections), a
        cached review's CPU fell from ~45 to ~35 µs, most of it in ``send``:
        a write spaced between reads more often wakes the peer on its own.
        """
        self._out.append(data)
        if not self._marked:
            self._marked = True
            self._server.mark(self)

    def flush(self) -> None:
        """Write what is queued (in order), then close if an answer said so."""
        self._marked = False
        out = self._out
        transport = self._transport
        if transport is None:
            out.clear()
            return
        if out:
            self._out = []
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._close_after:
            self._close_after = False
            transport.close()

    def _close_soon(self) -> None:
        """Close after the queued output; read and answer nothing more."""
        self._closing = True
        self._close_after = True
        self._head = None
        self._buffer.clear()
        self.deadline = 0.0
        if not self._marked:
            self._marked = True
            self._server.mark(self)

    # -- streamed answers -------------------------------------------------

    def start_stream(
        self,
        request: Request,
        status: int,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        reason: str,
    ) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("http: the client has gone")
        if self._stream is not None:
            raise RuntimeError("http: an answer is already under way")
        server = self._server
        if server.on_answer is not None:
            server.on_answer("other", status, self._elapsed())
        head = [
            b"HTTP/1.1 %d %s\r\n"
            % (status, (reason or _REASONS.get(status, "")).encode("latin-1")),
        ]
        _relayed_fields(head, headers, server.date)
        if framing.bodyless(request.method, status):
            self._stream = "none"
        elif length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
            self._stream = "length"
        elif request.http11:
            head.append(b"Transfer-Encoding: chunked\r\n")
            self._stream = "chunked"
        else:
            self._stream = "close"
        if self._stream == "close" or not request.keep_alive or server.draining:
            head.append(b"Connection: close\r\n")
            request.keep_alive = False
        head.append(b"\r\n")
        self.queue(b"".join(head))

    async def send(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("http: the client has gone")
        if not data or self._stream == "none":
            return
        # Written at once, after what is queued: a stream's pace is the
        # client's, and backpressure needs the transport to see the bytes.
        if self._stream == "chunked":
            self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out.append(data)
        self.flush()
        while self._paused_writing and self._transport is not None:
            waiter = self._drained = self._loop.create_future()
            await waiter
        if self._transport is None:
            raise ConnectionResetError("http: the client has gone")

    def end_stream(self) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("http: the client has gone")
        if self._stream == "chunked":
            self.queue(b"0\r\n\r\n")

    def _stream_finished(self, request: Request) -> None:
        """After a streamed answer: keep the connection, or close it."""
        stream, self._stream = self._stream, None
        transport = self._transport
        if transport is None:
            return
        if stream is None:
            # The handler said it answered but never began: nothing honest
            # can follow on this connection.
            log.error("handler returned no answer (likely a bug)")
            transport.abort()
            return
        if not request.keep_alive or self._server.draining:
            self._close_soon()
            return
        self.deadline = self._loop.time() + self._server.limits.head_timeout

    # -- handing over -----------------------------------------------------

    def _handoff(self) -> None:
        """Give this connection, from the current request on, to the fallback."""
        server = self._server
        transport = self._transport
        factory = server.fallback
        if transport is None or factory is None:  # pragma: no cover - callers check
            return
        # Earlier answers go out before anything the fallback writes.
        self.flush()
        data = bytes(self._buffer)
        self._buffer.clear()
        self._head = None
        self.deadline = 0.0
        self._transport = None
        server.connections.discard(self)
        server.handed_off += 1
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if data:
            protocol.data_received(data)

    def _throttle(self) -> None:
        limits = self._server.limits
        waiting = len(self._buffer)
        if (
            not self._paused_reading
            and self._transport is not None
            and waiting > limits.max_head_bytes + limits.max_body_bytes
        ):
            self._paused_reading = True
            self._transport.pause_reading()

    def _unthrottle(self) -> None:
        if self._paused_reading and self._transport is not None:
            self._paused_reading = False
            self._transport.resume_reading()

    # -- requests ---------------------------------------------------------

    def _process(self) -> None:
        """Answer every complete request buffered, in order, until one must wait."""
        server = self._server
        while self._transport is not None and not self._busy and not self._closing:
            if self._paused_writing:
                self._throttle()
                return
            try:
                request = self._next_request()
            except _Refused as refused:
                log.info(
                    "request refused by the http parser",
                    extra={"status": refused.status, "error": str(refused)},
                )
                self._answer("", server.refusal(refused.status, str(refused)))
                return
            if request is None:
                self._unthrottle()
                return
            if request is _HANDOFF:
                self._handoff()
                return
            self._dispatch(cast(Request, request))

    def _next_request(self) -> Request | object | None:
        """The next complete request in the buffer, ``None`` if it is not all
        here, ``_HANDOFF`` if it is the fallback's.
        """
        server = self._server
        limits = server.limits
        buffer = self._buffer
        head = self._head
        if head is None:
            # RFC 9112 §2.2: ignore empty lines before a request line.
            while buffer[:2] == b"\r\n":
                del buffer[:2]
            end = buffer.find(b"\r\n\r\n", 0, limits.max_head_bytes + 4)
            if end < 0:
                if len(buffer) > limits.max_head_bytes:
                    if server.fallback is not None:
                        return _HANDOFF
                    raise _Refused(431, "http: request head too large")
                return None
            raw = bytes(buffer[: end + 2])
            if server.fallback is None:
                head = self._parse_head(raw)
            else:
                if not raw.isascii():
                    return _HANDOFF
                try:
                    head = self._parse_head(raw)
                except _Refused as refused:
                    # Beyond this lane's limits, not wrong: the fallback's.
                    # Anything wrong is refused here, never handed on for a
                    # second parser to read its own way.
                    if refused.status in _BEYOND_LIMITS:
                        return _HANDOFF
                    raise
                admit = server.admit
                if admit is not None and not admit(
                    head.method, head.target, head.headers
                ):
                    return _HANDOFF
            self._head = head
            del buffer[: end + 4]
            self.deadline = self._loop.time() + limits.body_timeout
        if len(buffer) < head.length:
            if (
                not head.continue_sent
                and head.headers.get("expect", "").lower() == "100-continue"
                and self._transport is not None
            ):
                head.continue_sent = True
                self.queue(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buffer[: head.length])
        del buffer[: head.length]
        self._head = None
        self.deadline = 0.0
        return Request(
            head.method,
            head.target,
            head.headers,
            body,
            head.keep_alive,
            fields=head.fields,
            http11=head.http11,
            conn=self,
        )

    def _parse_head(self, raw: bytes) -> _Head:
        limits = self._server.limits
        line_end = raw.find(b"\r\n")
        match = _REQUEST_LINE.fullmatch(raw, 0, line_end)
        if match is None:
            raise _Refused(400, "http: malformed request line")
        if _HEADERS.fullmatch(raw, line_end + 2) is None:
            raise _Refused(400, "http: malformed header")
        # Checked whole above; now split at once (names are ASCII tokens, values
        # Latin-1 as RFC 9110 §5.5 reads obs-text).
        found = _FIELD.findall(raw.decode("latin-1"), line_end + 2)
        if len(found) > limits.max_headers:
            raise _Refused(431, "http: too many headers")
        headers: dict[str, str] = {}
        pairs: list[tuple[str, str]] = []
        for original, value in found:
            key = original.lower()
            text = value.strip(" \t")
            pairs.append((original, text))
            if key in headers:
                if key == "host":
                    raise _Refused(400, "http: more than one Host")  # RFC 9112 §3.2
                # RFC 9110 §5.3: repeated fields combine as a list.
                text = headers[key] + ", " + text
            headers[key] = text
        method = match.group(1).decode("ascii")
        try:
            framed = framing.check_request(method, pairs)
        except framing.AmbiguousRequest as err:
            raise _Refused(err.status, str(err)) from None
        http10 = match.group(3) == b"0"
        if not http10 and "host" not in headers:
            raise _Refused(400, "http: HTTP/1.1 request without Host")
        if framed.chunked:
            raise _Refused(411, "http: a Content-Length is required")
        length = framed.length or 0
        if length > limits.max_body_bytes:
            raise _Refused(413, f"http: body larger than {limits.max_body_bytes} bytes")
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise _Refused(417, "http: unsupported expectation")
        connection = headers.get("connection", "").lower()
        keep_alive = "keep-alive" in connection if http10 else "close" not in connection
        return _Head(
            method=method,
            target=match.group(2).decode("ascii"),
            headers=headers,
            fields=pairs,
            length=length,
            keep_alive=keep_alive,
            http11=not http10,
        )

    def _dispatch(self, request: Request) -> None:
        self._started = time.perf_counter()
        server = self._server
        route = server.routes.get(request.path, server.default)
        if route is None:
            self._answer("", Answer(404, server.error_body(404, "not found")), request)
            return
        name = request.path.strip("/") if server.on_answer is not None else ""
        if route.methods is not None and request.method not in route.methods:
            allow = ", ".join(sorted(route.methods or ()))
            answer = Answer(
                405,
                server.error_body(405, f"method must be one of: {allow}"),
                headers=(("Allow", allow),),
            )
            self._answer(name, answer, request)
            return
        rid = request.headers.get("x-request-id", "")[:64] or new_request_id()
        token = REQUEST_ID.set(rid)
        try:
            result = route.handler(request)
            if isinstance(result, Answer):
                self._answer(name, result, request)
                return
            # The task copies the context now, request id included.
            task = self._loop.create_task(result)
        except Exception:
            log.exception(
                "unhandled error (likely a bug)", extra={"path": request.path}
            )
            self._answer(name, server.refusal(500, "internal error"), request)
            return
        finally:
            REQUEST_ID.reset(token)
        self._busy = True
        self.deadline = 0.0
        server.inflight.add(task)
        task.add_done_callback(lambda t: self._finished(t, name, request))

    def _elapsed(self) -> float:
        """Seconds since the request being answered was dispatched (once)."""
        started, self._started = self._started, 0.0
        return time.perf_counter() - started if started else 0.0

    def _finished(
        self, task: asyncio.Task[Answer | None], name: str, request: Request
    ) -> None:
        self._server.inflight.discard(task)
        self._busy = False
        if task.cancelled():
            self.abort()
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "unhandled error (likely a bug)",
                exc_info=exc,
                extra={"path": request.path},
            )
            if self._stream is not None:
                # Half an answer is out: only cutting the connection is honest.
                self._stream = None
                self.abort()
                return
            answer: Answer | None = self._server.refusal(500, "internal error")
        else:
            answer = task.result()
        if answer is None or self._stream is not None:
            self._stream_finished(request)
        else:
            self._answer(name, answer, request)
        self._process()

    def _answer(
        self, name: str, answer: Answer, request: Request | None = None
    ) -> None:
        server = self._server
        transport = self._transport
        if server.on_answer is not None:
            server.on_answer(name or "other", answer.status, self._elapsed())
        if transport is None:
            return
        close = (
            answer.close or request is None or not request.keep_alive or server.draining
        )
        status = answer.status
        body = answer.body
        # A refusal by the parser has no request: its method is the buffer's
        # first word, which is all "HEAD" needs (RFC 9110 §9.3.2).
        method = (
            request.method
            if request is not None
            else ("HEAD" if self._buffer[:5] == b"HEAD " else "")
        )
        head = [
            b"HTTP/1.1 %d %s\r\n"
            % (status, (answer.reason or _REASONS.get(status, "")).encode("latin-1"))
        ]
        if answer.content_type is not None:
            head.append(
                b"Content-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
                % (answer.content_type.encode(), len(body), server.date())
            )
            for key, value in answer.headers:
                head.append(b"%s: %s\r\n" % (key.encode(), value.encode()))
        else:
            _relayed_fields(head, answer.headers, server.date)
            if not framing.bodyless("", status):
                head.append(b"Content-Length: %d\r\n" % len(body))
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if not framing.bodyless(method, status):
            head.append(body)
        self.queue(b"".join(head))
        if close:
            self._close_soon()
            return
        self.deadline = self._loop.time() + server.limits.head_timeout


def _relayed_fields(
    head: list[bytes], fields: Iterable[tuple[str, str]], date: Callable[[], bytes]
) -> None:
    """Append a relayed answer's own fields, minus any framing (this server
    frames the body itself, so a second length could never be honest), and a
    ``Date`` unless it has one.
    """
    dated = False
    for key, value in fields:
        lower = key.lower()
        if lower in _FRAMING:
            continue
        dated = dated or lower == "date"
        head.append(b"%s: %s\r\n" % (key.encode("latin-1"), value.encode("utf-8")))
    if not dated:
        head.append(b"Date: %s\r\n" % date())
