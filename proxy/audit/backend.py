"""Where audit events go: a log file (or stdout) and a webhook, as in
kube-apiserver (``--audit-log-*``, ``--audit-webhook-*``).

The rule both keep: **recording an event never delays a request.** ``emit``
is synchronous and O(1): it puts the event in a bounded buffer and returns;
when the buffer is full the event is dropped and counted in
``kube_oidc_gate_audit_events_dropped_total{backend}`` (and a warning is
logged at most every ``_WARN_EVERY`` seconds). Serialising and writing
happen elsewhere:

- ``LogBackend``: a ``queue.Queue`` drained by one writer thread, which
  serialises each event as one JSON line and writes it, so neither a slow
  disk nor a full stdout pipe can stall the event loop. ``-`` means stdout.
  Rotation follows lumberjack, the library kube-apiserver uses: when a write
  would take the file past ``max_size_mb`` (0: lumberjack's default, 100 MB)
  the file is renamed to ``<name>-<UTC time 2006-01-02T15-04-05.000><ext>``
  and a new one is started (mode 0600); then backups beyond ``max_backups``
  (0: no limit) and older than ``max_age_days`` by the time in their name
  (0: no limit) are deleted.
- ``WebhookBackend``: events wait in a bounded ``deque``; a task sends them
  as ``audit.k8s.io/v1`` ``EventList`` batches of at most
  ``batch_max_size``, as soon as a batch is full or ``batch_max_wait`` after
  the first event of it. A failed batch (connection error, timeout, 429 or
  5xx) is retried with exponential backoff (``initial_backoff``, x1.5 per
  try, ``_WEBHOOK_TRIES`` tries as kube-apiserver's webhook) and then
  dropped and counted; another 4xx is not retried. The webhook is reached
  through ``proxy.upstream.Upstream`` with the ``--audit-webhook-config-file``
  kubeconfig: the same loader as the proxy's own ``--kubeconfig`` (TLS,
  client certificates, tokens, exec plugins, rotation), the same keep-alive
  pool and llhttp parser, so there is one HTTP client stack to trust and the
  kubeconfig means to us what it means to kube-apiserver. The ``server`` URL
  is posted to as given (its path included).

``close()`` flushes what is buffered within a bounded time, then stops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Final, Protocol

from proxy.audit.event import event_list
from proxy.errors import ConfigError, UpstreamError
from proxy.metrics import Metrics
from proxy.upstream import Upstream, UpstreamSettings

__all__ = [
    "Backend",
    "LogBackend",
    "RotatingFile",
    "WebhookBackend",
    "backup_name",
]

log = logging.getLogger(__name__)

Event = Mapping[str, Any]

_MB: Final = 1024 * 1024
#: lumberjack's size when ``MaxSize`` is 0.
_DEFAULT_MAX_SIZE_MB: Final = 100
_BACKUP_TIME: Final = "%Y-%m-%dT%H-%M-%S"
#: Seconds between two warnings about dropped events, per backend.
_WARN_EVERY: Final = 10.0
#: kube-apiserver's ``DefaultRetryBackoffWithInitialDelay``: 5 steps, x1.5.
_WEBHOOK_TRIES: Final = 5
_WEBHOOK_FACTOR: Final = 1.5
#: Seconds ``close()`` gives a backend to write or send what it holds.
_CLOSE_GRACE: Final = 5.0
_MAX_ANSWER: Final = 64 * 1024


class Backend(Protocol):
    """What ``proxy.audit.Auditor`` hands events to."""

    #: ``log`` or ``webhook``: the ``backend`` label of the metrics.
    name: str

    def emit(self, event: Event) -> None:
        """Take ``event`` without waiting (drop and count it if full)."""
        ...

    async def start(self) -> None:
        """Open files or connections; ``ConfigError`` when unusable."""
        ...

    async def close(self) -> None:
        """Write or send what is buffered (bounded), then stop."""
        ...


class _Drops:
    """Counts dropped events in the metric and warns, rate-limited."""

    def __init__(self, backend: str, metrics: Metrics | None) -> None:
        self.backend = backend
        self.count = 0
        self._child = (
            metrics.child(metrics.audit_events_dropped, backend)
            if metrics is not None
            else None
        )
        self._lock = threading.Lock()
        self._warned = 0.0
        self._unwarned = 0

    def add(self, n: int, reason: str) -> None:
        with self._lock:
            self.count += n
            self._unwarned += n
            now = time.monotonic()
            warn = now - self._warned >= _WARN_EVERY
            if warn:
                self._warned, dropped, self._unwarned = now, self._unwarned, 0
        if self._child is not None:
            self._child.inc(n)
        if warn:
            log.warning(
                "audit events dropped",
                extra={"backend": self.backend, "reason": reason, "events": dropped},
            )


# --------------------------------------------------------------------------
# The log backend


def backup_name(path: str, when: float) -> str:
    """lumberjack's backup file name for ``path`` rotated at ``when`` (UTC)."""
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    moment = datetime.fromtimestamp(when, UTC)
    stamp = moment.strftime(_BACKUP_TIME) + f".{moment.microsecond // 1000:03d}"
    return os.path.join(directory, f"{stem}-{stamp}{ext}")


def _backup_time(path: str, name: str) -> float | None:
    stem, ext = os.path.splitext(os.path.basename(path))
    prefix = stem + "-"
    if not name.startswith(prefix) or not name.endswith(ext):
        return None
    stamp = name[len(prefix) : len(name) - len(ext)]
    try:
        moment = datetime.strptime(stamp, _BACKUP_TIME + ".%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    return moment.timestamp()


class RotatingFile:
    """An append-only file rotated as lumberjack rotates (module docstring).

    Used from one thread only (the log backend's writer).
    """

    def __init__(
        self,
        path: str,
        *,
        max_size_mb: int = 0,
        max_backups: int = 0,
        max_age_days: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_bytes = (max_size_mb or _DEFAULT_MAX_SIZE_MB) * _MB
        self.max_backups = max_backups
        self.max_age_days = max_age_days
        self._clock = clock
        self._file: IO[bytes] | None = None
        self._size = 0

    def open(self) -> None:
        """Open (append to) the file, creating its directory as lumberjack does."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating first when it would not fit."""
        if self._file is None:
            self.open()
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
        assert self._file is not None
        self._file.write(data)
        self._size += len(data)

    def flush(self) -> None:
        """Hand what is written to the OS (called when the queue runs dry)."""
        if self._file is not None:
            self._file.flush()

    def rotate(self) -> None:
        """Rename the file to its backup name, start a new one, prune backups."""
        if self._file is not None:
            self._file.close()
            self._file = None
        when = self._clock()
        target = backup_name(self.path, when)
        for _ in range(1000):  # two rotations in one millisecond: next name
            if not os.path.exists(target):
                break
            when += 0.001
            target = backup_name(self.path, when)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, target)
        self.open()
        self.prune()

    def prune(self) -> None:
        """Delete backups beyond ``max_backups`` and older than ``max_age_days``."""
        if not self.max_backups and not self.max_age_days:
            return
        directory = os.path.dirname(self.path) or "."
        backups: list[tuple[float, str]] = []
        for name in os.listdir(directory):
            when = _backup_time(self.path, name)
            if when is not None:
                backups.append((when, os.path.join(directory, name)))
        backups.sort(reverse=True)
        doomed: list[str] = []
        if self.max_backups:
            doomed += [p for _, p in backups[self.max_backups :]]
            backups = backups[: self.max_backups]
        if self.max_age_days:
            cutoff = self._clock() - timedelta(days=self.max_age_days).total_seconds()
            doomed += [p for when, p in backups if when < cutoff]
        for doomed_path in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(doomed_path)

    def close(self) -> None:
        """Flush and close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


_STOP: Final = object()


class LogBackend:
    """JSON lines to a file with rotation, or to stdout (``-``)."""

    name = "log"

    def __init__(
        self,
        path: str,
        *,
        max_size_mb: int = 0,
        max_backups: int = 0,
        max_age_days: int = 0,
        buffer_size: int = 10000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        stdout: IO[bytes] | None = None,
    ) -> None:
        """``stdout`` replaces ``sys.stdout.buffer`` for ``-`` (tests)."""
        self.path = path
        self._file = (
            None
            if path == "-"
            else RotatingFile(
                path,
                max_size_mb=max_size_mb,
                max_backups=max_backups,
                max_age_days=max_age_days,
                clock=clock,
            )
        )
        self._stdout = stdout
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buffer_size)
        self.drops = _Drops(self.name, metrics)
        self._written = (
            metrics.child(metrics.audit_events, self.name) if metrics else None
        )
        self._thread: threading.Thread | None = None

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the writer thread; drop and count it when full."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.drops.add(1, "buffer full")

    async def start(self) -> None:
        """Open the file (in a thread) and start the writer."""
        if self._file is not None:
            try:
                await asyncio.to_thread(self._file.open)
            except OSError as err:
                raise ConfigError(
                    f"audit: --audit-log-path {json.dumps(self.path)}: cannot open: "
                    f"{(err.strerror or str(err)).lower()}"
                ) from err
        self._thread = threading.Thread(
            target=self._run, name="audit-log-writer", daemon=True
        )
        self._thread.start()

    def _out(self) -> IO[bytes]:
        return self._stdout if self._stdout is not None else sys.stdout.buffer

    def _write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
        else:
            # One write per line: with --workers N sharing stdout, a line of
            # up to PIPE_BUF (4 KiB) is then never split by another worker's.
            out = self._out()
            out.write(data)
            out.flush()

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        else:
            self._out().flush()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                self._write(json.dumps(item, separators=(",", ":")).encode() + b"\n")
                if self._written is not None:
                    self._written.inc()
                if self._queue.empty():
                    self._flush()
            except (OSError, TypeError, ValueError) as err:
                self.drops.add(1, f"write failed: {type(err).__name__}")
        with contextlib.suppress(OSError):
            self._flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    async def close(self) -> None:
        """Write what is queued (at most ``_CLOSE_GRACE`` seconds), then stop."""
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def stop() -> None:
            try:
                self._queue.put(_STOP, timeout=_CLOSE_GRACE)
            except queue.Full:
                # The writer is stuck (a stdout nobody reads): what it has
                # not written is lost.
                self.drops.add(self._queue.qsize(), "closed before written")
                return
            thread.join(_CLOSE_GRACE)

        await asyncio.to_thread(stop)


# --------------------------------------------------------------------------
# The webhook backend


class _Retryable(Exception):
    pass


class WebhookBackend:
    """``EventList`` batches posted to the ``--audit-webhook-config-file`` server."""

    name = "webhook"

    def __init__(
        self,
        config_file: str,
        *,
        buffer_size: int = 10000,
        batch_max_size: int = 400,
        batch_max_wait: float = 30.0,
        initial_backoff: float = 10.0,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        metrics: Metrics | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        """``upstream`` replaces the client built from ``config_file`` (tests)."""
        self.config_file = config_file
        self._upstream = upstream or Upstream(UpstreamSettings(kubeconfig=config_file))
        self._buffer: collections.deque[Event] = collections.deque()
        self._buffer_size = buffer_size
        self._batch_max_size = batch_max_size
        self._batch_max_wait = batch_max_wait
        self._initial_backoff = initial_backoff
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self.drops = _Drops(self.name, metrics)
        self._sent = metrics.child(metrics.audit_events, self.name) if metrics else None
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0
        #: Batches posted successfully (tests and the close log line).
        self.batches_sent = 0

    def emit(self, event: Event) -> None:
        """Buffer ``event``; drop and count it when the buffer is full."""
        if len(self._buffer) >= self._buffer_size:
            self.drops.add(1, "buffer full")
            return
        self._buffer.append(event)
        if len(self._buffer) >= self._batch_max_size:
            self._wake.set()

    async def start(self) -> None:
        """Load the kubeconfig and start sending."""
        try:
            await self._upstream.start()
        except ConfigError as err:
            raise ConfigError(
                [f"audit: --audit-webhook-config-file: {p}" for p in err.problems]
            ) from err
        self._task = asyncio.create_task(self._run(), name="audit-webhook")

    async def _run(self) -> None:
        while not (self._closing and not self._buffer):
            if not self._buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._buffer) < self._batch_max_size and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._batch_max_wait):
                        await self._wake.wait()
            await self._send_one_batch()

    def _take(self) -> list[Event]:
        n = min(len(self._buffer), self._batch_max_size)
        return [self._buffer.popleft() for _ in range(n)]

    async def _send_one_batch(self) -> None:
        batch = self._take()
        if not batch:
            return
        self._inflight = len(batch)
        try:
            await self._send(batch)
        finally:
            self._inflight = 0

    async def _send(self, batch: list[Event]) -> None:
        body = json.dumps(event_list(batch), separators=(",", ":")).encode()
        delay = self._initial_backoff
        for attempt in range(1, _WEBHOOK_TRIES + 1):
            try:
                await self._post(body)
            except _Retryable as err:
                if attempt == _WEBHOOK_TRIES or self._closing:
                    self.drops.add(len(batch), f"webhook failed: {err}")
                    return
                log.warning(
                    "audit webhook failed, retrying",
                    extra={"attempt": attempt, "detail": str(err), "retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay *= _WEBHOOK_FACTOR
            except UpstreamError as err:
                self.drops.add(len(batch), f"webhook refused: {err}")
                return
            else:
                self.batches_sent += 1
                if self._sent is not None:
                    self._sent.inc(len(batch))
                return

    async def _post(self, body: bytes) -> None:
        upstream = self._upstream
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            *upstream.auth_items,
        ]
        path = "" if upstream.base_url.raw_path.rstrip("/") else "/"
        try:
            async with asyncio.timeout(self._request_timeout):
                response = await upstream.fetch(
                    "POST",
                    path,
                    headers=headers,
                    body=body,
                    connect_timeout=self._connect_timeout,
                )
                async with response:
                    await response.read(_MAX_ANSWER)
                    status = response.status
        except TimeoutError as err:
            raise _Retryable("timed out") from err
        except UpstreamError as err:
            raise _Retryable(str(err)) from err
        if status == 429 or status >= 500:
            raise _Retryable(f"answered {status}")
        if not 200 <= status < 300:
            raise UpstreamError(f"audit: webhook answered {status}")

    async def close(self) -> None:
        """Send what is buffered (bounded by ``_CLOSE_GRACE``), then stop;
        what is left is counted as dropped.
        """
        task, self._task = self._task, None
        self._closing = True
        self._wake.set()
        if task is not None:
            try:
                async with asyncio.timeout(_CLOSE_GRACE):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = len(self._buffer) + self._inflight
        if left:
            self.drops.add(left, "closed before sent")
            self._buffer.clear()
            self._inflight = 0
        await self._upstream.close()
