"""Relaying an upgraded connection (exec, attach, port-forward) byte for byte.

After the API server answers an upgrade request with ``101 Switching
Protocols``, neither side speaks HTTP on the connection any more: WebSocket
(``v5.channel.k8s.io``, ``v4.channel.k8s.io``, ``SPDY/3.1+portforward.k8s.io``
tunnelled in WebSocket frames) or raw SPDY/3.1. The proxy does not need to
understand any of them; it copies bytes both ways until either side closes,
and then closes both (what Go's reverse proxy and kube-apiserver's
upgrade-aware handler do).

The client's side
-----------------
``proxy.http1`` reads the upgrade request with llhttp, which stops after it
(anything the client sends next is the tunnel's, not HTTP). The handler calls
``Request.upgrade_to``: the listener writes the ``101`` head and hands the
transport, with the bytes that came after the request, to a ``ClientSide``
(``transport.set_protocol``), so no later byte can reach the HTTP parser. From
then on the transport delivers data, EOF, flow-control and connection-loss
events to ``ClientSide``, which:

- buffers received bytes and pauses reading above a high-water mark, so a fast
  client cannot fill memory while the API server is slow;
- implements ``pause_writing``/``resume_writing`` so writes to a slow client
  wait (backpressure towards the API server).

The API server's side is what ``proxy.upstream_pool`` hands over after the
``101`` (``Upgraded``, the connection the upgrade was asked on, with any bytes
that came after the head): anything with ``read``/``write``/``drain``
(``UpstreamSide``). ``relay`` leaves closing it to the caller.

Limits: one idle timeout (no byte in either direction) ends a tunnel; there is
no total limit, since an ``exec`` session may legitimately last hours. When
either side closes (or half-closes: its end of stream), the tunnel ends and
both sides are closed, as Go's reverse proxy does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Literal, Protocol

__all__ = ["ClientSide", "TunnelResult", "UpstreamSide", "relay"]

#: Client bytes buffered before reading from the client is paused.
_HIGH_WATER: Final = 256 * 1024

ClosedBy = Literal["client", "upstream", "idle", "error", "shutdown"]


class UpstreamSide(Protocol):
    """The API server's side of a tunnel (``proxy.upstream_pool.Upgraded``)."""

    async def read(self) -> bytes:
        """Bytes from the API server; ``b""`` once it has closed."""
        ...

    def write(self, data: bytes) -> None:
        """Send bytes (``ConnectionError`` once the connection is gone)."""
        ...

    async def drain(self) -> None:
        """Wait while the write buffer is full."""
        ...


class ClientSide(asyncio.Protocol):
    """The client's connection after the switch: a small buffered byte pipe."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._reading_paused = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Buffer the bytes; stop reading while the buffer is full."""
        self._buffer += data
        self._readable.set()
        if len(self._buffer) >= _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        """The client is done sending: that ends the tunnel (transport closes)."""
        self._eof = True
        self._readable.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake every waiter: the tunnel ends."""
        self._lost = True
        self._eof = True
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        """The transport's write buffer is full: writers wait."""
        self._writable.clear()

    def resume_writing(self) -> None:
        """The transport drained: writers may continue."""
        self._writable.set()

    # -- pipe ----------------------------------------------------------------------

    async def read(self) -> bytes:
        """Bytes received from the client; ``b""`` once it has closed."""
        while not self._buffer and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._reading_paused and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        """Send bytes to the client, waiting while its buffer is full."""
        if self._lost:
            raise ConnectionResetError("tunnel: client connection lost")
        self._transport.write(data)
        await self._writable.wait()
        if self._lost:
            raise ConnectionResetError("tunnel: client connection lost")

    def close(self) -> None:
        """Close the client's connection (TLS close_notify, then TCP FIN)."""
        if not self._transport.is_closing():
            self._transport.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelResult:
    """How much went each way and which side ended the tunnel (for the log)."""

    bytes_to_upstream: int
    bytes_to_client: int
    closed_by: ClosedBy


class _Activity:
    __slots__ = ("down", "last", "up")

    def __init__(self, now: float) -> None:
        self.up = 0
        self.down = 0
        self.last = now


async def _to_upstream(
    client: ClientSide, upstream: UpstreamSide, activity: _Activity
) -> ClosedBy:
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await client.read()
            if not data:
                return "client"
            upstream.write(data)
            activity.up += len(data)
            activity.last = loop.time()
            await upstream.drain()
    except (ConnectionError, OSError):
        return "error"


async def _to_client(
    upstream: UpstreamSide, client: ClientSide, activity: _Activity
) -> ClosedBy:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await upstream.read()
        except (ConnectionError, OSError):
            return "error"
        if not data:
            return "upstream"
        activity.down += len(data)
        activity.last = loop.time()
        try:
            await client.write(data)
        except ConnectionResetError:
            return "client"
        except (ConnectionError, OSError):
            return "error"


async def relay(
    client: ClientSide,
    upstream: UpstreamSide,
    *,
    idle_seconds: float,
    stop: asyncio.Event | None = None,
) -> TunnelResult:
    """Copy bytes both ways until either side closes, nothing moves for
    ``idle_seconds`` (0: no idle limit) or ``stop`` is set (the server
    drains); then close the client's side.

    ``upstream`` is left for the caller to close.
    """
    loop = asyncio.get_running_loop()
    activity = _Activity(loop.time())
    up = asyncio.create_task(_to_upstream(client, upstream, activity))
    down = asyncio.create_task(_to_client(upstream, client, activity))
    stopped = asyncio.ensure_future(stop.wait() if stop else asyncio.Future())
    closed_by: ClosedBy = "error"
    try:
        while True:
            wait = None
            if idle_seconds > 0:
                wait = max(activity.last + idle_seconds - loop.time(), 0.0)
            done, _ = await asyncio.wait(
                (up, down, stopped),
                timeout=wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if up in done or down in done:
                closed_by = (up if up in done else down).result()
                break
            if stopped in done:
                closed_by = "shutdown"
                break
            if loop.time() - activity.last >= idle_seconds:
                closed_by = "idle"
                break
    finally:
        for task in (up, down, stopped):
            task.cancel()
        await asyncio.wait((up, down, stopped))
        client.close()
    return TunnelResult(
        bytes_to_upstream=activity.up,
        bytes_to_client=activity.down,
        closed_by=closed_by,
    )
