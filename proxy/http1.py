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

The parts: ``proxy.http1msg`` holds the values (``Request``, ``Answer``,
``Limits``, ``Route``), ``proxy.http1read`` a connection's reading half (llhttp
and the policy above), ``proxy.http1conn`` its answering half; this module is
the ``Server`` (listening, the sweeper, the drain) and re-exports the values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from proxy.http1conn import Connection
from proxy.http1msg import Answer, BodyError, Handler, Limits, Request, Route
from proxy.http1read import Listener

__all__ = ["Answer", "BodyError", "Handler", "Limits", "Request", "Route", "Server"]

log = logging.getLogger(__name__)


class Server(Listener):
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
        super().__init__(
            routes,
            limits=limits,
            error_body=error_body,
            on_answer=on_answer,
            default=default,
        )
        #: Set when the drain begins: long-running answers (watches, tunnels)
        #: end themselves cleanly rather than hold the grace period.
        self.stopping = asyncio.Event()
        #: Called once the drain is over (say, to report what a log limiter
        #: held back).
        self.on_drained: list[Callable[[], None]] = []
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

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
            lambda: Connection(self),
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
