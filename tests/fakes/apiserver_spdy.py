"""A minimal SPDY/3.1 server session for the fake API server's port-forward.

kubectl port-forward speaks SPDY (tunnelled in WebSocket binary messages since
PortForwardWebsockets, or over a raw ``Upgrade: SPDY/3.1``). This is just
enough of the server side of SPDY/3.1 and of the ``portforward.k8s.io``
stream protocol for kubectl to forward a connection to an echo "pod":

- frames are parsed from a byte stream (``feed``) and written through
  ``send``; SYN_STREAM is answered with SYN_REPLY, PING is echoed,
  SETTINGS / WINDOW_UPDATE / HEADERS are ignored (transfers stay far below
  the 64 KiB initial window), GOAWAY and RST_STREAM end things;
- header blocks are zlib streams primed with SPDY/3's header dictionary, one
  compression context per direction for the whole session;
- kubectl opens, per forwarded connection, an ``error`` stream and a ``data``
  stream (headers ``streamtype``, ``port``, ``requestid``); bytes on a data
  stream are echoed upper-cased, and when kubectl half-closes it (FIN) both of
  that request's streams are closed from our side.

The dictionary is not written out here: ``dictionary_from(binary)`` reads it
out of the kubectl binary under test (it starts with ``options``, ends with
``enq=0.`` and is 1423 bytes). zlib checks it: a header block compressed with
a different dictionary does not decompress (its DICTID would not match).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SpdySession", "dictionary_from"]

_VERSION = 3
_SYN_STREAM = 1
_SYN_REPLY = 2
_RST_STREAM = 3
_PING = 6
_GOAWAY = 7
_FLAG_FIN = 0x01
_DICT_START = b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post"
_DICT_END = b"enq=0."
_DICT_SIZE = 1423


def dictionary_from(binary: str | Path) -> bytes | None:
    """SPDY/3's zlib header dictionary, as embedded in a Go SPDY client."""
    data = Path(binary).read_bytes()
    start = data.find(_DICT_START)
    if start < 0:
        return None
    end = data.find(_DICT_END, start)
    if end < 0 or end + len(_DICT_END) - start != _DICT_SIZE:
        return None
    return data[start : end + len(_DICT_END)]


@dataclass
class _Stream:
    stream_type: str
    request_id: str
    port: int
    closed: bool = False


@dataclass
class SpdySession:
    """Server side of one SPDY session; ``send`` writes bytes to the peer."""

    dictionary: bytes
    send: Callable[[bytes], Awaitable[None]]
    streams: dict[int, _Stream] = field(default_factory=dict)
    received: bytearray = field(default_factory=bytearray)
    ended: bool = False
    _buffer: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._inflate = zlib.decompressobj(zdict=self.dictionary)
        self._deflate = zlib.compressobj(zdict=self.dictionary)

    async def feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 8:
            length = int.from_bytes(self._buffer[5:8], "big")
            if len(self._buffer) < 8 + length:
                return
            frame = bytes(self._buffer[: 8 + length])
            del self._buffer[: 8 + length]
            await self._frame(frame)

    async def _frame(self, frame: bytes) -> None:
        flags = frame[4]
        payload = frame[8:]
        if not frame[0] & 0x80:
            stream_id = struct.unpack(">I", frame[:4])[0] & 0x7FFFFFFF
            await self._data(stream_id, flags, payload)
            return
        kind = struct.unpack(">H", frame[2:4])[0]
        if kind == _SYN_STREAM:
            stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            headers = self._headers(payload[10:])
            self.streams[stream_id] = _Stream(
                stream_type=headers.get("streamtype", ""),
                request_id=headers.get("requestid", ""),
                port=int(headers.get("port", "0") or 0),
            )
            await self._control(
                _SYN_REPLY, 0, struct.pack(">I", stream_id) + self._block({})
            )
        elif kind == _PING:
            await self._control(_PING, 0, payload[:4])
        elif kind == _RST_STREAM:
            self.streams.pop(struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF, None)
        elif kind == _GOAWAY:
            self.ended = True

    async def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.stream_type == "data" and payload:
            self.received += payload
            await self._send_data(stream_id, payload.upper())
        if flags & _FLAG_FIN and stream.stream_type == "data":
            for sid, other in self.streams.items():
                if other.request_id == stream.request_id and not other.closed:
                    other.closed = True
                    await self._send_data(sid, b"", fin=True)

    def _headers(self, block: bytes) -> dict[str, str]:
        raw = self._inflate.decompress(block)
        (count,) = struct.unpack(">I", raw[:4])
        offset = 4
        headers: dict[str, str] = {}
        for _ in range(count):
            (n,) = struct.unpack(">I", raw[offset : offset + 4])
            name = raw[offset + 4 : offset + 4 + n].decode()
            offset += 4 + n
            (v,) = struct.unpack(">I", raw[offset : offset + 4])
            value = raw[offset + 4 : offset + 4 + v].decode()
            offset += 4 + v
            headers[name] = value
        return headers

    def _block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for name, value in headers.items():
            raw += struct.pack(">I", len(name)) + name.encode()
            raw += struct.pack(">I", len(value)) + value.encode()
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    async def _control(self, kind: int, flags: int, payload: bytes) -> None:
        head = struct.pack(">HH", 0x8000 | _VERSION, kind)
        await self.send(
            head + bytes([flags]) + len(payload).to_bytes(3, "big") + payload
        )

    async def _send_data(
        self, stream_id: int, payload: bytes, *, fin: bool = False
    ) -> None:
        head = struct.pack(">I", stream_id & 0x7FFFFFFF)
        flags = _FLAG_FIN if fin else 0
        await self.send(
            head + bytes([flags]) + len(payload).to_bytes(3, "big") + payload
        )
