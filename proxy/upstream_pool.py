"""The proxy's one HTTP/1.1 client to the API server: a keep-alive pool whose
answers are parsed by llhttp.

Every request the proxy sends upstream goes through here: ordinary requests,
SubjectAccessReviews, long-running ones (watches, ``logs -f``) and upgrades
(exec, attach, port-forward over SPDY/3.1 or WebSocket). One client means one
reading of every answer: there is no second stack whose idea of where a
response ends could differ from this one's.

Why not aiohttp's client: for a small GET it cost about a third of the
proxy's CPU per request (request and URL objects, a connector, per-request
timers, tracing hooks, a payload writer task), and it cannot hand over the
socket after ``101 Switching Protocols``.

Requests we write (``ConnectionPool.head``): ``METHOD target HTTP/1.1``,
``Host`` first, then the caller's headers in order, then one framing field
computed from the body actually sent (``proxy.framing.request_framing``):
``Content-Length: 0`` for a body-less method other than GET/HEAD/OPTIONS/TRACE,
``Content-Length`` for a bytes body or a streamed one of known length (cut at
it), ``Transfer-Encoding: chunked`` for a streamed body of unknown length. An
upgrade request carries ``Connection: Upgrade`` and ``Upgrade`` instead, and no
framing: nothing is forwarded before the ``101``. A caller's header that would
stand beside ours (framing, ``Host``, hop-by-hop) is refused; text is UTF-8
(lone surrogates dropped, as aiohttp does) and a control character is refused.

Answers are read on each connection by llhttp (``proxy.upstream_conn``,
which says what it accepts). Anything malformed is ``UpstreamError`` (502) and the connection is aborted.
A connection goes back to the pool only when the answer was read completely
and nothing followed it, the request body was written completely, the answer
was ``HTTP/1.1`` and llhttp says keep-alive (no ``Connection: close``, not
delimited by the end of the connection). A pooled connection the server
closed while it was idle (end of stream or reset before any byte of the
answer) is retried once, on a fresh connection, for GET, HEAD and OPTIONS
without a streamed body, as browsers and aiohttp do; any other request gets
the error.

Bodies: one with a ``Content-Length`` up to ``buffer_limit`` is read whole
before ``send`` returns (the connection is then already back in the pool);
others are read piece by piece with ``read_chunk``, which is how watches and
log streams are relayed: the caller bounds the wait for each piece (the
stream's idle limit), there is no total limit, and the connection stays out
of the pool until the answer is complete, or is aborted when the caller
closes it early. Reading pauses while more than about ``buffer_limit`` bytes
wait unread, so memory stays bounded whatever the answer's size.

Upgrades (``ConnectionPool.upgrade``) go out on a fresh connection that is
never pooled. On ``101`` the caller takes the connection over
(``PooledResponse.detach``): an ``Upgraded`` byte pipe on the same transport,
starting with any bytes that arrived after the head, which ``proxy.tunnel``
relays; any other answer is read like an ordinary one. Every stream and tunnel holds one of the pool's
connections for its life, so ``limit`` bounds them too.

Failures map as ``Upstream`` documents: 503 cannot connect, 504 connect timeout,
502 TLS failure or unusable answer. Waiting for the head is bounded by the
caller (``asyncio.timeout``) or ``head_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from aiohttp.abc import AbstractResolver

from proxy import framing
from proxy.errors import UpstreamError
from proxy.upstream_conn import (
    CLOSE_WAIT,
    Connection,
    Lost,
    Malformed,
    PooledResponse,
    Upgraded,
)

__all__ = ["BodySource", "ConnectionPool", "PooledResponse", "Upgraded"]

#: Methods retried once after a stale pooled connection (safe to send twice).
_RETRYABLE: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: Fields only ``ConnectionPool.head`` writes (framing, routing, hop-by-hop).
_OURS: Final = framing.FRAMING | framing.HOP_BY_HOP | {"host"}
#: Every control character but the tab, CR and LF included (``head``).
_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outgoing:
    """One request, ready to go out on any connection (it may be sent twice)."""

    method: str
    head: bytes
    body: bytes | BodySource | None
    chunked: bool
    content_length: int | None
    max_head_bytes: int
    upgrade: bool


class BodySource(Protocol):
    """A request body read piece by piece (``aiohttp.StreamReader`` is one)."""

    async def readany(self) -> bytes:
        """The next piece; ``b""`` at the end."""
        ...


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one server (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        resolver: AbstractResolver | None,
        limit: int,
        keepalive_timeout: float,
        host_header: str,
        buffer_limit: int = 1 << 20,
    ) -> None:
        """``limit`` 0 means no bound on open connections; ``buffer_limit`` is
        the largest body read whole and about the most bytes held unread.
        """
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._resolver = resolver
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._host_header = host_header
        self.buffer_limit = buffer_limit
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._tls_generation = 0
        self.connections_made = 0

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use (tests and metrics)."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool for reuse."""
        return len(self._idle)

    def replace_tls(self, ssl_context: ssl.SSLContext) -> int:
        """New connections use ``ssl_context`` (a rotated client certificate).

        Idle connections, made with the old one, are closed now; those in use
        finish their exchange and are closed when released, never reused.
        Returns how many idle connections were retired.
        """
        self._ssl = ssl_context
        self._tls_generation += 1
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn, abort=False)
        return len(idle)

    def retire(self) -> int:
        """Stop reusing every connection: this pool's server was replaced.

        Idle connections are closed now; those in use (a request, a watch, a
        tunnel) finish on it and are closed when released. Returns how many
        idle connections were closed.
        """
        self._tls_generation += 1
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn, abort=False)
        return len(idle)

    # Connections -----------------------------------------------------------

    async def _acquire(self, connect_timeout: float, *, fresh: bool) -> Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamError("upstream: client closed", status=503)
            if not fresh:
                idle = self._idle
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    if conn.usable_idle(now, self._keepalive):
                        conn.reused = True
                        return conn
                    self._discard(conn, abort=True)
            if not self._limit or len(self._open) < self._limit:
                return await self._connect(loop, connect_timeout)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, connect_timeout: float
    ) -> Connection:
        placeholder = Connection(loop, self.buffer_limit + 65536)
        self._open.add(placeholder)  # holds a slot while connecting
        placeholder.tls_generation = self._tls_generation
        try:
            async with asyncio.timeout(connect_timeout):
                address = self._host
                if self._resolver is not None:
                    address = (await self._resolver.resolve(self._host, self._port))[0][
                        "host"
                    ]
                await loop.create_connection(
                    lambda: placeholder,
                    address,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl else None,
                )
        except TimeoutError as timed_out:
            self._forget(placeholder)
            raise UpstreamError(
                "upstream: connect timed out", status=504
            ) from timed_out
        except ssl.SSLError as tls_err:
            self._forget(placeholder)
            raise UpstreamError(
                f"upstream: tls handshake failed: {tls_err.reason}", status=502
            ) from tls_err
        except OSError as os_err:
            self._forget(placeholder)
            raise UpstreamError(
                f"upstream: cannot connect: {os_err.strerror or type(os_err).__name__}",
                status=503,
            ) from os_err
        except BaseException:
            self._forget(placeholder)
            raise
        self.connections_made += 1
        transport = placeholder.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        placeholder.lost.add_done_callback(lambda _: self._forget(placeholder))
        return placeholder

    def _forget(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _discard(self, conn: Connection, *, abort: bool) -> None:
        if abort:
            conn.abort()
        else:
            conn.close()
        self._forget(conn)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: Connection, *, reusable: bool) -> None:
        """Put ``conn`` back for reuse, or close it (abort unless reusable)."""
        if not reusable or self._closed:
            self._discard(conn, abort=not reusable)
            return
        if conn.tls_generation != self._tls_generation:
            self._discard(conn, abort=False)
            return
        if not conn.usable_idle(-1.0, float("inf")):
            self._discard(conn, abort=True)
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive, self._sweep)
        self._wake_one()

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        keep = [c for c in self._idle if c.usable_idle(now, self._keepalive)]
        for conn in self._idle:
            if conn not in keep:
                self._discard(conn, abort=conn.eof)
        self._idle = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            self._sweeper = loop.call_later(
                max(0.05, oldest + self._keepalive - now), self._sweep
            )

    async def close(self) -> None:
        """Close every connection (idle ones politely, waiting briefly)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        pending = [c.lost for c in self._open if c.transport is not None]
        for conn in list(self._open):
            if conn not in idle:
                conn.abort()
        if pending:
            _, late = await asyncio.wait(pending, timeout=CLOSE_WAIT)
            if late:
                for conn in list(self._open):
                    conn.abort()
                await asyncio.wait(late, timeout=CLOSE_WAIT)

    # Requests --------------------------------------------------------------

    def head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | BodySource | None,
        *,
        body_length: int | None = None,
        upgrade: str | None = None,
    ) -> tuple[bytes, bool]:
        """The request head as bytes, and whether the body goes chunked.

        The framing is ours (``proxy.framing.request_framing``): the length
        of a bytes body, ``body_length`` for a streamed one (which is then
        cut at that length), chunked for a streamed body of unknown length.
        With ``upgrade`` (the protocol asked for) the head ends with
        ``Connection: Upgrade`` and ``Upgrade`` and has no framing: no body
        goes before the ``101``. ``headers`` carrying a framing, hop-by-hop
        or ``Host`` field are a bug of the caller and refused
        (``ValueError``), so no client's field can ever stand beside ours.
        """
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        for name, value in headers:
            if name.lower() in _OURS:
                raise ValueError(f"upstream: {name!r} is the pool's to write")
            lines.append(f"{name}: {value}")
        chunked = False
        if upgrade is not None:
            if body is not None:
                raise ValueError("upstream: no body goes with an upgrade")
            lines.append("Connection: Upgrade")
            lines.append(f"Upgrade: {upgrade}")
        else:
            if isinstance(body, bytes):
                body_length = len(body)
            elif body is None:
                body_length = None
            field = framing.request_framing(
                method, body_length=body_length, streamed=body is not None
            )
            chunked = field is not None and field[0] == "Transfer-Encoding"
            if field is not None:
                lines.append(f"{field[0]}: {field[1]}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "ignore")
        # The only control characters allowed are a value's tabs and the line
        # breaks joined in here: deleting every other one, CR and LF included,
        # must remove exactly those CRLFs. One C pass over the head (0.9 µs with
        # a kilobyte credential in it), where a regex scan and two counts took
        # 4.9 µs.
        if len(raw) - len(raw.translate(None, _CONTROLS)) != 2 * (len(lines) + 1):
            raise ValueError("upstream: forbidden control character in the request")
        return raw, chunked

    async def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        *,
        body: bytes | BodySource | None = None,
        body_length: int | None = None,
        connect_timeout: float,
        head_timeout: float | None = None,
        max_head_bytes: int = 256 * 1024,
    ) -> PooledResponse:
        """Send one request and return the answer once its head has arrived.

        ``target`` is the request target as sent (path and query); ``headers``
        go out as given, in order, and carry no framing and no ``Host`` (see
        ``head``); ``body_length`` is the exact length of a streamed body when
        it is known (the client declared it): that many bytes are sent, under
        that ``Content-Length``, and a body that ends sooner fails the request.
        """
        head, chunked = self.head(
            method, target, headers, body, body_length=body_length
        )
        retry = method in _RETRYABLE and (body is None or isinstance(body, bytes))
        outgoing = _Outgoing(
            method=method,
            head=head,
            body=body,
            chunked=chunked,
            content_length=None if chunked else body_length,
            max_head_bytes=max_head_bytes,
            upgrade=False,
        )
        return await self._send(outgoing, connect_timeout, head_timeout, retry=retry)

    async def upgrade(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        *,
        protocol: str,
        connect_timeout: float,
        head_timeout: float | None = None,
        max_head_bytes: int = 256 * 1024,
    ) -> PooledResponse:
        """Ask for an upgrade to ``protocol`` on a fresh connection; the
        answer once its head has arrived: ``detach`` a ``101``, read any
        other like an ordinary answer. Never retried.
        """
        head, _ = self.head(method, target, headers, None, upgrade=protocol)
        outgoing = _Outgoing(
            method=method,
            head=head,
            body=None,
            chunked=False,
            content_length=None,
            max_head_bytes=max_head_bytes,
            upgrade=True,
        )
        return await self._send(
            outgoing, connect_timeout, head_timeout, retry=False, fresh=True
        )

    async def _send(
        self,
        outgoing: _Outgoing,
        connect_timeout: float,
        head_timeout: float | None,
        *,
        retry: bool,
        fresh: bool = False,
    ) -> PooledResponse:
        conn = await self._acquire(connect_timeout, fresh=fresh)
        while True:
            try:
                if head_timeout is None:
                    return await self._exchange(conn, outgoing)
                async with asyncio.timeout(head_timeout):
                    return await self._exchange(conn, outgoing)
            except Lost as lost:
                stale = conn.reused and conn.received == 0
                self._discard(conn, abort=True)
                if not (stale and retry):
                    raise UpstreamError(
                        "upstream: connection lost before the response", status=502
                    ) from lost
                retry = False
                conn = await self._acquire(connect_timeout, fresh=True)
            except Malformed as malformed:
                self._discard(conn, abort=True)
                raise UpstreamError(
                    f"upstream: malformed response: {malformed}", status=502
                ) from malformed
            except TimeoutError as timed_out:
                self._discard(conn, abort=True)
                raise UpstreamError(
                    "upstream: no response in time", status=504
                ) from timed_out
            except BaseException:
                self._discard(conn, abort=True)
                raise

    async def _exchange(self, conn: Connection, req: _Outgoing) -> PooledResponse:
        head_only = req.method == "HEAD"
        conn.begin(
            head_only=head_only, upgrade=req.upgrade, max_head=req.max_head_bytes
        )
        # An upgrade's connection is its own: never pooled, whatever the answer.
        if req.upgrade:
            conn.spoilt = True
        writer: asyncio.Task[None] | None = None
        body = req.body
        if body is None:
            conn.write(req.head)
        elif isinstance(body, bytes):
            conn.write(req.head + body)
        else:
            conn.write(req.head)
            writer = asyncio.ensure_future(
                _write_body(conn, body, req.chunked, req.content_length)
            )
            writer.add_done_callback(_retrieve)
        try:
            await conn.read_head()
            status = conn.status
            bodyless = head_only or status in (204, 304)
            response = PooledResponse(self, conn, bodyless=bodyless, writer=writer)
            if status == 101:
                return response
            length = response.body_length
            if bodyless or length == 0:
                # Nothing to read (HEAD, 204, 304, a zero length): a whole body.
                response.body = b""
                response._finish()
            elif length is not None and length <= self.buffer_limit:
                pieces = []
                while piece := await conn.read_body():
                    pieces.append(piece)
                response.body = b"".join(pieces)
                response._finish()
            return response
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            raise


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a body writer's failure as seen: the answer's reader reports it."""
    if not task.cancelled():
        task.exception()


async def _write_body(
    conn: Connection, body: BodySource, chunked: bool, content_length: int | None
) -> None:
    """Copy a streamed request body; a failure aborts the connection so the
    answer's reader fails too instead of waiting for bytes that never come.
    """
    left = content_length
    try:
        while True:
            if left is not None and left <= 0:
                break
            data = await body.readany()
            if not data:
                if left:
                    raise Lost
                break
            if left is not None:
                data = data[:left]
                left -= len(data)
                conn.write(data)
            elif chunked:
                conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                conn.write(data)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except BaseException:
        conn.abort()
        raise
