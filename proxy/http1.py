"""The one HTTP/1.1 listener of both front ends, on llhttp.

Why one listener, and why llhttp: request smuggling lives where two parsers
disagree about where a request ends. Until 0.2 the proxy answered on two
stacks (a hand-written fast lane and aiohttp, with a hand-over between them)
and at least eleven things had to agree between them. Now every request of
both front ends, of every kind, goes through this one protocol, and every
byte of every request head and body is read by llhttp (through ``httptools``),
the parser Node.js ships, in its strict mode. This module adds only policy on
top: limits, the ``Host`` rules, ``proxy.framing``'s refusals, deadlines, and
the order of answers. uvicorn's ``httptools_impl`` is the model; where we
differ (no task per request when the answer is ready, answers of one loop
iteration written together, cancellation on disconnect) it says why below.

What it accepts, and nothing else (anything else is refused with a Kubernetes
``Status`` and, where the stream can no longer be trusted, a closed connection):

- what llhttp accepts in strict mode (no obsolete line folding, no bare ``CR``
  or ``LF``, header names that are tokens, no ``NUL`` in values, one length);
  then origin-form targets, ``HTTP/1.1`` (with exactly one ``Host``) or
  ``HTTP/1.0``; the whole head within ``max_head_bytes`` and ``max_headers``
  (431 beyond);
- ``proxy.framing.check_request``: 400 for any framing ambiguity llhttp would
  tolerate (equal lengths, a length list) and for a method the Kubernetes API
  does not serve;
- bodies: a body of at most ``max_body_bytes`` with a ``Content-Length`` is
  read whole before the handler runs; a larger one, or a ``chunked`` one, is
  either streamed to the handler (``Limits.stream_bodies``, the proxy:
  ``Request.readany``, with backpressure) or refused (411/413, the webhook:
  kube-apiserver always sends a small body with a length);
- upgrades (``Connection: upgrade`` with ``Upgrade``) carry no body (400);
  the handler may take the connection over (``Request.upgrade``) for a tunnel;
  otherwise the connection closes after the answer, since what follows on it
  is no longer HTTP;
- no body in an answer to ``HEAD`` (refusals included), nor with 1xx, 204 or
  304; ``Expect: 100-continue`` is honoured; other expectations get 417.

Bounds, all enforced by one sweeper per server rather than a timer per request:
a connection must complete a request head within ``head_timeout`` of opening
or of its previous answer (slowloris, and the keep-alive idle limit), and a
whole body within ``body_timeout`` of its head (408); a streamed body may not
pause for longer than ``body_timeout`` (the connection is cut). Requests
pipelined on one connection are answered in order, one at a time; reading
pauses while more than one request waits, while a streamed body is not being
read, or while the client does not read its answers.

Handlers return an ``Answer`` at once (a cached verdict needs no waiting, and
then no task is created) or an awaitable that the connection runs as a task.
A client that goes away cancels its handler's task (as Go's reverse proxy
cancels the request's context), unless the connection was handed to a tunnel.
Nothing a client sent is ever quoted back or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast

import httptools
from mypy_extensions import mypyc_attr

from proxy import framing, tunnel
from proxy.log import REQUEST_ID, new_request_id

__all__ = ["Answer", "BodyError", "Handler", "Limits", "Request", "Route", "Server"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The bounds of one listener (defaults suit a webhook)."""

    #: Request line and headers together; kube-apiserver sends well under 1 KiB.
    max_head_bytes: int = 16 * 1024
    max_headers: int = 64
    #: The largest single field (name and value); ``None``: only the head's
    #: total bounds it.
    max_field_bytes: int | None = None
    #: The largest body read whole before the handler runs.
    max_body_bytes: int = 1024 * 1024
    #: A chunked body, or one over ``max_body_bytes``: streamed to the handler
    #: (``Request.readany``) when true, refused (411/413) when false.
    stream_bodies: bool = False
    #: A request head must be complete within this long of the connection
    #: opening or of the previous answer; an idle keep-alive connection is
    #: closed after it too.
    head_timeout: float = 75.0
    #: A whole body must arrive within this long of its head (then 408); a
    #: streamed body may not pause longer than this (then the cut).
    body_timeout: float = 10.0


@mypyc_attr(native_class=False)
class BodyError(ConnectionError):
    """A streamed request body ended early: the client left, stalled, or sent
    something llhttp refused. The answer cannot be completed honestly.

    Not a native class in the compiled build: mypyc cannot subclass
    ``OSError``'s family natively, and refused to compile the module.
    """


class Request:
    """One request.

    ``headers`` has lower-case names with repeated fields joined (RFC 9110
    §5.3); ``fields`` keeps every field as sent, in order and in its case, for
    a handler that forwards them (the proxy). ``path`` is the target's path,
    undecoded. ``body`` is the whole body when it was read before the handler
    ran; a streamed body (``streamed``) is read with ``readany``.
    """

    __slots__ = (
        "_conn",
        "_waiter",
        "body",
        "complete",
        "due",
        "fields",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "path",
        "pending",
        "size",
        "streamed",
        "target",
        "upgrade",
        "wants_continue",
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
        size: int = 0,
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
        #: Bytes of the request line and header fields, as counted for limits.
        self.size = size
        #: ``Connection: upgrade`` with an ``Upgrade``: the handler may take
        #: the connection (``upgrade``); otherwise it closes after the answer.
        self.upgrade = False
        #: The body is read piece by piece (``readany``), not held in ``body``.
        self.streamed = False
        #: Every byte of the body has arrived.
        self.complete = True
        #: Body bytes received and not yet handed out (streamed), or being
        #: collected (whole).
        self.pending = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        #: ``Expect: 100-continue`` asked and not answered yet.
        self.wants_continue = False
        #: Loop time by which a whole body must have arrived (0: not set yet).
        self.due = 0.0

    @property
    def peer(self) -> str | None:
        """The client's address (no port), ``None`` when unknown."""
        conn = self._conn
        return conn.peer() if conn is not None else None

    @property
    def content_type(self) -> str:
        """The media type, lower-case, without parameters (``""`` if absent)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    # -- a streamed body --------------------------------------------------

    async def readany(self) -> bytes:
        """The next piece of a streamed body; ``b""`` at its end.

        Raises ``BodyError`` when the body cannot be completed.
        """
        conn = self._conn
        while not self.pending:
            if self.complete:
                return b""
            if conn is None or conn.lost:
                raise BodyError("http: the request body ended early")
            conn.send_continue(self)
            waiter = self._waiter = conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        data = bytes(self.pending)
        self.pending.clear()
        if conn is not None:
            conn.body_consumed()
        return data

    @property
    def reading(self) -> bool:
        """A ``readany`` is waiting for body bytes (or was just woken)."""
        return self._waiter is not None

    def wake(self) -> None:
        """Wake a ``readany`` waiting for body bytes (or their end)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- answering in pieces ----------------------------------------------

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

    def upgrade_to(
        self, headers: Iterable[tuple[str, str]], *, reason: str = ""
    ) -> tunnel.ClientSide:
        """Answer ``101 Switching Protocols`` and take the connection over.

        For an ``upgrade`` request only; the handler's coroutine then relays
        the tunnel and returns ``None``. Bytes the client sent after its
        request are already in the returned pipe.
        """
        if not self.upgrade:
            raise RuntimeError("http: not an upgrade request")
        return self._stream().take_over(self, headers, reason)

    def _stream(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("http: this request has no connection")
        return self._conn


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
#: task; that coroutine returns the answer, or ``None`` when it has answered
#: itself (``Request.start_stream``, ``Request.upgrade_to``).
Handler = Callable[[Request], "Answer | Coroutine[Any, Any, Answer | None]"]


@dataclass(frozen=True, slots=True)
class Route:
    """A path's handler and the methods it takes (others get 405; ``None``: all)."""

    handler: Handler
    methods: frozenset[str] | None = frozenset({"POST"})


_REASONS: Final = {s.value: s.phrase for s in http.HTTPStatus}
#: Fields of a relayed answer this server writes itself (``proxy.framing``).
_FRAMING: Final = framing.HOP_BY_HOP | framing.FRAMING
#: Streamed body bytes held for a handler that has not read them yet before
#: the connection stops being read.
_STREAM_HIGH_WATER: Final = 256 * 1024
#: Bytes a client may send after an upgrade request before its answer.
_EARLY_TUNNEL_BYTES: Final = 64 * 1024


class _Refused(Exception):
    """A request the server answers itself, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Refusal(NamedTuple):
    """A refusal queued in its request's place, answered in order."""

    status: int
    message: str
    method: str


class Server:
    """Routes, limits and the connections of one listener."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        limits: Limits,
        error_body: Callable[[int, str], bytes],
        on_answer: Callable[[str, int, float], None] | None = None,
        default: Route | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.default = default
        self.limits = limits
        self.error_body = error_body
        self.on_answer = on_answer
        self.connections: set[_Connection] = set()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.draining = False
        #: Set when the drain begins: long-running answers (watches, tunnels)
        #: end themselves cleanly rather than hold the grace period.
        self.stopping = asyncio.Event()
        #: Called once the drain is over (say, to report what a log limiter
        #: held back).
        self.on_drained: list[Callable[[], None]] = []
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
        says ``Connection: close``), as kube-apiserver's own shutdown does;
        long-running answers are told to end (``stopping``).
        """
        self.draining = True
        self.stopping.set()
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
            self._sweeper = None
            for callback in self.on_drained:
                callback()

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
    """One client connection: parse (llhttp), dispatch, answer, in order."""

    __slots__ = (
        "_busy",
        "_close_after",
        "_closing",
        "_drained",
        "_early",
        "_fed_body",
        "_fields",
        "_framing",
        "_head_bytes",
        "_last",
        "_marked",
        "_out",
        "_parser",
        "_parsing",
        "_paused_reading",
        "_paused_writing",
        "_queue",
        "_raw_head",
        "_refused",
        "_server",
        "_started",
        "_stream",
        "_taken",
        "_task",
        "_transport",
        "_upgraded",
        "_url",
        "active",
        "deadline",
        "loop",
        "lost",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        #: Output queued this iteration, written by ``flush`` (see ``queue``).
        self._out: list[bytes] = []
        self._marked = False
        #: Close once the queued output is written.
        self._close_after = False
        #: Read and answer nothing more (a refusal or a close is under way).
        self._closing = False
        #: Requests parsed and not yet dispatched, and refusals in their place.
        self._queue: deque[Request | _Refusal] = deque()
        #: The request whose head or body llhttp is reading.
        self._parsing: Request | None = None
        self._url = b""
        self._fields: list[tuple[str, str]] = []
        #: Head bytes counted for the request being parsed: exactly (line and
        #: fields), and as fed to llhttp (which bounds a field never ended).
        self._head_bytes = 0
        self._raw_head = 0
        #: Bytes of a body's framing read since its last body byte.
        self._framing = 0
        #: Body bytes llhttp handed over in the current read.
        self._fed_body = 0
        #: The last request whose message llhttp completed.
        self._last: Request | None = None
        #: Our own refusal, raised inside an llhttp callback.
        self._refused: _Refused | None = None
        #: llhttp stopped at an upgrade: later bytes belong to the tunnel.
        self._upgraded = False
        self._early = bytearray()
        #: The dispatched request, until its answer is complete.
        self.active: Request | None = None
        self._task: asyncio.Task[Any] | None = None
        self._busy = False
        #: The connection was handed to a tunnel (``take_over``).
        self._taken = False
        self._paused_reading = False
        self._paused_writing = False
        #: The streamed answer under way: ``None``, ``"none"``, ``"length"``,
        #: ``"chunked"`` or ``"close"`` (delimited by closing, for HTTP/1.0).
        self._stream: str | None = None
        #: ``perf_counter`` when the request being answered was dispatched; 0:
        #: none (a refusal before a whole request arrived takes no time).
        self._started = 0.0
        #: Resolved when writing may go on (``resume_writing``) or never will.
        self._drained: asyncio.Future[None] | None = None
        #: Loop time by which the current wait must end; 0: none.
        self.deadline = 0.0
        self.lost = False

    def peer(self) -> str | None:
        """The client's address (no port), ``None`` when unknown."""
        transport = self._transport
        address = transport.get_extra_info("peername") if transport else None
        if isinstance(address, tuple | list) and address:
            return str(address[0])
        return None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has
        # its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        self.deadline = self.loop.time() + self._server.limits.head_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._server.connections.discard(self)
        self._transport = None
        self._out.clear()
        self._queue.clear()
        self.deadline = 0.0
        self._wake_writer()
        active = self.active
        if active is not None:
            active.wake()
        task = self._task
        if task is not None and not task.done() and not self._taken:
            if active is not None and active.reading:
                # Woken above, its ``readany`` raises ``BodyError``: the
                # handler learns why, and cleans up as it would for a body
                # broken off.
                return
            # The client is gone: nobody will read the answer (Go's reverse
            # proxy cancels the request's context here too). A silent watch
            # learns it now rather than at its next byte.
            task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._taken:
            return
        if self._upgraded:
            self._keep_early(data)
            return
        before = self._parsing
        in_head = before is not None and not before.method
        self._fed_body = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops after an upgrade request: what follows is not HTTP,
            # so this connection ends with that request's answer.
            self._upgraded = True
            if self._last is not None:
                self._last.keep_alive = False
            self._keep_early(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError:
            refused = self._refused or _Refused(500, "http: internal error")
            self._refuse(refused.status, str(refused))
        except httptools.HttpParserError:
            self._refuse(400, "http: malformed request")
        else:
            parsing = self._parsing
            if parsing is not None and not parsing.method:
                self._bound_head(data, continued=in_head)
            elif parsing is not None and parsing is before and not in_head:
                self._bound_framing(len(data))
        self._process()

    def _bound_head(self, data: bytes, *, continued: bool) -> None:
        """Refuse a head growing past the limit before llhttp has ended it.

        llhttp holds a field until its line ends and only then hands it over
        (``on_header``), so an unterminated line is bounded here by what was
        fed: the bytes after the last LF (every complete line of a head ends
        with one), accumulated while a line goes on across reads. In the read
        where the head began, the body bytes before it are not its own.
        """
        last = data.rfind(b"\n")
        if last >= 0:
            tail = len(data) - last - 1
            if not continued:
                tail = min(tail, len(data) - self._fed_body)
            self._raw_head = tail
        else:
            self._raw_head += len(data) if continued else len(data) - self._fed_body
        if self._head_bytes + self._raw_head > self._server.limits.max_head_bytes:
            self._refuse(431, "http: request head too large")

    def _bound_framing(self, size: int) -> None:
        """Refuse a chunked body's framing growing past the head's limit.

        Between body bytes llhttp reads only chunk sizes, their extensions
        and, at the end, trailers, which ``httptools`` holds until their line
        ends: reads that carried no body byte are counted, within the limit
        of a head (plus the read a body byte last came in).
        """
        if self._fed_body:
            self._framing = 0
            return
        self._framing += size
        if self._framing > self._server.limits.max_head_bytes:
            self._refuse(431, "http: chunk framing or trailers too large")

    def eof_received(self) -> bool | None:
        # A half-close ends the connection (as HTTP/1.1 servers commonly do);
        # a streamed body waiting for more learns it has ended early.
        return None

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

    # -- llhttp's callbacks -----------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request("", "", {}, b"", True, conn=self)
        self._url = b""
        self._fields = []
        self._head_bytes = 0
        self._raw_head = 0
        self._framing = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._server.limits.max_head_bytes:
            raise _refuse_in_callback(self, 431, "http: request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        parsing = self._parsing
        # After the head, llhttp hands over a chunked body's trailers here.
        trailer = parsing is not None and bool(parsing.method)
        self._head_bytes += len(name) + len(value) + 4
        limits = self._server.limits
        if self._head_bytes > limits.max_head_bytes:
            raise _refuse_in_callback(self, 431, "http: request head too large")
        if len(fields) >= limits.max_headers:
            raise _refuse_in_callback(self, 431, "http: too many headers")
        if (
            limits.max_field_bytes is not None
            and len(name) + len(value) > limits.max_field_bytes
        ):
            raise _refuse_in_callback(self, 431, "http: header field too large")
        if trailer:
            # Counted against the head's limits, then dropped: a trailer is
            # never a header field (RFC 9110 §6.5.1), and none is forwarded.
            return
        # Names are tokens (llhttp checked); values Latin-1 as RFC 9110 §5.5
        # reads obs-text.
        fields.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        try:
            self._admit_head(request, method, parser.get_http_version())
        except _Refused as refused:
            self._refused = refused
            raise

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is None:  # pragma: no cover - llhttp calls it within a message
            return
        request.pending += body
        self._fed_body += len(body)
        if request.streamed:
            if request is self.active:
                self.deadline = self.loop.time() + self._server.limits.body_timeout
            request.wake()

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is None:  # pragma: no cover - llhttp pairs begin and complete
            return
        request.complete = True
        self._last = request
        if request.streamed:
            if request is self.active:
                self.deadline = 0.0
            request.wake()
        else:
            request.body = bytes(request.pending)
            request.pending = bytearray()

    # -- our policy on a head ---------------------------------------------

    def _admit_head(self, request: Request, method: str, version: str) -> None:
        limits = self._server.limits
        fields = self._fields
        # Known before any refusal: an answer to HEAD carries no body, its
        # refusals included (RFC 9110 §9.3.2).
        request.method = method
        try:
            framed = framing.check_request(method, fields)
        except framing.AmbiguousRequest as err:
            raise _Refused(err.status, str(err)) from None
        target = self._url.decode("latin-1")
        if not target.startswith("/"):
            raise _Refused(400, "http: malformed request line")
        if version not in ("1.1", "1.0"):
            raise _Refused(400, "http: malformed request line")
        http10 = version == "1.0"
        headers: dict[str, str] = {}
        for original, text in fields:
            key = original.lower()
            if key in headers:
                if key == "host":
                    raise _Refused(400, "http: more than one Host")  # RFC 9112 §3.2
                # RFC 9110 §5.3: repeated fields combine as a list.
                headers[key] = headers[key] + ", " + text
            else:
                headers[key] = text
        if not http10 and "host" not in headers:
            raise _Refused(400, "http: HTTP/1.1 request without Host")
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise _Refused(417, "http: unsupported expectation")
        connection = headers.get("connection", "").lower()
        upgrade = "upgrade" in headers and "upgrade" in _tokens(connection)
        length = framed.length
        if upgrade and (framed.chunked or length):
            # Nothing before the 101 is forwarded: a body could only be read as
            # the tunnel's first bytes by one side and not by the other.
            raise _Refused(400, "http: a body on an upgrade request")
        if framed.chunked or (length is not None and length > limits.max_body_bytes):
            if not limits.stream_bodies:
                if framed.chunked:
                    raise _Refused(411, "http: a Content-Length is required")
                raise _Refused(
                    413, f"http: body larger than {limits.max_body_bytes} bytes"
                )
            request.streamed = True
        request.method = method
        request.target = target
        request.path = target.partition("?")[0]
        request.headers = headers
        request.fields = fields
        request.size = self._head_bytes
        request.http11 = not http10
        request.upgrade = upgrade
        request.keep_alive = (
            "keep-alive" in connection if http10 else "close" not in connection
        )
        request.complete = not (framed.chunked or length)
        request.wants_continue = expect is not None and not request.complete
        self._queue.append(request)

    # -- lifecycle --------------------------------------------------------

    def expire(self) -> None:
        """A deadline passed: 408 for a late body, a cut for a stalled stream,
        otherwise just close."""
        self.deadline = 0.0
        if self._transport is None:
            return
        limits = self._server.limits
        active = self.active
        if active is not None:
            if active.streamed and not active.complete:
                if active.pending:
                    # The handler has not read what came: the pause is ours
                    # (backpressure), not a stalled client.
                    self.deadline = self.loop.time() + limits.body_timeout
                    return
                log.info("connection closed: request body stalled")
                self.abort()
            return
        front = self._queue[0] if self._queue else None
        if isinstance(front, Request):
            self._queue.clear()
            self._closing = True
            self._answer(
                "",
                self._server.refusal(
                    408, f"http: body not received within {limits.body_timeout:g}s"
                ),
                front,
            )
            return
        if self._parsing is not None:
            log.info("connection closed: request head not complete in time")
        self._close_soon()

    def close_if_idle(self) -> None:
        """Close now unless a request is being handled or has begun to arrive."""
        if (
            self._transport is not None
            and not self._busy
            and not self._queue
            and self._parsing is None
        ):
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
        if transport is None or self._taken:
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
        self._queue.clear()
        self.deadline = 0.0
        if not self._marked:
            self._marked = True
            self._server.mark(self)

    def send_continue(self, request: Request) -> None:
        """``100 Continue``, once, to a client waiting for it before its body."""
        if request.wants_continue and self._transport is not None:
            request.wants_continue = False
            self.queue(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- refusals ---------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """Queue a refusal in the place of the request being parsed; stop reading.

        A streamed body already being handled cannot be completed: its
        handler learns it (``BodyError``) and the connection is cut after.
        """
        log.info(
            "request refused by the http parser",
            extra={"status": status, "error": message},
        )
        self._refused = None
        parsing, self._parsing = self._parsing, None
        method = parsing.method if parsing is not None else ""
        self._closing = True
        active = self.active
        if parsing is not None and parsing is active:
            self.abort()
            active.wake()
            return
        if parsing is not None and parsing in self._queue:
            # Its head was admitted, its body broke: it is refused instead.
            self._queue.remove(parsing)
        self._queue.append(_Refusal(status, message, method))

    def _keep_early(self, data: bytes) -> None:
        """Hold what came after an upgrade request for the tunnel (bounded)."""
        if not data:
            return
        self._early += data
        if (
            len(self._early) > _EARLY_TUNNEL_BYTES
            and not self._paused_reading
            and self._transport is not None
        ):
            self._paused_reading = True
            self._transport.pause_reading()

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
            if length is not None and not framing.bodyless("", status):
                # HEAD: the length a GET would have had (RFC 9110 §8.6).
                head.append(b"Content-Length: %d\r\n" % length)
        elif length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
            self._stream = "length"
        elif request.http11:
            head.append(b"Transfer-Encoding: chunked\r\n")
            self._stream = "chunked"
        else:
            self._stream = "close"
        if self._stream == "close" or _closes_after(request, server):
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
            waiter = self._drained = self.loop.create_future()
            await waiter
        if self._transport is None:
            raise ConnectionResetError("http: the client has gone")

    def end_stream(self) -> None:
        if self._transport is None:
            raise ConnectionResetError("http: the client has gone")
        if self._stream == "chunked":
            self.queue(b"0\r\n\r\n")

    def take_over(
        self, request: Request, headers: Iterable[tuple[str, str]], reason: str
    ) -> tunnel.ClientSide:
        """Write the ``101`` head, then hand the transport to a tunnel pipe."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("http: the client has gone")
        if self._stream is not None:
            raise RuntimeError("http: an answer is already under way")
        server = self._server
        if server.on_answer is not None:
            server.on_answer("other", 101, self._elapsed())
        head = [b"HTTP/1.1 101 %s\r\n" % (reason or "Switching Protocols").encode()]
        for key, value in headers:
            head.append(b"%s: %s\r\n" % (key.encode("latin-1"), value.encode()))
        head.append(b"\r\n")
        self.flush()
        transport.write(b"".join(head))
        self._taken = True
        self._stream = "none"
        self.deadline = 0.0
        server.connections.discard(self)
        client = tunnel.ClientSide(transport)
        transport.set_protocol(client)
        early, self._early = bytes(self._early), bytearray()
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if early:
            client.data_received(early)
        return client

    # -- requests ---------------------------------------------------------

    def buffered(self) -> int:
        """Bytes received and held for requests not yet answered (bounded by
        the throttle: the limits plus what one read delivers)."""
        held = sum(
            len(r.pending) + r.size for r in self._queue if isinstance(r, Request)
        )
        return held + len(self._early)

    def body_consumed(self) -> None:
        """A handler read a streamed body's bytes: read the client again (and
        the client's stall clock starts now, not when we stopped reading)."""
        active = self.active
        if active is not None and not active.complete:
            self.deadline = self.loop.time() + self._server.limits.body_timeout
        if self._paused_reading and not self._busy_throttled():
            self._unthrottle()

    def _busy_throttled(self) -> bool:
        """Whether enough is waiting that reading the client should pause."""
        if self._paused_writing or len(self._queue) > 1 or self._upgraded:
            return True
        limits = self._server.limits
        active = self.active
        if active is not None and len(active.pending) > _STREAM_HIGH_WATER:
            return True
        waiting = sum(len(r.pending) for r in self._queue if isinstance(r, Request))
        return waiting > limits.max_head_bytes + limits.max_body_bytes

    def _throttle(self) -> None:
        if not self._paused_reading and self._transport is not None:
            self._paused_reading = True
            self._transport.pause_reading()

    def _unthrottle(self) -> None:
        if (
            self._paused_reading
            and self._transport is not None
            and not self._upgraded
            and not self._closing
        ):
            self._paused_reading = False
            self._transport.resume_reading()

    def _process(self) -> None:
        """Answer every request queued, in order, until one must wait."""
        server = self._server
        queue = self._queue
        while self._transport is not None and not self._busy and not self._taken:
            if self._paused_writing:
                break
            if not queue:
                break
            front = queue[0]
            if isinstance(front, _Refusal):
                queue.clear()
                self._answer(
                    "",
                    server.refusal(front.status, front.message),
                    method=front.method,
                )
                return
            if not front.streamed and not front.complete:
                self.send_continue(front)
                if not front.due:
                    front.due = self.loop.time() + server.limits.body_timeout
                self.deadline = front.due
                break
            queue.popleft()
            self._dispatch(front)
        if self._transport is None or self._closing:
            return
        if self._busy_throttled():
            self._throttle()
        else:
            self._unthrottle()

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
            task = self.loop.create_task(result)
        except Exception:
            log.exception(
                "unhandled error (likely a bug)", extra={"path": request.path}
            )
            self._answer(name, server.refusal(500, "internal error"), request)
            return
        finally:
            REQUEST_ID.reset(token)
        self._busy = True
        self.active = request
        self._task = task
        self.deadline = (
            self.loop.time() + server.limits.body_timeout
            if request.streamed and not request.complete
            else 0.0
        )
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
        self.active = None
        self._task = None
        if self._taken:
            return
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
        if stream == "close" or _closes_after(request, self._server):
            self._close_soon()
            return
        self._after_answer()

    def _after_answer(self) -> None:
        """The connection waits for its next request head."""
        self.deadline = self.loop.time() + self._server.limits.head_timeout

    def _answer(
        self,
        name: str,
        answer: Answer,
        request: Request | None = None,
        *,
        method: str = "",
    ) -> None:
        server = self._server
        transport = self._transport
        if server.on_answer is not None:
            server.on_answer(name or "other", answer.status, self._elapsed())
        if transport is None:
            return
        close = answer.close or request is None or _closes_after(request, server)
        status = answer.status
        body = answer.body
        if request is not None:
            method = request.method
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
        self._after_answer()


def _refuse_in_callback(conn: _Connection, status: int, message: str) -> _Refused:
    """Our refusal from inside an llhttp callback (llhttp stops; see
    ``data_received``)."""
    refused = _Refused(status, message)
    conn._refused = refused
    return refused


def _closes_after(request: Request, server: Server) -> bool:
    """Whether the connection ends with this request's answer (a body not
    read to its end included: the rest of it would have to be read and
    dropped, unbounded, before the next request)."""
    return (
        not request.keep_alive
        or request.upgrade
        or server.draining
        or not request.complete
    )


def _tokens(value: str) -> set[str]:
    return {token.strip(" \t") for token in value.split(",")}


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
