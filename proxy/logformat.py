"""Log lines: the JSON and text formatters, request ids, the token fingerprint.

Modules log a constant event name plus fields (``extra={...}``); this module
renders them. ``fingerprint`` is the one way a token may be referred to in a
log: the first 12 hex digits of its sha256, enough to correlate two lines about
the same token, useless to replay it. Where the lines go is ``proxy.logwriter``;
the per-request line and its limiter are ``proxy.requestlog``; ``proxy.log``
sets logging up and re-exports all three.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import logging
import os
import time
from itertools import islice
from typing import Any, ClassVar, Final

from proxy.jsontext import compact

__all__ = [
    "REQUEST_ID",
    "JSONFormatter",
    "Process",
    "TextFormatter",
    "fingerprint",
    "issuer_hash",
    "new_request_id",
]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "kube_oidc_gate_request_id", default=""
)


class Process:
    """What each line says about its process, refreshed in a forked child
    (``proxy.log``).

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
    return f"{Process.prefix}{next(Process.counter) & 0xFFFFFFFF:08x}"


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
        return compact(out)

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
            "pid": Process.pid,
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
