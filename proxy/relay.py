"""Relaying an admitted request to the API server and its answer back.

Three shapes, chosen by ``proxy.impersonate``:

- ``forward``: an ordinary request, answered whole when the API server's
  body is small and has a length, relayed piece by piece otherwise; the
  whole exchange within ``request_timeout``.
- ``forward_stream``: a long-running request (watch, log stream): no total
  timeout, only the head's and, while streaming, ``stream_idle_timeout``; it
  ends cleanly (a proper end of body) when the server drains.
- ``forward_upgrade``: exec, attach, port-forward: a ``101`` hands both
  connections to ``proxy.tunnel`` (``tunnel_idle_timeout``); any other answer
  is relayed whole (kubectl reads it to fall back from WebSocket to SPDY).

Every request goes through the one upstream client (``proxy.upstream_pool``);
bodies are relayed chunk by chunk with backpressure, never buffered whole.
The request's ``Entry`` (``proxy.access``) gets its status, byte counts and
outcome as they happen, so a relay cut short still logs what it did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from proxy import http1, tunnel
from proxy.access import Entry, Recorder
from proxy.audit.auditor import AuditContext
from proxy.audit.event import RESPONSE_OBJECT_NOTE
from proxy.errors import UpstreamError
from proxy.headers import response_headers
from proxy.upstream import Upstream
from proxy.upstream_pool import PooledResponse

__all__ = ["Relay", "RelaySettings"]

# The events keep the logger they had before the relay was split out of
# proxy.impersonate, so that filters on it keep working.
log = logging.getLogger("proxy.impersonate")

_MAX_ERROR_BODY: Final = 1024 * 1024


class RelaySettings(Protocol):
    """The limits a relay reads (``proxy.impersonate.ProxySettings`` has them)."""

    @property
    def connect_timeout(self) -> float:
        """Seconds to open a connection to the API server."""
        ...

    @property
    def request_timeout(self) -> float:
        """Seconds for a whole ordinary request, and any response head."""
        ...

    @property
    def stream_idle_timeout(self) -> float:
        """Seconds without a byte after which a stream ends (0: never)."""
        ...

    @property
    def tunnel_idle_timeout(self) -> float:
        """Seconds without a byte either way after which a tunnel closes."""
        ...

    @property
    def max_header_bytes(self) -> int:
        """Largest response head accepted from the API server."""
        ...


class _UpstreamBroken(Exception):
    """The API server failed after the response head was relayed."""


class _ClientLeft(Exception):
    """The client went away while the response was being relayed."""


class Relay:
    """The upstream exchange of an admitted request, in its three shapes."""

    def __init__(
        self,
        upstream: Upstream,
        settings: RelaySettings,
        recorder: Recorder,
        stopping: asyncio.Event | None,
    ) -> None:
        self._upstream = upstream
        self._settings = settings
        self._recorder = recorder
        self._stopping = stopping

    async def _fetch(
        self, request: http1.Request, headers: list[tuple[str, str]], entry: Entry
    ) -> PooledResponse:
        """Send a request upstream; the answer once its head is in.

        A whole body is sent as bytes (the pool declares exactly its length);
        a streamed one is copied as it arrives, under the length the client
        declared (llhttp read the body by it) or chunked.
        """
        settings = self._settings
        body: bytes | http1.Request | None = request.body or None
        length: int | None = None
        if request.streamed:
            body = request
            declared = request.headers.get("content-length")
            length = int(declared) if declared is not None else None
        return await self._upstream.fetch(
            request.method,
            request.target,
            headers=headers,
            body=body,
            body_length=length,
            connect_timeout=settings.connect_timeout,
            max_head_bytes=settings.max_header_bytes,
            passthrough=entry.mode == "passthrough",
        )

    async def forward(
        self, request: http1.Request, headers: list[tuple[str, str]], entry: Entry
    ) -> http1.Answer | None:
        """An ordinary request: answered whole when the API server's body is
        small and has a length, relayed piece by piece otherwise; the whole
        exchange within ``request_timeout``.
        """
        settings = self._settings
        started = False
        try:
            async with asyncio.timeout(settings.request_timeout):
                upstream = await self._fetch(request, headers, entry)
                async with upstream:
                    self._recorder.count_upstream(str(upstream.status))
                    relayed = tuple(
                        response_headers(
                            upstream.headers, audit_id=entry.audit_id
                        ).items()
                    )
                    entry.status = upstream.status
                    if request.method == "HEAD":
                        # RFC 9110 §8.6: the length a GET would have had.
                        request.start_stream(
                            upstream.status,
                            relayed,
                            length=_declared_length(request.method, upstream),
                            reason=upstream.reason,
                        )
                        request.end_stream()
                        return None
                    body = upstream.body
                    audit = entry.audit
                    if body is not None:
                        entry.bytes_out = len(body)
                        if audit is not None:
                            _audit_answer(audit, upstream, body)
                        return http1.Answer(
                            upstream.status,
                            body,
                            relayed,
                            content_type=None,
                            reason=upstream.reason,
                        )
                    request.start_stream(
                        upstream.status,
                        relayed,
                        length=upstream.body_length,
                        reason=upstream.reason,
                    )
                    started = entry.prepared = True
                    if audit is not None and audit.wants_response_body:
                        audit.annotate(
                            RESPONSE_OBJECT_NOTE, "omitted: streamed response body"
                        )
                    await _relay_pooled(upstream, request.send, entry)
                    request.end_stream()
        except (TimeoutError, _UpstreamBroken, _ClientLeft, ConnectionError) as err:
            _relay_ended(err, started, request.abort, entry)
        return None

    async def forward_stream(
        self, request: http1.Request, headers: list[tuple[str, str]], entry: Entry
    ) -> http1.Answer | None:
        """A long-running request (watch, log stream): no total timeout, only
        the head's and, while streaming, the idle one; it ends cleanly when
        the server drains.
        """
        settings = self._settings
        recorder = self._recorder
        started = False
        try:
            async with asyncio.timeout(settings.request_timeout):
                upstream = await self._fetch(request, headers, entry)
            async with upstream:
                recorder.count_upstream(str(upstream.status))
                request.start_stream(
                    upstream.status,
                    tuple(
                        response_headers(
                            upstream.headers, audit_id=entry.audit_id
                        ).items()
                    ),
                    length=upstream.body_length,
                    reason=upstream.reason,
                )
                entry.status = upstream.status
                started = entry.prepared = True
                recorder.stream_started(entry)
                try:
                    if not await self._copy_until_stopped(upstream, request, entry):
                        # End the chunked body properly: a watch client
                        # sees the stream end and re-watches elsewhere.
                        entry.outcome = "shutdown"
                    request.end_stream()
                finally:
                    recorder.stream_ended(entry)
        except (TimeoutError, _UpstreamBroken, _ClientLeft, ConnectionError) as err:
            _relay_ended(err, started, request.abort, entry)
        return None

    async def _copy_until_stopped(
        self, upstream: PooledResponse, request: http1.Request, entry: Entry
    ) -> bool:
        """Relay a stream's body; ``False`` if the server began to drain first."""
        stopping = self._stopping
        copy = asyncio.ensure_future(self._copy_body(upstream, request.send, entry))
        if stopping is None:
            await copy
            return True
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({copy, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (copy, stop):
                if not task.done():
                    task.cancel()
            await asyncio.wait({copy, stop})
        if copy.cancelled():
            return False
        copy.result()
        return True

    async def _copy_body(
        self,
        upstream: PooledResponse,
        write: Callable[[bytes], Awaitable[None]],
        entry: Entry,
    ) -> None:
        """Relay a stream's body until it ends or nothing comes for
        ``stream_idle_timeout`` (``entry.outcome`` then says ``idle``).
        """
        if upstream.body is not None:  # read whole with the head
            await _write_to(write, upstream.body, entry)
            return
        idle = self._settings.stream_idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle if idle > 0 else None):
                    chunk = await upstream.read_chunk()
            except TimeoutError:
                entry.outcome = "idle"
                return
            except UpstreamError as err:
                log.warning("upstream stream broke", extra={"detail": str(err)})
                raise _UpstreamBroken from err
            if not chunk:
                return
            await _write_to(write, chunk, entry)

    async def forward_upgrade(
        self,
        request: http1.Request,
        headers: list[tuple[str, str]],
        entry: Entry,
        upgrade: str,
    ) -> http1.Answer | None:
        """An upgrade: a ``101`` becomes a tunnel, anything else is relayed."""
        settings = self._settings
        recorder = self._recorder
        answer = await self._upstream.upgrade(
            request.method,
            request.target,
            headers=headers,
            protocol=upgrade,
            connect_timeout=settings.connect_timeout,
            head_timeout=settings.request_timeout,
            max_head_bytes=settings.max_header_bytes,
            passthrough=entry.mode == "passthrough",
        )
        recorder.count_upstream(str(answer.status))
        if answer.status != 101:
            return await self._upgrade_refused(answer, entry)
        pipe = answer.detach()
        try:
            client = request.upgrade_to(
                response_headers(
                    answer.headers, upgrade=True, audit_id=entry.audit_id
                ).items(),
                reason=answer.reason,
            )
        except ConnectionError:
            await pipe.close()
            entry.outcome = "client_closed"
            return None
        entry.status = 101
        entry.prepared = True
        recorder.stream_started(entry)
        try:
            result = await tunnel.relay(
                client,
                pipe,
                idle_seconds=settings.tunnel_idle_timeout,
                stop=self._stopping,
            )
        finally:
            recorder.stream_ended(entry)
            client.close()
            await pipe.close()
        entry.bytes_in = result.bytes_to_upstream
        entry.bytes_out = result.bytes_to_client
        if result.closed_by not in ("client", "upstream"):
            entry.outcome = result.closed_by
        return None

    async def _upgrade_refused(
        self, answer: PooledResponse, entry: Entry
    ) -> http1.Answer:
        """Relay a non-101 answer to an upgrade (kubectl reads it to fall back)."""
        async with answer:
            try:
                async with asyncio.timeout(self._settings.request_timeout):
                    body = await answer.read(_MAX_ERROR_BODY)
            except TimeoutError as err:
                raise UpstreamError(
                    "proxy: upgrade answer timed out", status=504
                ) from err
        entry.status = answer.status
        entry.bytes_out = len(body)
        if entry.audit is not None:
            _audit_answer(entry.audit, answer, body)
        return http1.Answer(
            answer.status,
            body,
            tuple(response_headers(answer.headers, audit_id=entry.audit_id).items()),
            content_type=None,
            reason=answer.reason,
        )


def _declared_length(method: str, upstream: PooledResponse) -> int | None:
    """The length to declare for a pooled answer: its body's exact length,
    or for ``HEAD`` the length the API server declared (RFC 9110 §8.6: what a
    ``GET`` would have had; the pool parsed it as one field of digits).
    """
    if method == "HEAD":
        declared = upstream.headers.get("Content-Length")
        return int(declared) if declared is not None else None
    return upstream.body_length


def _audit_answer(audit: AuditContext, upstream: PooledResponse, body: bytes) -> None:
    """Close the record of a request answered whole: the body is read for a
    failure's ``Status`` message, or recorded at ``RequestResponse``; a
    success's body is not parsed otherwise (a large list costs milliseconds).
    """
    status = upstream.status
    wanted = status >= 300 or audit.wants_response_body
    audit.complete(
        status,
        body if wanted else None,
        upstream.headers.get("Content-Type") if wanted else None,
    )


async def _relay_pooled(
    upstream: PooledResponse,
    write: Callable[[bytes], Awaitable[None]],
    entry: Entry,
) -> None:
    """Copy a pooled answer's body to the client (either lane's ``write``):
    a failure on the API server's side is ``_UpstreamBroken``, on the
    client's ``_ClientLeft``.
    """
    while True:
        try:
            chunk = await upstream.read_chunk()
        except UpstreamError as err:
            log.warning("upstream stream broke", extra={"detail": str(err)})
            raise _UpstreamBroken from err
        if not chunk:
            return
        await _write_to(write, chunk, entry)


async def _write_to(
    write: Callable[[bytes], Awaitable[None]], chunk: bytes, entry: Entry
) -> None:
    """Send a piece of the answer to the client (``_ClientLeft`` if it is gone)."""
    try:
        await write(chunk)
    except (ConnectionError, OSError) as err:
        raise _ClientLeft from err
    entry.bytes_out += len(chunk)


def _relay_ended(
    err: BaseException, answered: bool, abort: Callable[[], None], entry: Entry
) -> None:
    """Record how a relay ended early; a timeout before any answer is a 504.

    ``abort`` cuts the client's connection: a response under way cannot be
    completed honestly.
    """
    if isinstance(err, TimeoutError):
        if not answered:
            raise UpstreamError("proxy: request timed out", status=504) from err
        entry.outcome = "timeout"
        abort()
    elif isinstance(err, _UpstreamBroken):
        entry.outcome = "upstream_error"
        abort()
    else:
        entry.outcome = "client_closed"
