"""Where log lines go: a stream written by a thread, never by the event loop.

A full stdout or stderr pipe, a log shipper that stalls, must never stall
requests. The loop formats and queues a line; a writer thread writes, bounded
in memory, and says how many lines it had to drop (``LoopBatchingHandler``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from typing import Final, TextIO

from mypy_extensions import mypyc_attr

from proxy.logformat import Process

__all__ = [
    "BACKLOG_LIMIT",
    "FLUSH_TIMEOUT",
    "WRITE_INTERVAL",
    "LoopBatchingHandler",
    "forget_in_child",
    "live_handlers",
]

#: The logger the handler's own lines are recorded under: its name from
#: before the split of ``proxy.log``, which operators may filter on.
_LOGGER: Final = "proxy.log"

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
                self._writer_pid != Process.pid
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
            if self._writer_pid == Process.pid:
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
            if self._writer_pid != Process.pid:
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
        self._writer_pid = Process.pid

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
            _LOGGER, logging.WARNING, "", 0, "log lines dropped", None, None
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
    _LOGGER, logging.ERROR, "", 0, "log lines could not be written", None, None
)


def live_handlers() -> list[LoopBatchingHandler]:
    """Every batching handler alive (``flush_logs`` flushes them all)."""
    return list(_BATCHING)


def forget_in_child() -> None:
    """In a forked child: no handler writes what its parent had queued.

    What the parent's writer had not written yet when it forked (a stuck
    pipe outlasting ``flush_timeout``) is the parent's to write: the child
    forgets it, and starts a writer of its own when it first logs.
    """
    for handler in list(_BATCHING):
        handler._forget()
