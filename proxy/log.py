"""Logging: one JSON line per event, a request id, and the only token fingerprint.

Modules log a constant event name plus fields (``extra={...}``); this module
renders them. ``fingerprint`` is the one way a token may be referred to in a
log: the first 12 hex digits of its sha256, enough to correlate two lines about
the same token, useless to replay it.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import json
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable
from itertools import islice
from typing import Any, ClassVar, Final, Protocol, TextIO

from mypy_extensions import mypyc_attr

__all__ = [
    "REQUEST_ID",
    "EventLog",
    "JSONFormatter",
    "LoopBatchingHandler",
    "RefusalLimiter",
    "RequestLog",
    "TextFormatter",
    "configure_logging",
    "fingerprint",
    "flush_logs",
    "issuer_hash",
    "new_request_id",
]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "kube_oidc_gate_request_id", default=""
)


class _Process:
    """What each line says about its process, refreshed in a forked child.

    The pid is read once (``os.getpid`` is a system call per log record
    otherwise), and request ids are a random per-process prefix and a counter:
    unique across workers and restarts, 16 hex digits like before, without a
    ``getrandom`` call per request. They correlate lines; they are not secrets.
    """

    pid: ClassVar[int] = os.getpid()
    prefix: ClassVar[str] = os.urandom(4).hex()
    counter: ClassVar[itertools.count[int]] = itertools.count(1)

    @classmethod
    def renew(cls) -> None:
        cls.pid = os.getpid()
        cls.prefix = os.urandom(4).hex()
        cls.counter = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id: 16 hex digits, unique to this process and request."""
    return f"{_Process.prefix}{next(_Process.counter) & 0xFFFFFFFF:08x}"


#: Attributes every LogRecord has; anything else came from ``extra=`` and is a field.
_RESERVED: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def fingerprint(token: str | bytes) -> str:
    """A short, non-reversible reference to a token for logs and error details."""
    # surrogatepass: a hostile "token" may hold lone surrogates; hash it anyway.
    data = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
    return hashlib.sha256(data).hexdigest()[:12]


def issuer_hash(issuer: str) -> str:
    """The label value for an issuer: as kube-apiserver does, a hash, not the URL."""
    return "sha256:" + hashlib.sha256(issuer.encode()).hexdigest()[:16]


#: How many attributes a fresh LogRecord has. ``makeRecord`` adds the
#: ``extra=`` fields after them, so only the attributes past this point need
#: sorting into fields and not (a formatter may still add ``message`` there).
_BASE_ATTRIBUTES: Final = len(vars(logging.LogRecord("", 0, "", 0, "", None, None)))

#: ``levelname.lower()`` without a new string per line.
_LEVELS: Final = {
    level: logging.getLevelName(level).lower()
    for level in (
        logging.DEBUG,
        logging.INFO,
        logging.WARNING,
        logging.ERROR,
        logging.CRITICAL,
    )
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    tail = islice(vars(record).items(), _BASE_ATTRIBUTES, None)
    return {k: v for k, v in tail if k not in _RESERVED}


#: Built once: ``json.dumps`` with options would build a new encoder per line.
_ENCODE: Final = json.JSONEncoder(default=str, separators=(",", ":")).encode


class JSONFormatter(logging.Formatter):
    """Render a record as one JSON object per line (time, level, logger, event).

    The webhook writes one line per review, so this is on the hot path: the
    encoder is built once and the date part of the time is formatted once per
    second.
    """

    _second = -1
    _stamp = ""

    def _time(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        """Serialise the record; unserialisable field values become ``str``."""
        out = self.head(
            record.created,
            _LEVELS.get(record.levelno) or record.levelname.lower(),
            record.name,
            record.getMessage() if record.args else str(record.msg),
        )
        out.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
        return _ENCODE(out)

    def head(
        self, created: float, level: str, logger: str, event: str
    ) -> dict[str, Any]:
        """The members every line starts with, in their order."""
        out: dict[str, Any] = {
            "time": self._time(created, (created - int(created)) * 1000),
            "level": level,
            "logger": logger,
            "event": event,
            # With --workers N, tells the processes apart.
            "pid": _Process.pid,
        }
        rid = REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        return out


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal: ``LEVEL logger event k=v ...``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the event followed by its fields as ``key=value`` pairs."""
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: Every batching handler alive, so a fork and ``flush_logs`` reach them all.
_BATCHING: Final[weakref.WeakSet[LoopBatchingHandler]] = weakref.WeakSet()


# A plain Python class even when compiled (``make compiled``): weak references
# to a compiled subclass of a library class crash mypyc's runtime.
@mypyc_attr(native_class=False)
class LoopBatchingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one event-loop iteration at once.

    The webhook and the proxy log a line per request, and a plain
    ``StreamHandler`` pays one ``write`` system call (and a flush) per line:
    about a tenth of a cached token review's CPU. Here a record logged on a
    running event loop is formatted at once (so it carries the request's
    context) and queued; one callback per loop iteration writes the queue in a
    single call. Under load that is one system call for dozens of lines; when
    idle, a line is out before the loop next waits for I/O, so nothing is held
    back.

    Warnings and errors, and records from threads without a running loop, are
    written at once (after whatever is queued, so the order is kept). At exit
    ``logging.shutdown`` flushes; a forked worker, which leaves with
    ``os._exit``, calls ``flush_logs`` first.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._queued: list[str] = []
        self._scheduled = False
        _BATCHING.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the formatted line, or write it now when it is urgent."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
            return
        if record.levelno < logging.WARNING:
            self.queue_line(line)
            return
        queued, self._queued = self._queued, []
        queued.append(line)
        self._write(queued)

    def queue_line(self, line: str) -> None:
        """Queue an already formatted line (written at once without a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            queued, self._queued = self._queued, []
            queued.append(line)
            self._write(queued)
            return
        self._queued.append(line)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued, then flush the stream."""
        self._scheduled = False
        queued, self._queued = self._queued, []
        self._write(queued)

    def _write(self, lines: list[str]) -> None:
        self.acquire()
        try:
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001
            # As StreamHandler does: report on stderr, never raise into the caller.
            self.handleError(_LOST)
        finally:
            self.release()


#: What ``handleError`` reports when a batch could not be written.
_LOST: Final = logging.LogRecord(
    __name__, logging.ERROR, "", 0, "log lines could not be written", None, None
)


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
        handler.queue_line(_ENCODE(out))

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


def flush_logs() -> None:
    """Write every queued log line now (before ``os._exit``, or a fork),
    with the counts of refusals not logged so far.
    """
    for limiter in list(_LIMITERS):
        limiter.flush()
    for handler in list(_BATCHING):
        handler.flush()


# A child must not inherit, and later write again, lines its parent queued;
# and it is a new process, with its own pid and request ids.
os.register_at_fork(before=flush_logs, after_in_child=_Process.renew)


def configure_logging(*, level: str = "info", fmt: str = "json") -> None:
    """Send every ``proxy.*`` (and aiohttp) log record to stderr in ``fmt``."""
    handler = LoopBatchingHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The webhook and the proxy log a line per request: skip gathering what no
    # formatter here prints (caller file/line, thread, multiprocessing name),
    # the knobs of the logging HOWTO's "Optimization" section. The pid stays.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # the formatter knows the pid
    logging._srcfile = None
    # aiohttp's own access log would duplicate ours and carries raw paths.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
