"""The values of the one HTTP/1.1 listener: a request, an answer, the limits.

``Request`` is what a handler gets (its head parsed by llhttp and admitted by
``proxy.http1read``, its body whole or streamed), with the calls a handler
makes on its connection (``RequestChannel``, the seam to
``proxy.http1conn.Connection``); ``Answer`` is what it returns; ``Limits``
bound a listener; ``Route`` pairs a path with its handler. Re-exported by
``proxy.http1``, where the listener's design is described.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from mypy_extensions import mypyc_attr

from proxy import tunnel

__all__ = [
    "Answer",
    "BodyError",
    "Handler",
    "Limits",
    "Request",
    "RequestChannel",
    "Route",
]


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


# A plain Python class even when compiled (``make compiled``): mypyc cannot
# subclass a built-in exception natively.
@mypyc_attr(native_class=False)
class BodyError(ConnectionError):
    """A streamed request body ended early: the client left, stalled, or sent
    something llhttp refused. The answer cannot be completed honestly."""


class RequestChannel(Protocol):
    """What a ``Request`` asks of its connection (``proxy.http1conn.Connection``).

    None of it is on the path of a whole request answered at once: these
    are the calls of streamed bodies, streamed answers and upgrades.
    """

    loop: asyncio.AbstractEventLoop
    lost: bool

    def peer(self) -> str | None:
        """The client's address (no port), ``None`` when unknown."""

    def send_continue(self, request: Request) -> None:
        """``100 Continue``, once, to a client waiting for it before its body."""

    def body_consumed(self) -> None:
        """A handler read a streamed body's bytes: read the client again."""

    def start_stream(
        self,
        request: Request,
        status: int,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        reason: str,
    ) -> None:
        """Write the head of an answer whose body follows in pieces."""

    async def send(self, data: bytes) -> None:
        """Write one piece of a streamed body."""

    def end_stream(self) -> None:
        """Finish a streamed body."""

    def abort(self) -> None:
        """Cut the connection."""

    def take_over(
        self, request: Request, headers: Iterable[tuple[str, str]], reason: str
    ) -> tunnel.ClientSide:
        """Write the ``101`` head and hand the transport to a tunnel pipe."""


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
        conn: RequestChannel | None = None,
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

    def _stream(self) -> RequestChannel:
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
