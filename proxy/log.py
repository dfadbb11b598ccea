"""Logging: one JSON line per event, a request id, and the only token fingerprint.

Modules log a constant event name plus fields (``extra={...}``); this module
renders them. ``fingerprint`` is the one way a token may be referred to in a
log: the first 12 hex digits of its sha256, enough to correlate two lines about
the same token, useless to replay it.

Lines are written off the event loop (``LoopBatchingHandler``): a full stdout
or stderr pipe, a log shipper that stalls, must never stall requests. The
loop formats and queues a line; a writer thread writes, bounded in memory,
and says how many lines it had to drop.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from itertools import islice
from typing import Any, ClassVar, Final, Protocol, TextIO

from mypy_extensions import mypyc_attr

__all__ = [
    "BACKLOG_LIMIT",
    "FLUSH_TIMEOUT",
    "REQUEST_ID",
    "WRITE_INTERVAL",
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

#: Characters handed to the writer but not yet written past which new lines
#: are dropped (and counted): what a stuck reader of the pipe may cost in memory.
BACKLOG_LIMIT: Final = 8 * 1024 * 1024

#: How long ``flush`` waits for the writer: a stuck pipe must not hang an exit.
FLUSH_TIMEOUT: Final = 2.0

#: The writer's rest after a write: under load, at most one write (and one
#: wake-up of its thread) per interval; an idle process's line goes at once.
WRITE_INTERVAL: Final = 0.005

#: A job for the writer thread: a batch of lines and its size; None stops it.
_Job = tuple[str, int] | None


# A plain Python class even when compiled (``make compiled``): weak references
# to a compiled subclass of a library class crash mypyc's runtime.
@mypyc_attr(native_class=False)
class LoopBatchingHandler(logging.StreamHandler[TextIO]):
    """A stream handler whose writes happen on a thread, a loop iteration at a time.

    Why a thread: a ``write`` to a pipe blocks once the pipe is full (a log
    shipper that stalls, a ``kubectl logs`` nobody reads), and written on the
    event loop that would stall every request of the process. Here the loop
    never calls ``write`` or ``flush``: one writer thread per process does, and
    the loop only hands batches over. Why batches: the webhook and the proxy
    log a line per request, and a plain ``StreamHandler`` pays a ``write``
    system call (and a flush) per line, about a tenth of a cached token
    review's CPU.

    A record logged on a running loop is formatted at once (so it carries the
    request's context) and queued; one callback per loop iteration hands the
    queue to the writer as one batch. Warnings and errors, and records from
    threads without a running loop, hand over what is queued at once, their
    line last, so the order is kept. The writer writes what it has been
    handed in one call, then rests ``write_interval``: an idle process's line
    goes out at once, a busy one's at most one write per interval later.

    Cost (issue 19, a review's line on a running loop into /dev/null, CPU of
    all threads): the same as writing on the loop was, about 10 µs a line at
    one line per loop iteration and 6.4 µs at twenty. Handing a batch over
    costs the loop 0.8 µs where its ``write`` cost 1.2 µs; waking the writer
    per iteration instead of per interval cost 3 to 5 µs more a batch (the
    thread's wake-up and its GIL hand-off), hence the interval.

    Bounded: when the writer falls behind, at most ``backlog_limit``
    characters (bytes for the JSON lines, which are ASCII) wait for it; past
    that new lines are dropped and counted until it has caught up, and then
    one ``log lines dropped`` warning says how many. Nothing raises into the
    caller; a stream that fails is reported on stderr by ``handleError``.

    ``flush`` (``logging.shutdown`` at exit; ``flush_logs`` before a forked
    worker's ``os._exit`` and before a fork) hands over what is queued and
    waits, at most ``flush_timeout`` seconds, until it is written. A forked
    child starts its own writer when it first logs, and never writes what its
    parent had queued.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        backlog_limit: int = BACKLOG_LIMIT,
        flush_timeout: float = FLUSH_TIMEOUT,
        write_interval: float = WRITE_INTERVAL,
    ) -> None:
        super().__init__(stream)
        self._limit = backlog_limit
        self._timeout = flush_timeout
        self._interval = write_interval
        self._forget()
        _BATCHING.add(self)

    def _forget(self) -> None:
        """Start with no lines and no writer (at first, and in a forked child).

        In a child the parent's lines are the parent's to write, its writer
        thread does not exist, and its lock may have been held at the fork.
        """
        self._pending: list[str] = []
        self._scheduled = False
        self._mutex = threading.Lock()
        self._written_cond = threading.Condition(self._mutex)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._backlog = 0  # characters handed over and not yet written
        self._dropped = 0  # lines dropped since the last notice
        self._handed = 0  # batches handed over ...
        self._written = 0  # ... and written, for flush to wait on
        self._waiting = 0  # flush calls waiting: only then does the writer notify

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the formatted line; hand it over at once when it is urgent."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
            return
        if record.levelno < logging.WARNING:
            self.queue_line(line)
            return
        self._pending.append(line)
        self._hand_over()

    def queue_line(self, line: str) -> None:
        """Queue an already formatted line (handed over at once without a loop)."""
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand_over()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._end_of_iteration)

    def _end_of_iteration(self) -> None:
        self._scheduled = False
        self._hand_over()

    def flush(self) -> None:
        """Hand over what is queued; wait (bounded) until the writer wrote it."""
        self._hand_over()
        with self._mutex:
            if (
                self._writer_pid != _Process.pid
                or threading.current_thread() is self._writer
            ):
                return
            target = self._handed
            deadline = time.monotonic() + self._timeout
            self._waiting += 1
            try:
                # Not ``wait_for`` with a lambda: mypyc cannot compile a
                # closure in a method of a class kept as plain Python.
                while self._written < target:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._written_cond.wait(left)
            finally:
                self._waiting -= 1

    def close(self) -> None:
        """Write what is queued (bounded), then let the writer thread end."""
        self.flush()
        with self._mutex:
            if self._writer_pid == _Process.pid:
                self._jobs.put(None)
                self._writer_pid = 0
                self._writer = None
        super().close()

    def _hand_over(self) -> None:
        """Give the queued lines to the writer as one batch, within the limit."""
        with self._mutex:
            # The loop appends without the mutex: under the GIL nothing runs
            # between its reading ``_pending`` and appending to that list, so
            # a line lands either in the list taken here or in the new one.
            lines = self._pending
            if not lines:
                return
            self._pending = []
            if self._writer_pid != _Process.pid:
                self._start_writer()
            text = "\n".join(lines) + "\n"
            size = len(text)
            if self._dropped or self._backlog + size > self._limit:
                text, size = self._within_limit(lines)
                if not size:
                    return
            self._backlog += size
            self._handed += 1
            self._jobs.put((text, size))

    def _within_limit(self, lines: list[str]) -> tuple[str, int]:
        """The lines that still fit under the limit; the others are counted.

        Once lines are dropped, every line is until the writer has caught up
        and said so: the notice then stands where the gap is. A line is never
        cut, and with nothing waiting one line is always taken.
        """
        kept: list[str] = []
        if not self._dropped:
            room = self._limit - self._backlog
            for line in lines:
                need = len(line) + 1
                if need > room and (kept or self._backlog):
                    break
                kept.append(line)
                room -= need
        self._dropped += len(lines) - len(kept)
        if not kept:
            return "", 0
        text = "\n".join(kept) + "\n"
        return text, len(text)

    def _start_writer(self) -> None:
        """This process's writer thread (the caller holds the mutex)."""
        writer = threading.Thread(
            target=self._write_forever,
            args=(self._jobs,),
            name="kube-oidc-gate-log-writer",
            daemon=True,
        )
        try:
            writer.start()
        except RuntimeError:  # no thread to be had: the lines wait, bounded
            self.handleError(_LOST)
            return
        self._writer = writer
        self._writer_pid = _Process.pid

    def _write_forever(self, jobs: queue.SimpleQueue[_Job]) -> None:
        """The writer thread: write what waits, then any notice of drops.

        After a write it sleeps ``write_interval``: under load the batches
        that arrive meanwhile go out in one write, and the thread wakes (and
        takes the GIL from the loop) at most once per interval rather than
        once per loop iteration, which cost more CPU than the write itself.
        A line logged when idle is written at once.
        """
        mutex = self._mutex
        interval = self._interval
        while True:
            job = jobs.get()
            texts: list[str] = []
            size = batches = 0
            while job is not None:
                texts.append(job[0])
                size += job[1]
                batches += 1
                if jobs.empty():
                    break
                job = jobs.get()
            if texts:
                self._write(texts[0] if batches == 1 else "".join(texts))
            with mutex:
                self._backlog -= size
                dropped = self._dropped if not self._backlog else 0
                self._dropped -= dropped
            if dropped:
                self._write(self._dropped_line(dropped))
            with mutex:
                self._written += batches
                if self._waiting:
                    self._written_cond.notify_all()
            if job is None:
                return
            time.sleep(interval)

    def _dropped_line(self, count: int) -> str:
        record = logging.LogRecord(
            __name__, logging.WARNING, "", 0, "log lines dropped", None, None
        )
        record.__dict__.update(dropped=count, backlog_limit=self._limit)
        try:
            return self.format(record) + "\n"
        except Exception:  # noqa: BLE001
            self.handleError(record)
            return ""

    def _write(self, text: str) -> None:
        # Not under the handler's lock: ``Handler.handle`` takes it around
        # ``emit``, so a write blocked on a full pipe would block the loop.
        try:
            if text:
                self.stream.write(text)
            self.stream.flush()
        except Exception:  # noqa: BLE001
            # As StreamHandler does: report on stderr, never raise.
            self.handleError(_LOST)


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

    Each handler waits at most its ``flush_timeout`` for its writer thread:
    a stuck pipe delays an exit, it does not hang it.
    """
    for limiter in list(_LIMITERS):
        limiter.flush()
    for handler in list(_BATCHING):
        handler.flush()


def _after_fork_in_child() -> None:
    """A new process: its own pid and request ids, and no parent's lines.

    What the parent's writer had not written yet when it forked (a stuck
    pipe outlasting ``flush_timeout``) is the parent's to write: the child
    forgets it, and starts a writer of its own when it first logs.
    """
    _Process.renew()
    for handler in list(_BATCHING):
        handler._forget()


os.register_at_fork(before=flush_logs, after_in_child=_after_fork_in_child)


def configure_logging(*, level: str = "info", fmt: str = "json") -> None:
    """Send every ``proxy.*`` (and aiohttp) log record to stderr in ``fmt``."""
    handler = LoopBatchingHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, LoopBatchingHandler):
            old.close()  # its lines written, its writer thread ended
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
