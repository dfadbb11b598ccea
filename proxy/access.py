"""What the proxy records of each request: the access-log line, the metrics,
and (with ``--audit-policy-file``) the audit record's begin and end.

``Entry`` is the request's record, filled in as the request progresses and
written once by ``Recorder.finish``. It is deliberately mutable: a request
can end at any ``await`` (the client leaves, a stream breaks mid-body), and
its line must still say who it was, what was relayed so far and how it ended;
each stage sets only the fields it learns.

One access-log line per request goes to the ``proxy.access`` logger (event
``request``), plus ``request started`` when a long-running request begins;
the proxy's own refusals are limited per cause (``proxy.log.RefusalLimiter``),
so a replayed bad token cannot buy a line each. No token is ever logged.
"""

from __future__ import annotations

import time
from typing import Any, Final

from multidict import CIMultiDict

from proxy import http1
from proxy.audit.auditor import AuditContext, Auditor
from proxy.audit.event import REQUEST_OBJECT_NOTE, source_ips
from proxy.headers import IPNetwork, trusted
from proxy.kube import UserInfo
from proxy.log import RefusalLimiter, RequestLog
from proxy.metrics import Metrics

__all__ = ["AuditedEntry", "Entry", "Recorder", "access_log"]

access_log = RequestLog("proxy.access")

#: The annotation saying why the proxy refused a request it audited.
_REFUSAL_NOTE: Final = "kube-oidc-gate.io/refusal"
_MODE_NOTE: Final = "kube-oidc-gate.io/mode"
_MAX_NOTE: Final = 256


class Entry:
    """One request's access-log fields, filled in as the request progresses."""

    __slots__ = (
        "as_user",
        "bytes_in",
        "bytes_out",
        "cause",
        "detail",
        "groups_count",
        "kind",
        "method",
        "mode",
        "outcome",
        "path",
        "prepared",
        "reason",
        "started_at",
        "status",
        "user",
        "verb",
    )

    def __init__(self, method: str, path: str, verb: str, kind: str | None) -> None:
        self.started_at = time.monotonic()
        self.method = method
        self.path = path
        self.verb = verb
        self.kind = kind
        self.user = ""
        self.groups_count = 0
        self.as_user: str | None = None
        self.mode = "impersonate"
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcome = "ok"
        self.prepared = False
        #: Why the proxy refused the request (its own refusals only).
        self.detail = ""
        #: The engine's reason code, for a refused token (troubleshooting.md).
        self.reason = ""
        #: What the refusal log limit counts it by (its own refusals only).
        self.cause = ""

    #: The request's audit record (``None``: not audited, or not yet). Class
    #: attributes here, slots in ``AuditedEntry``: a proxy without auditing
    #: stores nothing more per request.
    audit: AuditContext | None = None
    #: The audit policy was consulted (``Recorder.audit_begin``).
    audited = False

    @property
    def audit_id(self) -> str | None:
        """The id sent upstream and echoed to the client, if audited."""
        audit = self.audit
        return audit.audit_id if audit is not None else None

    def fields(self) -> dict[str, Any]:
        """The access-log line's fields."""
        out: dict[str, Any] = {
            "user": self.user,
            "groups_count": self.groups_count,
            "verb": self.verb,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes": self.bytes_out,
            "duration": round(time.monotonic() - self.started_at, 6),
            "mode": self.mode,
        }
        if self.kind is not None:
            out["kind"] = self.kind
            out["bytes_in"] = self.bytes_in
        if self.as_user is not None:
            out["as_user"] = self.as_user
        if self.outcome != "ok":
            out["outcome"] = self.outcome
        if self.reason:
            out["reason"] = self.reason
        if self.detail:
            out["detail"] = self.detail
        return out


class AuditedEntry(Entry):
    """An ``Entry`` of a proxy that audits (``--audit-policy-file``)."""

    __slots__ = ("audit", "audited")

    def __init__(self, method: str, path: str, verb: str, kind: str | None) -> None:
        super().__init__(method, path, verb, kind)
        self.audit = None
        self.audited = False


class Recorder:
    """Writes what each request leaves behind: its access line, its metrics
    and, when ``auditor`` is given, its audit record.

    ``trusted_proxies``: whose ``X-Forwarded-For`` counts in the audit
    record's ``sourceIPs`` (as it does upstream).
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None,
        auditor: Auditor | None,
        trusted_proxies: tuple[IPNetwork, ...],
        refusal_log_limit: int,
    ) -> None:
        self._metrics = metrics
        self.auditor = auditor
        self._trusted_proxies = trusted_proxies
        self._limiter = RefusalLimiter(access_log, limit=refusal_log_limit)
        #: Makes a new request's record (with audit slots when auditing).
        self.entry: type[Entry] = Entry if auditor is None else AuditedEntry

    def flush(self) -> None:
        """Report the refusals not logged yet (the server is stopping)."""
        self._limiter.flush()

    # ----------------------------------------------------------------------
    # Audit

    def audit_begin(
        self,
        entry: Entry,
        request: http1.Request,
        src: CIMultiDict[str],
        user: UserInfo | None,
    ) -> AuditContext | None:
        """Consult the audit policy once ``user`` is known (kube-apiserver's
        audit filter runs after authentication, before impersonation);
        ``RequestReceived`` carries the time the request arrived.
        """
        assert self.auditor is not None
        assert isinstance(entry, AuditedEntry)
        entry.audited = True
        peer = request.peer
        target = request.target
        audit = entry.audit = self.auditor.begin(
            request.method,
            entry.path,
            target.partition("?")[2],
            request_uri=target,
            user=user,
            source_ips=source_ips(
                peer,
                forwarded_for=src.getall("X-Forwarded-For", ()),
                real_ip=src.get("X-Real-Ip"),
                trusted=trusted(peer, self._trusted_proxies),
            ),
            user_agent=src.get("User-Agent", ""),
            long_running=entry.kind is not None,
            received=time.time() - (time.monotonic() - entry.started_at),
        )
        return audit

    def _audit_of(
        self, entry: Entry, request: http1.Request, src: CIMultiDict[str]
    ) -> AuditContext | None:
        """The request's record; begun with no user if the request ended
        before authentication did (as kube-apiserver audits a failed one).
        """
        if entry.audited:
            return entry.audit
        return self.audit_begin(entry, request, src, None)

    def audit_admitted(
        self, audit: AuditContext, request: http1.Request, entry: Entry
    ) -> tuple[str, str]:
        """What an admitted request adds to its record; the ``Audit-ID`` to
        send upstream.
        """
        if entry.mode == "passthrough":
            audit.annotate(_MODE_NOTE, "passthrough")
        if audit.wants_request_body:
            if request.streamed:
                audit.annotate(REQUEST_OBJECT_NOTE, "omitted: streamed request body")
            else:
                audit.request_body(request.body, request.headers.get("content-type"))
        return ("Audit-ID", audit.audit_id)

    def audit_refusal(
        self,
        entry: Entry,
        request: http1.Request,
        src: CIMultiDict[str],
        status: int,
        body: bytes,
    ) -> tuple[tuple[str, str], ...]:
        """Close the record of a refused request; the headers it adds."""
        if self.auditor is None:
            return ()
        audit = self._audit_of(entry, request, src)
        if audit is None:
            return ()
        note = entry.reason or entry.detail
        if note:
            audit.annotate(_REFUSAL_NOTE, note[:_MAX_NOTE])
        audit.complete(status, body, "application/json")
        return (("Audit-Id", audit.audit_id),)

    def audit_panic(
        self, entry: Entry, request: http1.Request, src: CIMultiDict[str]
    ) -> tuple[tuple[str, str], ...]:
        """Record an unexpected failure (``Panic``); the headers it adds."""
        if self.auditor is None:
            return ()
        audit = self._audit_of(entry, request, src)
        if audit is None:
            return ()
        audit.panic()
        return (("Audit-Id", audit.audit_id),)

    # ----------------------------------------------------------------------
    # The end of a request

    def finish(
        self, entry: Entry, request: http1.Request, src: CIMultiDict[str]
    ) -> None:
        """Write the request's line, metrics and audit end, however it ended."""
        if entry.status == 0:
            entry.status = 499
            entry.outcome = "client_closed" if entry.outcome == "ok" else entry.outcome
        if self.auditor is not None:
            # Every request that reached the handler has its record closed
            # here, whatever way it ended (a client gone during validation
            # included); a record already completed is left as it is.
            audit = self._audit_of(entry, request, src)
            if audit is not None:
                audit.complete(entry.status)
        # Every admitted request is logged; the proxy's own refusals are
        # limited per cause (a replayed bad token must not buy a line each).
        if not entry.cause or self._limiter.admit(
            (("status", entry.status), ("cause", entry.cause))
        ):
            access_log.info("request", entry.fields())
        if self._metrics is not None:
            self._metrics.tally(
                self._metrics.http_requests, "proxy", str(entry.status)
            ).count += 1
            if entry.kind is None:
                # A stream's time to its headers was taken when they went out.
                self._observe_duration(entry)

    def _observe_duration(self, entry: Entry) -> None:
        assert self._metrics is not None
        self._metrics.histogram_tally(self._metrics.http_duration, "proxy").observe(
            time.monotonic() - entry.started_at
        )

    def count_upstream(self, label: str) -> None:
        """Count one answer (or failure, by ``label``) of the API server."""
        if self._metrics is not None:
            self._metrics.tally(self._metrics.upstream_requests, label).count += 1

    def stream_started(self, entry: Entry) -> None:
        """A long-running request's head went out: audit, log, gauge."""
        if entry.kind is None:
            return
        if entry.audit is not None:
            entry.audit.response_started(entry.status)
        access_log.info("request started", entry.fields())
        if self._metrics is not None:
            self._observe_duration(entry)
            self._metrics.inflight_streams.labels(entry.kind).inc()

    def stream_ended(self, entry: Entry) -> None:
        """A long-running request ended (the gauge's other half)."""
        if entry.kind is not None and self._metrics is not None:
            self._metrics.inflight_streams.labels(entry.kind).dec()
