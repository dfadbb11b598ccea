"""A lean HTTP/1.1 client with a keep-alive pool, for the proxy's ordinary requests.

Why not aiohttp's client: for a small GET it cost about a third of the proxy's
CPU per request (request and URL objects, a connector, per-request timers,
tracing hooks, a payload writer task), none of which the proxy needs. This
client does what ``Upstream.request`` did on the wire and nothing more:

- the request head is ``METHOD target HTTP/1.1``, ``Host`` first, then the
  caller's headers in order, then one framing field computed from the body
  actually sent (``proxy.framing.request_framing``): ``Content-Length: 0`` for
  a body-less method other than GET/HEAD/OPTIONS/TRACE, ``Content-Length`` for
  a bytes body or a streamed one of known length (cut at it),
  ``Transfer-Encoding: chunked`` for a streamed body of unknown length. A
  caller's header that would stand beside ours (framing, ``Host``,
  hop-by-hop) is refused; text is UTF-8 (lone surrogates dropped, as
  aiohttp does) and a control character in a header is refused;
- the response head is parsed strictly (``HTTP/1.0`` or ``1.1``, a three-digit
  status, token header names, no control characters, no folded lines, at most
  one ``Content-Length`` of digits only, ``Transfer-Encoding`` exactly
  ``chunked`` and never with a length); header values are decoded as aiohttp
  decodes them (UTF-8, undecodable bytes kept as surrogates); informational
  ``1xx`` answers are skipped, a ``101`` is an error;
- the body is framed by ``Content-Length``, ``chunked`` (extensions and
  trailers read and dropped) or the end of the connection, and is never
  decoded (no decompression).

A connection goes back to the pool only when the response was read completely,
the request body was written completely, nothing followed the response, both
sides spoke HTTP/1.1 and neither said ``Connection: close``. Anything malformed
is ``UpstreamError`` (502) and the connection is aborted. A pooled connection
the server closed while it was idle (end of stream or reset before any byte of
the answer) is retried once, on a fresh connection, for GET, HEAD and OPTIONS
without a streamed body, as browsers and aiohttp do; any other request gets the
error.

Response bodies with a ``Content-Length`` up to ``buffer_limit`` are read whole
before ``send`` returns (the connection is then already back in the pool);
others are read piece by piece with ``read_chunk``. Reading pauses while more
than about ``buffer_limit`` bytes wait unread, so memory stays bounded whatever
the response size.

Failures map as ``Upstream`` documents: 503 cannot connect, 504 connect timeout,
502 TLS failure or unusable answer. Waiting for the answer is bounded by the
caller (``asyncio.timeout``) or ``head_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol, cast

from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from proxy import framing
from proxy.errors import UpstreamError

__all__ = ["BodySource", "ConnectionPool", "PooledResponse"]

_CLOSE_WAIT: Final = 1.0
#: Methods retried once after a stale pooled connection (safe to send twice).
_RETRYABLE: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: Fields only ``ConnectionPool.head`` writes (framing, routing, hop-by-hop).
_OURS: Final = framing.FRAMING | framing.HOP_BY_HOP | {"host"}
_MAX_LINE: Final = 8192
_CHUNK_SIZE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?"
)
#: ``_parse_head``'s expressions, on the decoded head (values may hold
#: surrogates for undecodable bytes, which the classes let through as
#: obs-text).
_STATUS_LINE: Final = re.compile(
    r"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?"
)
#: A value is everything to the end of its line (blanks around it are stripped
#: afterwards: a lazy value before optional blanks backtracks quadratically).
_FIELD_BODY: Final = r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\x00-\x08\x0a-\x1f\x7f]*)"
_FIELDS: Final = re.compile(r"(?:\r\n" + _FIELD_BODY + r")*")
_FIELD: Final = re.compile(r"\r\n" + _FIELD_BODY)
_DIGITS: Final = re.compile(r"[0-9]{1,18}")
#: Every control character but the tab, CR and LF included (``head``).
_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])

_LENGTH: Final = 0
_CHUNKED: Final = 1
_UNTIL_CLOSE: Final = 2
_NONE: Final = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outgoing:
    """One request, ready to go out on any connection (it may be sent twice)."""

    method: str
    head: bytes
    body: bytes | BodySource | None
    chunked: bool
    content_length: int | None
    max_head_bytes: int


class BodySource(Protocol):
    """A request body read piece by piece (``aiohttp.StreamReader`` is one)."""

    async def readany(self) -> bytes:
        """The next piece; ``b""`` at the end."""
        ...


class _Malformed(Exception):
    """The answer breaks HTTP/1.1 framing; the connection cannot be trusted."""


class _Lost(Exception):
    """The connection ended (or was reset) before the answer was complete."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a read buffer the reader pulls from."""

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int) -> None:
        self._loop = loop
        self._high = high_water
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.received = 0
        self.reused = False
        self.idle_since = 0.0
        self.lost = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)
        if len(self.buffer) > self._high and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # Reading ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self.eof:
            raise _Lost
        if self._paused:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _resume_if_drained(self) -> None:
        if self._paused and len(self.buffer) < self._high // 2:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    async def read_until(self, marker: bytes, limit: int) -> bytes:
        """Bytes up to ``marker`` (excluded, and consumed); ``_Malformed`` past
        ``limit`` bytes, ``_Lost`` at the end of the stream.
        """
        start = 0
        while True:
            buf = self.buffer
            at = buf.find(marker, start)
            if at >= 0:
                if at > limit:
                    raise _Malformed("head or line too long")
                data = bytes(buf[:at])
                del buf[: at + len(marker)]
                return data
            if len(buf) > limit:
                raise _Malformed("head or line too long")
            start = max(0, len(buf) - len(marker) + 1)
            await self._wait()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._wait()
        buf = self.buffer
        data = bytes(buf[:n])
        del buf[:n]
        self._resume_if_drained()
        return data

    async def read_some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes; ``_Lost`` at the end of the stream."""
        if not self.buffer:
            await self._wait()
            while not self.buffer:
                await self._wait()
        buf = self.buffer
        if n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._resume_if_drained()
        return data

    # Writing ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise _Lost
        self.transport.write(data)

    async def drain(self) -> None:
        while self._write_paused:
            if self.eof:
                raise _Lost
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        if self.eof:
            raise _Lost

    # Life ------------------------------------------------------------------

    def usable_idle(self, now: float, keepalive: float) -> bool:
        return (
            not self.eof
            and not self.buffer
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < keepalive
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class PooledResponse:
    """The API server's answer: status, reason, headers and a body to read.

    ``body`` is the whole body when it was read before ``send`` returned (a
    ``Content-Length`` within the buffer bound, or nothing to read: ``b""``
    for ``HEAD``, 204, 304 and a zero length); otherwise ``None`` and the
    body comes from ``read_chunk``. Call ``close`` when done (``release`` is
    automatic once the body is read completely); ``async with`` does it.
    """

    __slots__ = (
        "_conn",
        "_mode",
        "_need_crlf",
        "_pool",
        "_remaining",
        "_reusable",
        "_writer",
        "body",
        "body_length",
        "complete",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        pool: ConnectionPool,
        conn: _Connection,
        *,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
        mode: int,
        length: int,
        reusable: bool,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body: bytes | None = None
        #: The exact length of the body as framed by the API server's
        #: ``Content-Length`` (which ``read_chunk`` holds it to), ``None`` for
        #: a chunked, close-delimited or absent body: what a relay may declare.
        self.body_length = length if mode == _LENGTH else None
        self.complete = False
        self._mode = mode
        self._remaining = length
        self._need_crlf = False
        self._reusable = reusable
        self._writer = writer

    async def __aenter__(self) -> PooledResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` once it is complete.

        ``UpstreamError`` (502) when the connection breaks or the framing is
        wrong; the connection is then aborted.
        """
        if self.complete:
            return b""
        conn = self._conn
        assert conn is not None
        try:
            if self._mode == _LENGTH:
                data = await conn.read_some(self._remaining)
                self._remaining -= len(data)
                if not self._remaining:
                    self._finish()
                return data
            if self._mode == _CHUNKED:
                return await self._read_chunked(conn)
            if self._mode == _UNTIL_CLOSE:
                try:
                    return await conn.read_some(1 << 20)
                except _Lost:
                    self._reusable = False
                    self._finish()
                    return b""
        except _Lost as err:
            self.close()
            raise UpstreamError(
                "upstream: connection lost in the response body", status=502
            ) from err
        except _Malformed as err:
            self.close()
            raise UpstreamError(
                f"upstream: malformed response: {err}", status=502
            ) from err
        self._finish()
        return b""

    async def _read_chunked(self, conn: _Connection) -> bytes:
        while not self._remaining:
            if self._need_crlf:
                if await conn.read_until(b"\r\n", 2):
                    raise _Malformed("chunk not followed by crlf")
                self._need_crlf = False
            line = await conn.read_until(b"\r\n", _MAX_LINE)
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise _Malformed("bad chunk size line")
            size = int(match.group(1), 16)
            if size == 0:
                while await conn.read_until(b"\r\n", _MAX_LINE):
                    pass  # trailers: read and dropped
                self._finish()
                return b""
            self._remaining = size
        data = await conn.read_some(self._remaining)
        self._remaining -= len(data)
        if not self._remaining:
            self._need_crlf = True
        return data

    async def read(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (``UpstreamError`` beyond)."""
        if self.body is not None:
            if len(self.body) > limit:
                raise UpstreamError("upstream: response too large", status=502)
            return self.body
        out = bytearray()
        while chunk := await self.read_chunk():
            out += chunk
            if len(out) > limit:
                self.close()
                raise UpstreamError("upstream: response too large", status=502)
        return bytes(out)

    def _finish(self) -> None:
        self.complete = True
        conn, self._conn = self._conn, None
        writer, self._writer = self._writer, None
        if conn is None:
            return
        written = writer is None or (
            writer.done() and not writer.cancelled() and writer.exception() is None
        )
        if writer is not None and not writer.done():
            writer.cancel()
        self._pool.release(
            conn, reusable=self._reusable and written and not conn.buffer
        )

    def close(self) -> None:
        """Give the connection back if the answer was complete, else abort it."""
        conn, self._conn = self._conn, None
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
        if conn is not None:
            self._pool.release(conn, reusable=False)


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
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.connections_made = 0

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use (tests and metrics)."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool for reuse."""
        return len(self._idle)

    # Connections -----------------------------------------------------------

    async def _acquire(self, connect_timeout: float, *, fresh: bool) -> _Connection:
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
    ) -> _Connection:
        placeholder = _Connection(loop, self.buffer_limit + 65536)
        self._open.add(placeholder)  # holds a slot while connecting
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
        except TimeoutError as err:
            self._forget(placeholder)
            raise UpstreamError("upstream: connect timed out", status=504) from err
        except ssl.SSLError as err:
            self._forget(placeholder)
            raise UpstreamError(
                f"upstream: tls handshake failed: {err.reason}", status=502
            ) from err
        except OSError as err:
            self._forget(placeholder)
            raise UpstreamError(
                f"upstream: cannot connect: {err.strerror or type(err).__name__}",
                status=503,
            ) from err
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

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _discard(self, conn: _Connection, *, abort: bool) -> None:
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

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        """Put ``conn`` back for reuse, or close it (abort unless reusable)."""
        if not reusable or self._closed:
            self._discard(conn, abort=not reusable)
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
            _, late = await asyncio.wait(pending, timeout=_CLOSE_WAIT)
            if late:
                for conn in list(self._open):
                    conn.abort()
                await asyncio.wait(late, timeout=_CLOSE_WAIT)

    # Requests --------------------------------------------------------------

    def head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | BodySource | None,
        *,
        body_length: int | None = None,
    ) -> tuple[bytes, bool]:
        """The request head as bytes, and whether the body goes chunked.

        The framing is ours (``proxy.framing.request_framing``): the length
        of a bytes body, ``body_length`` for a streamed one (which is then
        cut at that length), chunked for a streamed body of unknown length.
        ``headers`` carrying a framing field or ``Host`` are a bug of the
        caller and refused (``ValueError``), so no client's field can ever
        stand beside ours.
        """
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        for name, value in headers:
            if name.lower() in _OURS:
                raise ValueError(f"upstream: {name!r} is the pool's to write")
            lines.append(f"{name}: {value}")
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
        )
        conn = await self._acquire(connect_timeout, fresh=False)
        while True:
            try:
                if head_timeout is None:
                    return await self._exchange(conn, outgoing)
                async with asyncio.timeout(head_timeout):
                    return await self._exchange(conn, outgoing)
            except _Lost as err:
                stale = conn.reused and conn.received == 0
                self._discard(conn, abort=True)
                if not (stale and retry):
                    raise UpstreamError(
                        "upstream: connection lost before the response", status=502
                    ) from err
                retry = False
                conn = await self._acquire(connect_timeout, fresh=True)
            except _Malformed as err:
                self._discard(conn, abort=True)
                raise UpstreamError(
                    f"upstream: malformed response: {err}", status=502
                ) from err
            except TimeoutError as err:
                self._discard(conn, abort=True)
                raise UpstreamError(
                    "upstream: no response in time", status=504
                ) from err
            except BaseException:
                self._discard(conn, abort=True)
                raise

    async def _exchange(self, conn: _Connection, req: _Outgoing) -> PooledResponse:
        conn.received = 0
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
            while True:
                raw = await conn.read_until(b"\r\n\r\n", req.max_head_bytes)
                version, status, reason, headers, mode, length, close = _parse_head(raw)
                if status >= 200:
                    break
                if status == 101:
                    raise _Malformed("unexpected 101 to an ordinary request")
            if req.method == "HEAD" or status in (204, 304):
                mode, length = _NONE, 0
            reusable = version == 1 and not close and mode != _UNTIL_CLOSE
            response = PooledResponse(
                self,
                conn,
                status=status,
                reason=reason,
                headers=headers,
                mode=mode,
                length=length,
                reusable=reusable,
                writer=writer,
            )
            if mode == _NONE or (mode == _LENGTH and length == 0):
                # Nothing to read (HEAD, 204, 304, a zero length): a whole body.
                response.body = b""
                response._finish()
            elif mode == _LENGTH and length <= self.buffer_limit:
                response.body = await conn.read_exactly(length)
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
    conn: _Connection, body: BodySource, chunked: bool, content_length: int | None
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
                    raise _Lost
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


def _parse_head(
    raw: bytes,
) -> tuple[int, int, str, CIMultiDict[str], int, int, bool]:
    """(minor version, status, reason, headers, framing, length, ``close``).

    The head is decoded once (UTF-8, undecodable bytes kept as surrogates, as
    aiohttp decodes each value), checked whole by one expression and split
    into fields by another: a few C calls instead of a match per line.
    """
    text = raw.decode("utf-8", "surrogateescape")
    line_end = text.find("\r\n")
    if line_end < 0:
        line_end = len(text)
    match = _STATUS_LINE.fullmatch(text, 0, line_end)
    if match is None:
        raise _Malformed("bad status line")
    if _FIELDS.fullmatch(text, line_end) is None:
        raise _Malformed("bad header line")
    version = int(match.group(1))
    status = int(match.group(2))
    reason = match.group(3) or ""
    pairs = [
        (name, value.strip(" \t")) for name, value in _FIELD.findall(text, line_end)
    ]
    length: int | None = None
    chunked = False
    close = False
    for name, value in pairs:
        lower = name.lower()
        if lower == "content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                raise _Malformed("bad content-length")
            length = int(value)
        elif lower == "transfer-encoding":
            if chunked or value.lower() != "chunked":
                raise _Malformed("unsupported transfer-encoding")
            chunked = True
        elif lower == "connection" and "close" in (
            t.strip() for t in value.lower().split(",")
        ):
            close = True
    if chunked and length is not None:
        raise _Malformed("both content-length and transfer-encoding")
    if chunked:
        mode, size = _CHUNKED, 0
    elif length is not None:
        mode, size = _LENGTH, length
    else:
        mode, size = _UNTIL_CLOSE, 0
    return version, status, reason, CIMultiDict(pairs), mode, size, close
