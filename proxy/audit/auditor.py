"""The one object the proxy's handler talks to: ``Auditor`` and, per request,
``AuditContext``.

How the handler uses it (the integration contract)::

    ctx = auditor.begin(
        method, path, query,                 # path percent-decoded, raw query
        request_uri=raw_target,              # as the client sent it
        user=user,                           # UserInfo, None if the token was refused
        source_ips=source_ips(peer, forwarded_for=..., trusted=...),
        user_agent=headers.get("User-Agent", ""),
        long_running=kind is not None,       # watch, logs -f, exec, ...
        received=arrival_wall_time,          # the policy runs after authn
    )
    # ctx is None: the policy says level None; do nothing more, cost is nil.
    if ctx is not None:
        upstream_headers.append(("Audit-ID", ctx.audit_id))   # replace any client one
        ctx.set_impersonated(requested)        # after an approved --as
        if ctx.wants_request_body: ctx.request_body(body, content_type)
        ctx.response_started(status)           # long-running: headers sent
        ctx.complete(status, body_if_wanted, content_type)    # or
        ctx.panic()                            # the handler failed unexpectedly

Refusals the proxy answers itself (401, 403, 431...) are audited like any
request: ``begin`` (with ``user=None`` before authentication succeeded) and
``complete`` with the refusal's status and ``Status`` body; ``annotate`` can
add the refusal's reason. Every method is synchronous and cheap: events go to
the backends' bounded buffers (``proxy.audit.backend``) and never wait for a
disk or a webhook.

``auditID``: a new UUID (``begin``'s ``audit_id`` can adopt an id, a short
printable token of at most 128 characters, but the proxy's handler never
passes one: it drops every client's ``Audit-ID``); the handler sends it
upstream as ``Audit-ID`` (kube-apiserver then uses it for its own event) and
returns it to the client as ``Audit-Id``.

The policy is evaluated once per request with the authenticated user, as
kube-apiserver evaluates it before impersonation; ``impersonatedUser`` is
recorded from the stage after ``set_impersonated``.

Deliberate difference: kube-apiserver records a failed authentication as a
single event at stage ``ResponseStarted`` (its failed-authentication audit
filter); here a refused request gets the ordinary stages
(``RequestReceived``, ``ResponseComplete``), so every request reads the same.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy.audit.backend import Backend, LogBackend, WebhookBackend
from proxy.audit.event import (
    DEFAULT_MAX_OBJECT_BYTES,
    REQUEST_OBJECT_NOTE,
    RESPONSE_OBJECT_NOTE,
    at_least,
    body_object,
    new_event,
    object_ref,
    response_status,
    user_info,
)
from proxy.audit.policy import Policy, RequestAuditConfig, attributes_of, evaluate
from proxy.audit.requestinfo import RequestInfo, request_info
from proxy.kube import SYSTEM_AUTHENTICATED, UserInfo
from proxy.metrics import Metrics

__all__ = ["AuditContext", "AuditOptions", "Auditor"]

_AUDIT_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditOptions:
    """The ``--audit-*`` flags, checked (``proxy.options.audit``); kube-apiserver's
    meanings and defaults.
    """

    policy: Policy
    #: ``--audit-log-path``: a file, ``-`` for stdout, ``None`` for no log.
    log_path: str | None = None
    #: ``--audit-log-maxsize`` in MB (0: lumberjack's 100).
    log_max_size_mb: int = 0
    #: ``--audit-log-maxbackup`` (0: keep all).
    log_max_backups: int = 0
    #: ``--audit-log-maxage`` in days (0: keep all).
    log_max_age_days: int = 0
    #: ``--audit-log-batch-buffer-size``: events waiting for the writer.
    log_buffer_size: int = 10000
    #: ``--audit-webhook-config-file``: a kubeconfig, ``None`` for no webhook.
    webhook_config_file: str | None = None
    #: ``--audit-webhook-batch-buffer-size``: events waiting to be sent.
    webhook_buffer_size: int = 10000
    #: ``--audit-webhook-batch-max-size``: events in one ``EventList``.
    webhook_batch_max_size: int = 400
    #: ``--audit-webhook-batch-max-wait``: seconds before a partial batch goes.
    webhook_batch_max_wait: float = 30.0
    #: ``--audit-webhook-initial-backoff``: seconds before the first retry.
    webhook_initial_backoff: float = 10.0
    #: Largest body recorded as ``requestObject``/``responseObject``.
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES


def _with_authenticated(user: UserInfo) -> tuple[str, ...]:
    groups = tuple(user.groups)
    return groups if SYSTEM_AUTHENTICATED in groups else (*groups, SYSTEM_AUTHENTICATED)


class AuditContext:
    """One audited request's record (see the module docstring for the calls)."""

    __slots__ = (
        "_annotations",
        "_auditor",
        "_config",
        "_done",
        "_impersonated",
        "_info",
        "_ips",
        "_long_running",
        "_received",
        "_request_object",
        "_request_uri",
        "_started",
        "_user",
        "_user_agent",
        "audit_id",
    )

    def __init__(
        self,
        auditor: Auditor,
        config: RequestAuditConfig,
        info: RequestInfo,
        *,
        audit_id: str,
        request_uri: str,
        user: dict[str, Any],
        ips: list[str],
        user_agent: str,
        received: float,
        long_running: bool,
    ) -> None:
        self._auditor = auditor
        self._long_running = long_running
        self._config = config
        self._info = info
        self.audit_id = audit_id
        self._request_uri = request_uri
        self._user = user
        self._ips = ips
        self._user_agent = user_agent
        self._received = received
        self._impersonated: dict[str, Any] | None = None
        self._request_object: Any = None
        self._annotations: dict[str, str] = {}
        self._started = False
        self._done = False

    @property
    def level(self) -> str:
        """The policy's level for this request (never ``None`` here)."""
        return self._config.level

    @property
    def wants_request_body(self) -> bool:
        """Whether ``request_body`` would record anything (level ``Request``+,
        a resource request): the handler keeps a copy of the body only then.
        """
        return self._info.is_resource_request and at_least(self.level, "Request")

    @property
    def wants_response_body(self) -> bool:
        """Whether ``complete`` records a response body (``RequestResponse``)."""
        return self._info.is_resource_request and at_least(
            self.level, "RequestResponse"
        )

    def set_impersonated(self, user: UserInfo) -> None:
        """Record the approved ``--as`` identity in the later stages."""
        self._impersonated = user_info(user)

    def annotate(self, key: str, value: str) -> None:
        """Add an annotation (kept in every later stage)."""
        self._annotations[key] = value

    def request_body(self, body: bytes | None, content_type: str | None) -> None:
        """Record the request body as ``requestObject`` (if wanted and JSON)."""
        if not self.wants_request_body:
            return
        obj, note = body_object(
            body,
            content_type,
            max_bytes=self._auditor.max_object_bytes,
            omit_managed_fields=self._config.omit_managed_fields,
        )
        self._request_object = obj
        if note is not None:
            self._annotations[REQUEST_OBJECT_NOTE] = note

    def response_started(self, status: int) -> None:
        """The response head went out: ``ResponseStarted`` for a long-running
        request (the only ones that have the stage), once.
        """
        if self._started or self._done:
            return
        self._started = True
        if self._long_running and "ResponseStarted" not in self._config.omit_stages:
            self._emit("ResponseStarted", response_status(status))

    def complete(
        self,
        status: int,
        response_body: bytes | None = None,
        content_type: str | None = None,
    ) -> None:
        """The response ended: ``ResponseComplete``, once (later calls and
        calls after ``panic`` do nothing).
        """
        if self._done:
            return
        self._done = True
        if "ResponseComplete" in self._config.omit_stages:
            return
        response_object = None
        if self.wants_response_body:
            response_object, note = body_object(
                response_body,
                content_type,
                max_bytes=self._auditor.max_object_bytes,
                omit_managed_fields=self._config.omit_managed_fields,
            )
            if note is not None:
                self._annotations[RESPONSE_OBJECT_NOTE] = note
        self._emit(
            "ResponseComplete",
            response_status(status, response_body, content_type),
            response_object=response_object,
        )

    def panic(self) -> None:
        """The handler failed unexpectedly: ``Panic`` instead of the end, with
        a 500 status (no detail: it may hold anything).
        """
        if self._done:
            return
        self._done = True
        if "Panic" in self._config.omit_stages:
            return
        self._emit(
            "Panic",
            {
                "metadata": {},
                "code": 500,
                "status": "Failure",
                "reason": "InternalError",
                "message": "kube-oidc-gate: the request handler failed",
            },
        )

    def _emit(
        self,
        stage: str,
        status: dict[str, Any] | None = None,
        *,
        response_object: Any = None,
    ) -> None:
        event = new_event(
            level=self.level,
            audit_id=self.audit_id,
            stage=stage,
            request_uri=self._request_uri,
            verb=self._info.verb,
            user=self._user,
            received=self._received,
            now=self._auditor.clock(),
            impersonated=self._impersonated,
            ips=self._ips,
            user_agent=self._user_agent,
            ref=object_ref(self._info),
            status=status,
            request_object=self._request_object if stage != "RequestReceived" else None,
            response_object=response_object,
            annotations=self._annotations,
        )
        self._auditor.emit(event)


class Auditor:
    """Decides per request whether and how to audit, and feeds the backends.

    Built once per process (``from_options``, called by ``proxy.cli``) and
    handed to ``proxy.impersonate.proxy_server``; no globals.
    """

    def __init__(
        self,
        policy: Policy,
        backends: Sequence[Backend],
        *,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        """``clock`` (wall time, seconds) and ``new_id`` are test seams."""
        self.policy = policy
        self.backends = tuple(backends)
        self.max_object_bytes = max_object_bytes
        self.clock = clock
        self._new_id = new_id

    @classmethod
    async def from_options(
        cls, options: AuditOptions, *, metrics: Metrics | None = None
    ) -> Auditor:
        """The auditor the flags describe, its backends started (a file that
        cannot be opened or a webhook kubeconfig that does not load is a
        ``ConfigError``); ``close()`` it on shutdown.
        """
        backends: list[Backend] = []
        if options.log_path is not None:
            backends.append(
                LogBackend(
                    options.log_path,
                    max_size_mb=options.log_max_size_mb,
                    max_backups=options.log_max_backups,
                    max_age_days=options.log_max_age_days,
                    buffer_size=options.log_buffer_size,
                    metrics=metrics,
                )
            )
        if options.webhook_config_file is not None:
            backends.append(
                WebhookBackend(
                    options.webhook_config_file,
                    buffer_size=options.webhook_buffer_size,
                    batch_max_size=options.webhook_batch_max_size,
                    batch_max_wait=options.webhook_batch_max_wait,
                    initial_backoff=options.webhook_initial_backoff,
                    metrics=metrics,
                )
            )
        auditor = cls(
            options.policy, backends, max_object_bytes=options.max_object_bytes
        )
        started: list[Backend] = []
        try:
            for backend in backends:
                await backend.start()
                started.append(backend)
        except BaseException:
            for backend in started:
                await backend.close()
            raise
        return auditor

    def begin(
        self,
        method: str,
        path: str,
        query: str = "",
        *,
        request_uri: str | None = None,
        user: UserInfo | None,
        source_ips: Sequence[str] = (),
        user_agent: str = "",
        audit_id: str | None = None,
        long_running: bool = False,
        received: float | None = None,
    ) -> AuditContext | None:
        """Start auditing a request; ``None`` when the policy says ``None``.

        ``path`` is percent-decoded, ``query`` raw; ``request_uri`` is the
        target as the client sent it (default: ``path?query``); ``user`` the
        authenticated identity (``None``: the token was refused or missing);
        ``audit_id`` a trusted incoming ``Audit-ID`` (module docstring);
        ``received`` the wall time the request arrived (default: now), since
        the policy can only be evaluated once authentication is done.
        Emits ``RequestReceived`` unless the policy omits it.
        """
        info = request_info(method, path, query)
        groups = _with_authenticated(user) if user is not None else ()
        config = evaluate(
            self.policy,
            attributes_of(info, user.username if user is not None else None, groups),
        )
        if config.level == "None":
            return None
        if audit_id is None or not _AUDIT_ID.fullmatch(audit_id):
            audit_id = self._new_id()
        now = self.clock() if received is None else received
        ctx = AuditContext(
            self,
            config,
            info,
            audit_id=audit_id,
            request_uri=request_uri
            if request_uri is not None
            else (f"{path}?{query}" if query else path),
            user=user_info(user),
            ips=list(source_ips),
            user_agent=user_agent,
            received=now,
            long_running=long_running,
        )
        if "RequestReceived" not in config.omit_stages:
            ctx._emit("RequestReceived")
        return ctx

    def emit(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to every backend (each takes it without waiting)."""
        for backend in self.backends:
            backend.emit(event)

    @property
    def dropped(self) -> dict[str, int]:
        """Events dropped so far, by backend name (also in the metrics)."""
        out: dict[str, int] = {}
        for backend in self.backends:
            drops = getattr(backend, "drops", None)
            if drops is not None:
                out[backend.name] = drops.count
        return out

    async def close(self) -> None:
        """Flush and stop every backend (each bounded in time)."""
        for backend in self.backends:
            await backend.close()
