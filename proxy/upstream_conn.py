"""One connection of the upstream pool, and the answer read on it by llhttp.

What ``proxy.upstream_pool`` sends goes out on a ``Connection`` and its answer
comes back as a ``PooledResponse`` (or, after ``101``, an ``Upgraded`` pipe).

Answers we read: llhttp (``httptools.HttpResponseParser``, the parser Node.js
ships, in its strict mode: no leniency is turned on) parses the status line,
the header fields and the body's framing (``Content-Length``, ``chunked`` with
its extensions and trailers dropped, or the end of the connection), and skips
the body of ``204`` and ``304``. This module adds only policy on top:

- ``HTTP/1.0`` or ``1.1`` only (llhttp also takes ``0.9`` and ``2.0``);
- ``Transfer-Encoding`` exactly ``chunked``, once (llhttp takes ``gzip,
  chunked``, or reads to the end of the connection after ``chunked, gzip``);
  with ``Content-Length`` it is refused by llhttp already, as are duplicate
  lengths, obs-fold, bare LF and bad chunk sizes;
- the head within ``max_head_bytes`` (names + values + 4 per field, and every
  byte received while the head is incomplete);
- informational ``1xx`` answers are skipped (one with framing fields is
  refused); a ``101`` is an error unless the request was an upgrade, and then
  needs ``Connection: upgrade`` and ``Upgrade`` (llhttp's own test);
- the answer to ``HEAD`` has no body. httptools cannot tell llhttp so (its
  ``on_headers_complete`` cannot return llhttp's skip-body), so parsing stops
  at the end of the head and that connection is never reused;
- header values are decoded as aiohttp decodes them (UTF-8, undecodable bytes
  kept as surrogates), blanks around them stripped.

Anything malformed is ``UpstreamError`` (502) and the connection is aborted.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final, Protocol, cast

import httptools
from multidict import CIMultiDict

from proxy.errors import UpstreamError

__all__ = [
    "CLOSE_WAIT",
    "Connection",
    "Lost",
    "Malformed",
    "PooledResponse",
    "Releaser",
    "Upgraded",
]

#: Seconds a polite close (TLS shutdown) may take before the connection is aborted.
CLOSE_WAIT: Final = 1.0
_VERSIONS: Final = frozenset({"1.0", "1.1"})


class Releaser(Protocol):
    """Where a response gives its connection back (``ConnectionPool``)."""

    def release(self, conn: Connection, *, reusable: bool) -> None:
        """Take ``conn`` back: pooled again when ``reusable``, else closed."""


class Malformed(Exception):
    """The answer breaks HTTP/1.1 or our policy; the connection cannot be trusted."""


class Lost(Exception):
    """The connection ended (or was reset) before the answer was complete."""


class _Stop(Exception):
    """Raised in a parser callback to make llhttp stop (the reason is recorded)."""


class Connection(asyncio.Protocol):
    """One connection: llhttp fed from ``data_received``, the answer's head and
    body kept for the reader (uvicorn's ``httptools_impl`` is the model, on
    the client side), or raw bytes once upgraded.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int) -> None:
        self._loop = loop
        self._high = high_water
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.eof = False
        self.error: BaseException | None = None
        self.received = 0
        self.reused = False
        self.idle_since = 0.0
        #: The pool's TLS generation when this connection was made: one made
        #: with a client certificate since rotated is not reused.
        self.tls_generation = 0
        self.lost = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        #: An exchange is under way (bytes are expected).
        self.busy = False
        #: Something the exchange did not account for arrived (bytes after
        #: the answer, or a parse stopped early): never reuse.
        self.spoilt = False
        #: After ``101``: the tunnel's bytes.
        self.upgraded = False
        self.raw = bytearray()
        # The exchange (reset by ``begin``).
        self._head_only = False
        self._upgrade = False
        self._max_head = 0
        self._head_bytes = 0
        self._fed = 0
        self._informational = False
        self.failure: str | None = None
        self.head_done = False
        self.done = False
        self.status = 0
        self.reason = b""
        self.fields: list[tuple[str, str]] = []
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = False
        self.body: collections.deque[bytes] = collections.deque()
        self._queued = 0

    def begin(self, *, head_only: bool, upgrade: bool, max_head: int) -> None:
        """Expect the answer to a request just written."""
        self.busy = True
        self.received = 0
        self._head_only = head_only
        self._upgrade = upgrade
        self._max_head = max_head
        self._head_bytes = self._fed = 0
        self._informational = False
        self.failure = None
        self.head_done = self.done = False
        self.keep_alive = False
        self.body.clear()
        self._queued = 0

    # asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.upgraded:
            self.raw += data
            self._pause_above(len(self.raw))
        elif not self.busy or self.done or self.failure is not None:
            self.spoilt = True  # nothing asked for these bytes
        else:
            self._feed(data)
        self._wake()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Only after on_headers_complete accepted a 101 (it refuses others).
            self.upgraded = True
            self.raw += data[upgrade.args[0] :]
            self._pause_above(len(self.raw))
            return
        except httptools.HttpParserError as err:
            if self.done:
                self.spoilt = True
            elif self.failure is None:
                self.failure = str(err).lower() or type(err).__name__
            return
        if not self.head_done:
            self._fed += len(data)
            if self._fed > self._max_head:
                self.failure = "head too long"

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        self._ended()
        if not self.lost.done():
            self.lost.set_result(None)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _ended(self) -> None:
        self.eof = True
        if (
            self.head_done
            and not self.done
            and not self.upgraded
            and self.length is None
            and not self.chunked
        ):
            # llhttp reads such a body to the end of the connection, and
            # httptools has no call to tell it the end came (llhttp_finish).
            self.done = self.spoilt = True
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # llhttp's callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self.spoilt = True  # a second answer to one request
            raise _Stop
        self.reason = b""
        self.fields = []
        self.length = None
        self.chunked = False

    def on_status(self, status: bytes) -> None:
        self.reason += status
        self._head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field: read and dropped
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            self._refuse("head too long")
        lower = name.lower()
        if lower == b"content-length":
            # llhttp refused a second one and anything but digits.
            self.length = int(value)
        elif lower == b"transfer-encoding":
            if self.chunked or value.strip(b" \t").lower() != b"chunked":
                self._refuse("unsupported transfer-encoding")
            self.chunked = True
        self.fields.append(
            (name.decode(), value.decode("utf-8", "surrogateescape").strip(" \t"))
        )

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser.get_http_version() not in _VERSIONS:
            self._refuse("unsupported http version")
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    self._refuse("unexpected 101 to an ordinary request")
                if not parser.should_upgrade():
                    self._refuse("101 without connection: upgrade")
            elif self.length is not None or self.chunked:
                self._refuse("framing on an informational answer")
            else:
                self._informational = True
                return
        self.status = status
        self.keep_alive = parser.get_http_version() == "1.1" and (
            parser.should_keep_alive()
        )
        self.head_done = True
        if self._head_only:
            self.done = self.spoilt = True
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self._queued += len(body)
        self._pause_above(self._queued)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.done = True

    def _refuse(self, reason: str) -> None:
        self.failure = reason
        raise _Stop(reason)

    # Reading ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _pause_above(self, queued: int) -> None:
        if queued > self._high and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _resume_below(self, queued: int) -> None:
        if self._paused and queued < self._high // 2 and not self.eof:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    async def read_head(self) -> None:
        """Wait for the answer's final head; ``Malformed`` or ``Lost``."""
        while True:
            if self.failure is not None:
                raise Malformed(self.failure)
            if self.head_done:
                return
            if self.eof:
                raise Lost
            await self._wait()

    async def read_body(self) -> bytes:
        """The body's next bytes, ``b""`` once it is complete."""
        while True:
            body = self.body
            if body:
                data = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                self._queued = 0
                self._resume_below(0)
                return data
            if self.failure is not None:
                raise Malformed(self.failure)
            if self.done:
                return b""
            if self.eof:
                raise Lost
            await self._wait()

    async def read_raw(self) -> bytes:
        """After ``101``: the bytes received, ``b""`` at the end."""
        while not self.raw:
            if self.eof:
                return b""
            await self._wait()
        data = bytes(self.raw)
        self.raw.clear()
        self._resume_below(0)
        return data

    # Writing ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise Lost
        self.transport.write(data)

    async def drain(self) -> None:
        while self._write_paused:
            if self.eof:
                raise Lost
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        if self.eof:
            raise Lost

    # Life ------------------------------------------------------------------

    def usable_idle(self, now: float, keepalive: float) -> bool:
        return (
            not self.eof
            and not self.spoilt
            and not self.busy
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
    automatic once the body is read completely); ``async with`` does it. A
    ``101`` to an upgrade is taken over with ``detach``.
    """

    __slots__ = (
        "_conn",
        "_pool",
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
        pool: Releaser,
        conn: Connection,
        *,
        bodyless: bool,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self.status = conn.status
        self.reason = conn.reason.decode("utf-8", "surrogateescape")
        self.headers = CIMultiDict(conn.fields)
        self.body: bytes | None = None
        #: The exact length of the body as framed by the API server's
        #: ``Content-Length`` (which llhttp holds it to), ``None`` for a
        #: chunked, close-delimited or absent body: what a relay may declare.
        self.body_length = (
            None if bodyless or conn.chunked or self.status == 101 else conn.length
        )
        self.complete = False
        self._writer = writer

    async def __aenter__(self) -> PooledResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` once it is complete.

        ``UpstreamError`` (502) when the connection breaks or the framing is
        wrong; the connection is then aborted. Safe to cancel (an idle limit).
        """
        conn = self._conn
        if self.complete or conn is None:
            return b""
        try:
            data = await conn.read_body()
        except Lost as lost:
            self.close()
            raise UpstreamError(
                "upstream: connection lost in the response body", status=502
            ) from lost
        except Malformed as malformed:
            self.close()
            raise UpstreamError(
                f"upstream: malformed response: {malformed}", status=502
            ) from malformed
        if not data or (conn.done and not conn.body):
            self._finish()
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

    def detach(self) -> Upgraded:
        """Take over the connection after ``101 Switching Protocols``."""
        conn, self._conn = self._conn, None
        if self.status != 101 or conn is None or not conn.upgraded:
            raise RuntimeError("upstream: only a 101 is detached, once")
        self.complete = True
        return Upgraded(conn)

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
        reusable = conn.keep_alive and written and not conn.spoilt
        conn.busy = False
        self._pool.release(conn, reusable=reusable)

    def close(self) -> None:
        """Give the connection back if the answer was complete, else abort it."""
        conn, self._conn = self._conn, None
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
        if conn is not None:
            self._pool.release(conn, reusable=False)


class Upgraded:
    """The API server's side of a tunnel, after ``101``: bytes both ways on the
    connection the upgrade was asked on (``proxy.tunnel`` relays them).
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def read(self) -> bytes:
        """The bytes received since the last read (first: those that came
        with the ``101``); ``b""`` once the API server closed. Reading pauses
        while about the pool's buffer bound waits unread.
        """
        return await self._conn.read_raw()

    def write(self, data: bytes) -> None:
        """Send bytes (``ConnectionResetError`` once the connection is gone)."""
        try:
            self._conn.write(data)
        except Lost as err:
            raise ConnectionResetError("upstream: tunnel connection lost") from err

    async def drain(self) -> None:
        """Wait while the transport's write buffer is full."""
        try:
            await self._conn.drain()
        except Lost as err:
            raise ConnectionResetError("upstream: tunnel connection lost") from err

    async def close(self) -> None:
        """Close the connection: politely, aborting if TLS shutdown stalls."""
        conn = self._conn
        conn.close()
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await asyncio.shield(conn.lost)
        except TimeoutError:
            conn.abort()
