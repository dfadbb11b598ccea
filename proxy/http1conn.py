"""The answering half of a connection of the one HTTP/1.1 listener.

``Connection`` takes what ``proxy.http1read.Reader`` admitted, in order: it
routes a request to its handler (an ``Answer`` at once, or a task), writes
the answer (framing computed here, never copied from a relayed answer),
streams an answer in pieces, hands the connection to a tunnel after ``101``,
and applies the deadlines the listener's sweeper finds passed.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

from proxy import framing, tunnel
from proxy.http1msg import Answer, Request
from proxy.http1read import Listener, Reader, Refusal
from proxy.log import REQUEST_ID, new_request_id

__all__ = ["Connection", "closes_after", "relayed_fields"]

#: The logger of ``proxy.http1``, whose part this was: operators filter on it.
log = logging.getLogger("proxy.http1")

REASONS: Final = {s.value: s.phrase for s in http.HTTPStatus}
#: Fields of a relayed answer this server writes itself (``proxy.framing``).
FRAMING: Final = framing.HOP_BY_HOP | framing.FRAMING


class Connection(Reader):
    """One client connection: parse (llhttp, ``Reader``), dispatch, answer, in order."""

    __slots__ = ()

    def on_message_begin(self) -> None:
        self._parsing = Request("", "", {}, b"", True, conn=self)
        self._url = b""
        self._fields = []
        self._head_bytes = 0
        self._raw_head = 0
        self._framing = 0

    def expire(self) -> None:
        """A deadline passed: 408 for a late body, a cut for a stalled stream,
        otherwise just close."""
        self.deadline = 0.0
        if self._transport is None:
            return
        limits = self._server.limits
        active = self.active
        if active is not None:
            if active.streamed and not active.complete:
                if active.pending:
                    # The handler has not read what came: the pause is ours
                    # (backpressure), not a stalled client.
                    self.deadline = self.loop.time() + limits.body_timeout
                    return
                log.info("connection closed: request body stalled")
                self.abort()
            return
        front = self._queue[0] if self._queue else None
        if isinstance(front, Request):
            self._queue.clear()
            self._closing = True
            self._answer(
                "",
                self._server.refusal(
                    408, f"http: body not received within {limits.body_timeout:g}s"
                ),
                front,
            )
            return
        if self._parsing is not None:
            log.info("connection closed: request head not complete in time")
        self._close_soon()

    # -- streamed answers -------------------------------------------------

    def start_stream(
        self,
        request: Request,
        status: int,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        reason: str,
    ) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("http: the client has gone")
        if self._stream is not None:
            raise RuntimeError("http: an answer is already under way")
        server = self._server
        if server.on_answer is not None:
            server.on_answer("other", status, self._elapsed())
        head = [
            b"HTTP/1.1 %d %s\r\n"
            % (status, (reason or REASONS.get(status, "")).encode("latin-1")),
        ]
        relayed_fields(head, headers, server.date)
        if framing.bodyless(request.method, status):
            self._stream = "none"
            if length is not None and not framing.bodyless("", status):
                # HEAD: the length a GET would have had (RFC 9110 §8.6).
                head.append(b"Content-Length: %d\r\n" % length)
        elif length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
            self._stream = "length"
        elif request.http11:
            head.append(b"Transfer-Encoding: chunked\r\n")
            self._stream = "chunked"
        else:
            self._stream = "close"
        if self._stream == "close" or closes_after(request, server):
            head.append(b"Connection: close\r\n")
            request.keep_alive = False
        head.append(b"\r\n")
        self.queue(b"".join(head))

    async def send(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("http: the client has gone")
        if not data or self._stream == "none":
            return
        # Written at once, after what is queued: a stream's pace is the
        # client's, and backpressure needs the transport to see the bytes.
        if self._stream == "chunked":
            self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out.append(data)
        self.flush()
        while self._paused_writing and self._transport is not None:
            waiter = self._drained = self.loop.create_future()
            await waiter
        if self._transport is None:
            raise ConnectionResetError("http: the client has gone")

    def end_stream(self) -> None:
        if self._transport is None:
            raise ConnectionResetError("http: the client has gone")
        if self._stream == "chunked":
            self.queue(b"0\r\n\r\n")

    def take_over(
        self, request: Request, headers: Iterable[tuple[str, str]], reason: str
    ) -> tunnel.ClientSide:
        """Write the ``101`` head, then hand the transport to a tunnel pipe."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("http: the client has gone")
        if self._stream is not None:
            raise RuntimeError("http: an answer is already under way")
        server = self._server
        if server.on_answer is not None:
            server.on_answer("other", 101, self._elapsed())
        head = [b"HTTP/1.1 101 %s\r\n" % (reason or "Switching Protocols").encode()]
        for key, value in headers:
            head.append(b"%s: %s\r\n" % (key.encode("latin-1"), value.encode()))
        head.append(b"\r\n")
        self.flush()
        transport.write(b"".join(head))
        self._taken = True
        self._stream = "none"
        self.deadline = 0.0
        server.connections.discard(self)
        client = tunnel.ClientSide(transport)
        transport.set_protocol(client)
        early, self._early = bytes(self._early), bytearray()
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if early:
            client.data_received(early)
        return client

    def _process(self) -> None:
        """Answer every request queued, in order, until one must wait."""
        server = self._server
        queue = self._queue
        while self._transport is not None and not self._busy and not self._taken:
            if self._paused_writing:
                break
            if not queue:
                break
            front = queue[0]
            if isinstance(front, Refusal):
                queue.clear()
                self._answer(
                    "",
                    server.refusal(front.status, front.message),
                    method=front.method,
                )
                return
            if not front.streamed and not front.complete:
                self.send_continue(front)
                if not front.due:
                    front.due = self.loop.time() + server.limits.body_timeout
                self.deadline = front.due
                break
            queue.popleft()
            self._dispatch(front)
        if self._transport is None or self._closing:
            return
        if self._busy_throttled():
            self._throttle()
        else:
            self._unthrottle()

    def _dispatch(self, request: Request) -> None:
        self._started = time.perf_counter()
        server = self._server
        route = server.routes.get(request.path, server.default)
        if route is None:
            self._answer("", Answer(404, server.error_body(404, "not found")), request)
            return
        name = request.path.strip("/") if server.on_answer is not None else ""
        if route.methods is not None and request.method not in route.methods:
            allow = ", ".join(sorted(route.methods or ()))
            answer = Answer(
                405,
                server.error_body(405, f"method must be one of: {allow}"),
                headers=(("Allow", allow),),
            )
            self._answer(name, answer, request)
            return
        rid = request.headers.get("x-request-id", "")[:64] or new_request_id()
        token = REQUEST_ID.set(rid)
        try:
            result = route.handler(request)
            if isinstance(result, Answer):
                self._answer(name, result, request)
                return
            # The task copies the context now, request id included.
            task = self.loop.create_task(result)
        except Exception:
            log.exception(
                "unhandled error (likely a bug)", extra={"path": request.path}
            )
            self._answer(name, server.refusal(500, "internal error"), request)
            return
        finally:
            REQUEST_ID.reset(token)
        self._busy = True
        self.active = request
        self._task = task
        self.deadline = (
            self.loop.time() + server.limits.body_timeout
            if request.streamed and not request.complete
            else 0.0
        )
        server.inflight.add(task)
        task.add_done_callback(lambda t: self._finished(t, name, request))

    def _elapsed(self) -> float:
        """Seconds since the request being answered was dispatched (once)."""
        started, self._started = self._started, 0.0
        return time.perf_counter() - started if started else 0.0

    def _finished(
        self, task: asyncio.Task[Answer | None], name: str, request: Request
    ) -> None:
        self._server.inflight.discard(task)
        self._busy = False
        self.active = None
        self._task = None
        if self._taken:
            return
        if task.cancelled():
            self.abort()
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "unhandled error (likely a bug)",
                exc_info=exc,
                extra={"path": request.path},
            )
            if self._stream is not None:
                # Half an answer is out: only cutting the connection is honest.
                self._stream = None
                self.abort()
                return
            answer: Answer | None = self._server.refusal(500, "internal error")
        else:
            answer = task.result()
        if answer is None or self._stream is not None:
            self._stream_finished(request)
        else:
            self._answer(name, answer, request)
        self._process()

    def _stream_finished(self, request: Request) -> None:
        """After a streamed answer: keep the connection, or close it."""
        stream, self._stream = self._stream, None
        transport = self._transport
        if transport is None:
            return
        if stream is None:
            # The handler said it answered but never began: nothing honest
            # can follow on this connection.
            log.error("handler returned no answer (likely a bug)")
            transport.abort()
            return
        if stream == "close" or closes_after(request, self._server):
            self._close_soon()
            return
        self._after_answer()

    def _after_answer(self) -> None:
        """The connection waits for its next request head."""
        self.deadline = self.loop.time() + self._server.limits.head_timeout

    def _answer(
        self,
        name: str,
        answer: Answer,
        request: Request | None = None,
        *,
        method: str = "",
    ) -> None:
        server = self._server
        transport = self._transport
        if server.on_answer is not None:
            server.on_answer(name or "other", answer.status, self._elapsed())
        if transport is None:
            return
        close = answer.close or request is None or closes_after(request, server)
        status = answer.status
        body = answer.body
        if request is not None:
            method = request.method
        head = [
            b"HTTP/1.1 %d %s\r\n"
            % (status, (answer.reason or REASONS.get(status, "")).encode("latin-1"))
        ]
        if answer.content_type is not None:
            head.append(
                b"Content-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
                % (answer.content_type.encode(), len(body), server.date())
            )
            for key, value in answer.headers:
                head.append(b"%s: %s\r\n" % (key.encode(), value.encode()))
        else:
            relayed_fields(head, answer.headers, server.date)
            if not framing.bodyless("", status):
                head.append(b"Content-Length: %d\r\n" % len(body))
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if not framing.bodyless(method, status):
            head.append(body)
        self.queue(b"".join(head))
        if close:
            self._close_soon()
            return
        self._after_answer()


def closes_after(request: Request, server: Listener) -> bool:
    """Whether the connection ends with this request's answer (a body not
    read to its end included: the rest of it would have to be read and
    dropped, unbounded, before the next request)."""
    return (
        not request.keep_alive
        or request.upgrade
        or server.draining
        or not request.complete
    )


def relayed_fields(
    head: list[bytes], fields: Iterable[tuple[str, str]], date: Callable[[], bytes]
) -> None:
    """Append a relayed answer's own fields, minus any framing (this server
    frames the body itself, so a second length could never be honest), and a
    ``Date`` unless it has one.
    """
    dated = False
    for key, value in fields:
        lower = key.lower()
        if lower in FRAMING:
            continue
        dated = dated or lower == "date"
        head.append(b"%s: %s\r\n" % (key.encode("latin-1"), value.encode("utf-8")))
    if not dated:
        head.append(b"Date: %s\r\n" % date())
