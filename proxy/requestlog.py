"""The one line per request, and the limiter of refusals' lines.

``RequestLog`` renders a request's info line straight onto the batching
handler when nothing else would see the record; ``RefusalLimiter`` keeps a
flood of refused requests from buying a line each.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol

from mypy_extensions import mypyc_attr

from proxy.jsontext import compact
from proxy.logformat import REQUEST_ID, JSONFormatter
from proxy.logwriter import LoopBatchingHandler

__all__ = ["Cause", "EventLog", "RefusalLimiter", "RequestLog", "live_limiters"]


class RequestLog:
    """The one info line per request (a review, a proxied call), rendered directly.

    Through ``Logger.info`` such a line cost about 10 µs: a ``LogRecord``, the
    handler chain and its lock, the formatter sorting the record's attributes
    back into fields. A sixth of a cached token review. When logging is set up
    the way ``configure_logging`` sets it up (one batching JSON handler on the
    root logger, no filters or handlers of its own on the way there) this
    renders the same JSON line from the fields and queues it directly;
    otherwise (text format, a test's capture handler, filters) it goes through
    ``Logger.info`` as any other line, so nothing that watches logging misses
    it. Either way the line is the same.
    """

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def info(self, event: str, fields: dict[str, Any]) -> None:
        """Log ``event`` with ``fields`` at info level."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self._direct()
        if handler is None:
            logger.info(event, extra=fields)
            return
        formatter = handler.formatter
        assert isinstance(formatter, JSONFormatter)
        out = formatter.head(time.time(), "info", logger.name, event)
        out.update(fields)
        handler.queue_line(compact(out))

    def _direct(self) -> LoopBatchingHandler | None:
        """The handler to queue on directly, if nothing else would see the record."""
        root = logging.root
        if len(root.handlers) != 1 or root.filters:
            return None
        handler = root.handlers[0]
        if (
            type(handler) is not LoopBatchingHandler
            or type(handler.formatter) is not JSONFormatter
            or handler.filters
            or handler.level > logging.INFO
        ):
            return None
        node: logging.Logger | None = self._logger
        while node is not None and node is not root:
            if node.handlers or node.filters or not node.propagate:
                return None
            node = node.parent
        return handler


#: A refusal's cause: the (field, value) pairs its summary line carries.
Cause = tuple[tuple[str, Any], ...]


class EventLog(Protocol):
    """Where a ``RefusalLimiter`` reports (a ``RequestLog``)."""

    def info(self, event: str, fields: dict[str, Any]) -> None:
        """Log ``event`` with ``fields`` at info level."""


# Plain Python when compiled: ``_LIMITERS`` holds weak references to it, which
# mypyc's native classes do not support.
@mypyc_attr(native_class=False)
class RefusalLimiter:
    """At most ``limit`` full log lines per cause and second; the rest counted.

    Why: a client that replays a refused token, or a flood of forged ones,
    would otherwise buy one log line per request. That line is the largest
    single part of what a remembered refusal costs (about a quarter of its
    CPU), and a flood of them can fill the log pipeline that operators need
    to see everything else. Go services get the same protection from zap's
    sampler (the first N entries per message and second); unlike it, nothing
    is lost silently here: for each cause that went over its limit in a
    period, one ``refusals not logged`` line says how many were left out, at
    the period's end (or when ``flush_logs`` runs at exit). The metrics count
    every refusal, and accepted requests are never limited: each of them is
    logged, as an audit trail needs.

    A cause is a small tuple of (field, value) pairs chosen by the caller
    (status and reason, never the token). Causes are tracked per period and
    at most ``max_causes`` of them: past that a new cause is logged in full,
    so a flood of distinct causes cannot hide one. ``limit`` 0 logs every
    refusal.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_counts",
        "_ends",
        "_limit",
        "_log",
        "_max_causes",
        "_period",
        "_timer",
    )

    def __init__(
        self,
        log: EventLog,
        *,
        limit: int,
        period: float = 1.0,
        max_causes: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._limit = limit
        self._period = period
        self._max_causes = max_causes
        self._clock = clock
        self._counts: dict[Cause, int] = {}
        self._ends = 0.0
        self._timer: asyncio.TimerHandle | None = None
        _LIMITERS.add(self)

    def admit(self, cause: Cause) -> bool:
        """Whether this refusal gets its full line (else it is only counted)."""
        if self._limit <= 0:
            return True
        now = self._clock()
        if now >= self._ends:
            self.flush()
            self._ends = now + self._period
        counts = self._counts
        seen = counts.get(cause, 0)
        if seen < self._limit:
            if seen or len(counts) < self._max_causes:
                counts[cause] = seen + 1
            return True
        counts[cause] = seen + 1
        if self._timer is None:
            self._schedule(self._ends - now)
        return False

    def flush(self) -> None:
        """Log the counts of the refusals left out so far, and start afresh."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        limit = self._limit
        left_out = [
            (cause, seen - limit) for cause, seen in counts.items() if seen > limit
        ]
        if not left_out:
            return
        # Called while some request is being answered, the summary is not
        # about that request: it must not carry its id.
        context = REQUEST_ID.set("")
        try:
            for cause, count in left_out:
                fields = dict(cause)
                fields["not_logged"] = count
                fields["period_s"] = self._period
                self._log.info("refusals not logged", fields)
        finally:
            REQUEST_ID.reset(context)

    def _schedule(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # reported at the next period, or by flush_logs at exit
        self._timer = loop.call_later(max(delay, 0.0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.flush()
        self._ends = 0.0


#: Every limiter alive, so ``flush_logs`` reports what each left out.
_LIMITERS: Final[weakref.WeakSet[RefusalLimiter]] = weakref.WeakSet()


def live_limiters() -> list[RefusalLimiter]:
    """Every limiter alive (``flush_logs`` reports what each left out)."""
    return list(_LIMITERS)
