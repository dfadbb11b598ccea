"""Logging: one JSON line per event, a request id, and the only token fingerprint.

Set up here (``configure_logging``), flushed here (``flush_logs``, also
before a fork), and the public names of its three parts re-exported:
``proxy.logformat`` renders lines (JSON or text, the request id, the token
``fingerprint``), ``proxy.logwriter`` writes them off the event loop, and
``proxy.requestlog`` is the per-request line and the limiter of refusals.
"""

from __future__ import annotations

import logging
import os
import sys

from proxy.logformat import (
    REQUEST_ID,
    JSONFormatter,
    Process,
    TextFormatter,
    fingerprint,
    issuer_hash,
    new_request_id,
)
from proxy.logwriter import (
    BACKLOG_LIMIT,
    FLUSH_TIMEOUT,
    WRITE_INTERVAL,
    LoopBatchingHandler,
    forget_in_child,
    live_handlers,
)
from proxy.requestlog import EventLog, RefusalLimiter, RequestLog, live_limiters

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


def flush_logs() -> None:
    """Write every queued log line now (before ``os._exit``, or a fork),
    with the counts of refusals not logged so far.

    Each handler waits at most its ``flush_timeout`` for its writer thread:
    a stuck pipe delays an exit, it does not hang it.
    """
    for limiter in live_limiters():
        limiter.flush()
    for handler in live_handlers():
        handler.flush()


def _after_fork_in_child() -> None:
    """A new process: its own pid and request ids, and no parent's lines."""
    Process.renew()
    forget_in_child()


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
