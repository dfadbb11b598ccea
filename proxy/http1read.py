"""The reading half of a connection of the one HTTP/1.1 listener.

llhttp (``httptools``) parses every byte; ``Reader`` adds the policy of
``proxy.http1``'s module docstring on top: the bounds of a head while it
arrives (``max_head_bytes``, ``max_headers``, ``max_field_bytes``, chunk
framing), the admission of a complete head (``proxy.framing.check_request``,
the ``Host`` rules, ``Expect``, upgrades, whole or streamed bodies), the
order of refusals among pipelined requests, the reading throttle, and the
output queued per loop iteration (``Listener.mark``). The answering half is
``proxy.http1conn.Connection``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple, cast

import httptools

from proxy import framing
from proxy.http1msg import Answer, Limits, Request, Route

__all__ = ["Listener", "Reader", "Refusal", "Refused", "refuse_in_callback", "tokens"]

#: The logger of ``proxy.http1``, whose part this was: operators filter on it.
log = logging.getLogger("proxy.http1")

#: Streamed body bytes held for a handler that has not read them yet before
#: the connection stops being read.
_STREAM_HIGH_WATER: Final = 256 * 1024
#: Bytes a client may send after an upgrade request before its answer.
_EARLY_TUNNEL_BYTES: Final = 64 * 1024


class Refused(Exception):
    """A request the server answers itself, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Refusal(NamedTuple):
    """A refusal queued in its request's place, answered in order."""

    status: int
    message: str
    method: str


class Listener:
    """What the connections of one listener share: routes, limits, the
    connections themselves, and the end-of-iteration write of their output.
    ``proxy.http1.Server`` adds listening and draining.
    """

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
        self.connections: set[Reader] = set()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.draining = False
        self._date_second = -1
        self._date = b""
        #: Connections with answers queued this loop iteration (see ``Reader.queue``).
        self._dirty: list[Reader] = []

    # -- answering --------------------------------------------------------

    def date(self) -> bytes:
        """The ``Date`` header value, formatted once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date = email.utils.formatdate(now, usegmt=True).encode()
            self._date_second = now
        return self._date

    def mark(self, conn: Reader) -> None:
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


class Reader(asyncio.Protocol):
    """A client connection's reading half: llhttp, the head policy, the bounds,
    the output queue and refusals. ``proxy.http1conn.Connection`` adds the
    answering half (dispatch, answers, streams, upgrades) and the two calls
    declared here for it (``_process``, ``expire``).
    """

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

    def __init__(self, server: Listener) -> None:
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
        self._queue: deque[Request | Refusal] = deque()
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
        self._refused: Refused | None = None
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
            refused = self._refused or Refused(500, "http: internal error")
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

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._server.limits.max_head_bytes:
            raise refuse_in_callback(self, 431, "http: request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        parsing = self._parsing
        # After the head, llhttp hands over a chunked body's trailers here.
        trailer = parsing is not None and bool(parsing.method)
        self._head_bytes += len(name) + len(value) + 4
        limits = self._server.limits
        if self._head_bytes > limits.max_head_bytes:
            raise refuse_in_callback(self, 431, "http: request head too large")
        if len(fields) >= limits.max_headers:
            raise refuse_in_callback(self, 431, "http: too many headers")
        if (
            limits.max_field_bytes is not None
            and len(name) + len(value) > limits.max_field_bytes
        ):
            raise refuse_in_callback(self, 431, "http: header field too large")
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
        except Refused as refused:
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
            raise Refused(err.status, str(err)) from None
        target = self._url.decode("latin-1")
        if not target.startswith("/"):
            raise Refused(400, "http: malformed request line")
        if version not in ("1.1", "1.0"):
            raise Refused(400, "http: malformed request line")
        http10 = version == "1.0"
        headers: dict[str, str] = {}
        for original, text in fields:
            key = original.lower()
            if key in headers:
                if key == "host":
                    raise Refused(400, "http: more than one Host")  # RFC 9112 §3.2
                # RFC 9110 §5.3: repeated fields combine as a list.
                headers[key] = headers[key] + ", " + text
            else:
                headers[key] = text
        if not http10 and "host" not in headers:
            raise Refused(400, "http: HTTP/1.1 request without Host")
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise Refused(417, "http: unsupported expectation")
        connection = headers.get("connection", "").lower()
        upgrade = "upgrade" in headers and "upgrade" in tokens(connection)
        length = framed.length
        if upgrade and (framed.chunked or length):
            # Nothing before the 101 is forwarded: a body could only be read as
            # the tunnel's first bytes by one side and not by the other.
            raise Refused(400, "http: a body on an upgrade request")
        if framed.chunked or (length is not None and length > limits.max_body_bytes):
            if not limits.stream_bodies:
                if framed.chunked:
                    raise Refused(411, "http: a Content-Length is required")
                raise Refused(
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
        self._queue.append(Refusal(status, message, method))

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

    # -- the answering half (``Connection``) ------------------------------

    def _process(self) -> None:
        """Answer every request queued, in order, until one must wait."""
        raise NotImplementedError

    def expire(self) -> None:
        """A deadline passed."""
        raise NotImplementedError


def refuse_in_callback(conn: Reader, status: int, message: str) -> Refused:
    """Our refusal from inside an llhttp callback (llhttp stops; see
    ``data_received``)."""
    refused = Refused(status, message)
    conn._refused = refused
    return refused


def tokens(value: str) -> set[str]:
    """The comma-separated tokens of a header value (``Connection``)."""
    return {token.strip(" \t") for token in value.split(",")}
