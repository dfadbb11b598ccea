"""A raw HTTP/1.1 upgrade endpoint (TLS, 127.0.0.1) for tunnel tests.

aiohttp's server does not treat ``Upgrade: SPDY/3.1`` as an upgrade, so the
fake API server cannot stand in for kubectl's raw SPDY path; this small asyncio
server can. It checks the proxy's credential, records every request head, and
on success answers ``101`` with ``Upgrade: SPDY/3.1``, sends ``greeting`` and
then echoes every byte upper-cased until the client closes; on ``BYE`` it
closes first. ``refuse`` makes it answer that status with a chunked Status body
instead of upgrading. With ``client_ca`` it requires a client certificate
signed by that CA (``peer_certs`` records what was presented); with ``token``
``None`` it requires that no ``Authorization`` header is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trustme
from multidict import CIMultiDict

__all__ = ["RawUpgradeServer", "serve_raw_upgrade"]


class RawUpgradeServer:
    def __init__(
        self,
        ca: trustme.CA,
        *,
        token: str | None = "proxy-sa-token-1",
        client_ca: trustme.CA | None = None,
    ) -> None:
        self.ca = ca
        self.token = token
        self.client_ca = client_ca
        self.peer_certs: list[dict[str, object] | None] = []
        self.heads: list[tuple[str, CIMultiDict[str]]] = []
        self.refuse: int | None = None
        self.greeting = b"spdy-server-hello"
        self.closed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(ctx)
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(ctx)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.peer_certs.append(writer.get_extra_info("peercert"))
        try:
            await self._conversation(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            self.closed.set()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        self.heads.append((head[0], headers))
        expected = [] if self.token is None else [f"Bearer {self.token}"]
        if headers.getall("Authorization", []) != expected:
            await self._status(writer, 401, "Unauthorized")
            return
        if self.refuse is not None:
            await self._status(writer, self.refuse, "Forbidden")
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n"
            + self.greeting
        )
        await writer.drain()
        while data := await reader.read(65536):
            if data.strip() == b"BYE":
                return
            writer.write(data.upper())
            await writer.drain()

    @staticmethod
    async def _status(writer: asyncio.StreamWriter, code: int, reason: str) -> None:
        body = json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": reason,
                "code": code,
            }
        ).encode()
        half = len(body) // 2
        chunks = f"{half:x}\r\n".encode() + body[:half] + b"\r\n"
        chunks += f"{len(body) - half:x}\r\n".encode() + body[half:] + b"\r\n0\r\n\r\n"
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + chunks
        )
        await writer.drain()


@asynccontextmanager
async def serve_raw_upgrade(
    ca: trustme.CA,
    *,
    token: str | None = "proxy-sa-token-1",
    client_ca: trustme.CA | None = None,
) -> AsyncIterator[RawUpgradeServer]:
    server = RawUpgradeServer(ca, token=token, client_ca=client_ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
