"""A strict recording upstream for the framing tests: TLS on 127.0.0.1, every
request parsed by llhttp (``httptools``, Node's parser, in its strict mode),
recorded, and answered with the identity it arrived with.

Why not the aiohttp fake API server: the question is what reached the API
server *on the wire*, request by request, including what a lenient parser
would have joined, split or repaired; llhttp is the reference for that, and
any parse error it reports is kept (``errors``) for the test to fail on.

Each answer is ``200`` with a JSON body ``{"user", "target", "n"}``: the
``Impersonate-User`` the request carried (``""`` without one), its target and
its ordinal, so a client can tell whether the answer it got was for its own
request. ``HEAD`` gets the same head and no body. An upgrade request is
recorded and answered the same way (never ``101``), then the connection is
closed.

Credentials: ``token`` requires ``Authorization: Bearer <token>``;
``client_ca`` requires a client certificate signed by that CA. A request
without the credential is still recorded (that is what a test looks for) and
answered ``401``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httptools
import trustme

__all__ = ["Recorded", "RecordingUpstream", "recording_upstream"]


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as llhttp read it at the upstream."""

    connection: int
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]


@dataclass
class RecordingUpstream:
    ca: trustme.CA
    token: str | None = None
    client_ca: trustme.CA | None = None
    requests: list[Recorded] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0
    _connections: list[_Connection] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def protocol(self) -> asyncio.Protocol:
        conn = _Connection(self, len(self._connections) + 1)
        self._connections.append(conn)
        return conn

    def abort(self) -> None:
        """Drop every connection (the proxy's pool holds them open)."""
        for conn in self._connections:
            if conn.transport is not None:
                conn.transport.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, upstream: RecordingUpstream, number: int) -> None:
        self._upstream = upstream
        self._number = number
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request was recorded and answered (not with a 101): what
            # follows would be the tunnel's, which this upstream never opens.
            self._close()
        except httptools.HttpParserError as err:
            self._upstream.errors.append(f"llhttp: {err}")
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        upstream = self._upstream
        method = self._parser.get_method().decode("ascii")
        record = Recorded(
            connection=self._number,
            method=method,
            target=self._url.decode("latin-1"),
            headers=tuple(self._headers),
            body=bytes(self._body),
        )
        upstream.requests.append(record)
        allowed = True
        if upstream.token is not None:
            allowed = record.values("authorization") == [f"Bearer {upstream.token}"]
        users = record.values("impersonate-user")
        body = json.dumps(
            {
                "user": users[0] if len(users) == 1 else "",
                "target": record.target,
                "n": len(upstream.requests),
            }
        ).encode()
        status = b"200 OK" if allowed else b"401 Unauthorized"
        head = (
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (
                status,
                len(body),
            )
        )
        if self.transport is not None:
            self.transport.write(head if method == "HEAD" else head + body)


@asynccontextmanager
async def recording_upstream(
    ca: trustme.CA, *, token: str | None = None, client_ca: trustme.CA | None = None
) -> AsyncIterator[RecordingUpstream]:
    """A started ``RecordingUpstream``, stopped on exit."""
    upstream = RecordingUpstream(ca=ca, token=token, client_ca=client_ca)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(upstream.protocol, "127.0.0.1", 0, ssl=ctx)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        upstream.abort()
        await server.wait_closed()
