"""The impersonating proxy: authenticate the caller, then call the API server as
ourselves, impersonating them.

For managed clusters whose API server flags cannot be edited: kubectl talks to
this proxy with its OIDC token; the proxy validates it with the same engine as
the webhook and forwards the request with its own credential and the
``Impersonate-*`` headers that name the mapped user. The API server then
authorises the *user* (RBAC on the impersonated identity) and the proxy's
service account only needs the right to impersonate.

Order of checks (each refusal is final; nothing goes upstream on a refusal):

1. request headers within ``max_header_bytes`` (431);
2. exactly one credential: ``Authorization: Bearer <token>`` (scheme in any
   case, exactly one header) or, on a WebSocket upgrade only, the subprotocol
   ``base64url.bearer.authorization.k8s.io.<base64url token>`` as
   kube-apiserver accepts it for browsers (401 otherwise);
3. ``authenticate``: a ``TokenError`` is 401 (503 with ``Retry-After`` when
   the keys are not loaded yet); "not mine" is 401 unless ``token_passthrough``,
   which forwards the request unchanged (client credential and all) and lets
   the API server decide; never when the proxy's own credential is a client
   certificate, which the API server would authenticate first;
4. the mapped identity: an empty username is 401; a ``system:`` username or
   group is 403 unless listed in ``allow_reserved_groups`` (an IdP must not be
   able to mint ``system:masters``); a value that HTTP would alter (control
   characters, surrounding blanks, which a server trims) is 403, since it
   would arrive as a *different* identity;
5. client ``Impersonate-*`` headers (any case): 403 by default. With
   ``allow_client_impersonation`` (``kubectl --as``) every requested value is
   checked with a SubjectAccessReview *as the authenticated user*, the way
   kube-apiserver's impersonation filter checks it (verb ``impersonate`` on
   ``users`` or, for ``system:serviceaccount:<ns>:<name>``, the namespaced
   ``serviceaccounts``; ``groups``; ``userextras`` with the key as
   subresource and ``uids``, both in ``authentication.k8s.io``); more than
   ``max_impersonation_values`` values is 431, a group/extra/uid without a
   user or a repeated user/uid is 400, an unknown ``Impersonate-`` header is
   400. On success the requested identity is forwarded instead, plus the
   reserved extra ``kube-oidc-gate.io/original-user`` (``ORIGINAL_USER_EXTRA``):
   the authenticated user as compact JSON ``{"username", "uid", "groups"}``,
   so the API server's audit log and authorisation webhooks still see who
   is behind the ``--as``. A client can never send that key itself (403, in
   any case or escaping that would decode to it). It is not reviewed as the
   user (the user did not ask for it); the API server checks that the
   proxy's service account may impersonate exactly
   ``userextras/kube-oidc-gate.io/original-user``.

What reaches the API server: the client's headers minus ``Authorization``, every
``Impersonate-*``, the hop-by-hop headers (and those ``Connection`` names; but
``Connection: Upgrade`` + ``Upgrade`` are kept on an upgrade), ``Host``,
``Expect``, ``Audit-ID``, the bearer WebSocket subprotocol, ``X-Remote-User/Group/Extra-*``
(request-header authentication names: dropped so that a proxy credential
trusted by a front-proxy CA can never make a client's header count) and a
client ``X-Forwarded-For`` unless the peer is in ``trusted_proxies``; plus our
``X-Forwarded-For``, the proxy's credential, ``Impersonate-User``, one
``Impersonate-Group`` per group, ``Impersonate-Uid`` when non-empty and
``Impersonate-Extra-<key>`` per value, the key percent-encoded as client-go
does, and our ``Audit-ID`` when the request is audited. The API server adds
``system:authenticated`` itself.

Auditing (``auditor``, ``--audit-policy-file``; ``proxy.audit.auditor``): the
policy is consulted once per request when authentication is done (with no
user when the request is refused before that, the synchronous refusals of
``handle`` included); ``impersonatedUser`` once an ``--as`` is approved;
``ResponseStarted`` when a long-running request's head or ``101`` goes out;
``ResponseComplete`` in ``Recorder.finish`` (or with the body, for an answer held
whole), ``Panic`` on an unexpected failure. Our audit id goes upstream as
``Audit-ID`` and back to the client as ``Audit-Id``. Without an auditor the
handler does nothing more per request (``proxy.access.Entry`` keeps no audit slots).

Streaming: request and response bodies are relayed chunk by chunk with
backpressure, never buffered whole. Long-running requests are recognised as
kube-apiserver does (verb ``watch``, or subresource ``log``, ``exec``,
``attach``, ``portforward``, ``proxy``) plus every upgrade: they get no total
timeout, only an idle limit (no bytes for ``stream_idle_timeout`` /
``tunnel_idle_timeout``); a client's disconnect cancels its request at once
(``proxy.http1``), even while the stream is silent. Every other request must
finish within ``request_timeout``. Request bodies up to 64 KiB with a length
are read whole first; larger or chunked ones (``kubectl cp``, a large
``apply``) stream through under the length the client declared, or chunked.

Every request reaches the API server through one client, the pool of
``proxy.upstream_pool`` (``Upstream.fetch``/``Upstream.upgrade``), whose answers
llhttp parses. Upgrades (``Connection: Upgrade`` with ``Upgrade: websocket`` or
``SPDY/...``) go out on a fresh pooled connection with the pool's own
``Connection``/``Upgrade`` fields; a ``101`` is relayed to the client and the
connection is handed over to ``proxy.tunnel``, which copies the bytes; any
other answer is relayed as an ordinary response (kubectl needs that body to
fall back from WebSocket to SPDY or to print the error).

One listener: every request, of every kind, is read by ``proxy.http1`` (llhttp)
and served by ``_ProxyHandler.handle``; a cached verdict's refusal is answered
without a task, everything else runs as one task per request.

The rooms: this module composes the steps above and holds the settings;
``proxy.identity`` is the policy (credentials, the mapped and requested
identities, request classification; pure, tabled in tests/test_identity.py),
``proxy.headers`` the header hygiene, ``proxy.sar`` the SubjectAccessReview
client, ``proxy.relay`` the three upstream exchanges and ``proxy.access`` the
access log, metrics and audit record of each request.

Errors are Kubernetes ``Status`` objects with short, generic messages; the
detail goes to this module's log. One access-log line per request goes to the
``proxy.access`` logger (event ``request``), plus an event ``request started``
when a long-running request begins. No token is ever logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from multidict import CIMultiDict

from proxy import http1
from proxy.access import Entry, Recorder
from proxy.audit.auditor import Auditor
from proxy.errors import IssuerMismatch, TokenError, UpstreamError
from proxy.headers import IPNetwork, forward_headers
from proxy.identity import (
    BEARER_PROTOCOL_PREFIX,
    ORIGINAL_USER_EXTRA,
    Identity,
    Refusal,
    check_identity,
    classify_request,
    classify_target,
    decoded_path,
    escape_extra_key,
    original_user_json,
    presented_token,
    request_kind,
    requested_identity,
    token_refusal,
    upgrade_protocol,
    with_original,
)
from proxy.kube import PerUser, UserInfo, status_body
from proxy.metrics import Metrics
from proxy.relay import Relay
from proxy.sar import ImpersonationReviewer
from proxy.upstream import Upstream

__all__ = [
    "BEARER_PROTOCOL_PREFIX",
    "ORIGINAL_USER_EXTRA",
    "ProxySettings",
    "TokenAuthenticator",
    "classify_request",
    "escape_extra_key",
    "original_user_json",
    "proxy_server",
]

log = logging.getLogger(__name__)

#: Users whose checked ``Impersonate-*`` headers are kept (see ``_own_headers``).
_IDENTITY_CACHE: Final = 1024
_UPSTREAM_MESSAGES: Final = {
    502: "bad response from the API server",
    503: "the API server is unavailable",
    504: "the API server did not answer in time",
}
_UPSTREAM_LABELS: Final = {502: "error", 503: "unavailable", 504: "timeout"}
_Headers = CIMultiDict[str]
#: Bodies read whole before the API server is called (kubectl's requests are
#: mostly far smaller); larger and chunked ones are streamed through.
_WHOLE_BODY: Final = 64 * 1024
#: Request line bytes the listener allows beyond ``max_header_bytes``.
_REQUEST_LINE: Final = 16 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """Everything the proxy handler decides with; the CLI fills it from flags."""

    #: Let clients ask for another identity (``kubectl --as``), each value
    #: checked by a SubjectAccessReview as the authenticated user.
    allow_client_impersonation: bool = False
    #: Most ``Impersonate-*`` values one request may carry (each costs one
    #: SubjectAccessReview); more is refused with 431.
    max_impersonation_values: int = 16
    #: Forward tokens of no configured issuer unchanged (no impersonation) and
    #: let the API server authenticate them; off means 401.
    token_passthrough: bool = False
    #: ``system:`` names (user or group) a token may map to; others are 403.
    allow_reserved_groups: tuple[str, ...] = ()
    #: Peers whose ``X-Forwarded-For`` is kept (and appended to).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Seconds to open a connection (TCP + TLS) to the API server.
    connect_timeout: float = 10.0
    #: Seconds for a whole non-streaming request, and for the API server's
    #: response head of any request (longer than kube-apiserver's default
    #: 60 s so that its own timeout answer wins).
    request_timeout: float = 90.0
    #: Seconds without a byte from the API server after which a watch or log
    #: stream is ended (0: never). kube-apiserver ends watches after 30-60 min.
    stream_idle_timeout: float = 4 * 3600.0
    #: Seconds without a byte either way after which exec/attach/port-forward
    #: is closed (0: never); 4 h is the kubelet's streaming idle default.
    tunnel_idle_timeout: float = 4 * 3600.0
    #: Seconds for one SubjectAccessReview.
    sar_timeout: float = 10.0
    #: Largest total size of a request's headers (names + values) accepted.
    max_header_bytes: int = 256 * 1024
    #: The proxy's own refusals logged in full per cause and second; the rest
    #: are counted in one line (``proxy.log.RefusalLimiter``); 0 logs all.
    refusal_log_limit: int = 10


class TokenAuthenticator(Protocol):
    """What the handler calls on ``proxy.authn.Authenticator``: its two steps.

    ``lookup`` gives a remembered verdict without waiting, so that ``handle``
    answers a cached refusal without creating a task; ``validate`` finishes
    a miss.
    """

    def lookup(self, token: str) -> tuple[bytes, UserInfo | None]:
        """The cache key and the remembered user (``None``: a miss), or
        raise the remembered ``TokenError``.
        """
        ...

    async def validate(self, token: str, key: bytes) -> UserInfo | None:
        """The user of a token ``lookup`` missed, ``None`` for "not mine",
        or raise ``TokenError``.
        """
        ...


#: The few refusal bodies there are, encoded once each (the messages are fixed
#: texts or name a requested identity; bounded all the same).
_status_body: Final = functools.lru_cache(maxsize=256)(status_body)


class _ProxyHandler:
    """The catch-all route: see the module docstring for the whole pipeline."""

    def __init__(
        self,
        authenticator: TokenAuthenticator,
        upstream: Upstream,
        settings: ProxySettings,
        metrics: Metrics | None,
        stopping: asyncio.Event | None,
        *,
        auditor: Auditor | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._upstream = upstream
        self._settings = settings
        self._recorder = recorder = Recorder(
            metrics=metrics,
            auditor=auditor,
            trusted_proxies=settings.trusted_proxies,
            refusal_log_limit=settings.refusal_log_limit,
        )
        self._relay = Relay(upstream, settings, recorder, stopping)
        self._reviewer = ImpersonationReviewer(
            upstream,
            connect_timeout=settings.connect_timeout,
            sar_timeout=settings.sar_timeout,
        )
        self._identities = PerUser(self._checked_headers, limit=_IDENTITY_CACHE)

    def cleanup(self) -> None:
        """Report the refusals not logged yet (the server is stopping)."""
        self._recorder.flush()

    def handle(
        self, request: http1.Request
    ) -> http1.Answer | Coroutine[Any, Any, http1.Answer | None]:
        """Serve one request (the listener's only route).

        The checks before the upstream call run here, synchronously, up to the
        cache lookup: a refusal they reach (a replayed bad or expired token,
        no token) is answered without creating a task, which is most of what
        a refusal costs beyond the protocol and the log line.
        """
        path = decoded_path(request.path)
        src = CIMultiDict(request.fields)
        upgrade = upgrade_protocol(src) if request.upgrade else None
        verb, subresource = classify_target(request.method, request.target)
        kind = request_kind(upgrade, verb, subresource)
        entry = self._recorder.entry(request.method, path, verb, kind)
        key = b""
        user: UserInfo | None = None
        token = ""
        try:
            token, protocols = presented_token(
                src,
                size=request.size,
                max_header_bytes=self._settings.max_header_bytes,
                target=request.target,
                upgrade=upgrade,
            )
            key, user = self._authenticator.lookup(token)
        except TokenError as err:
            if self._passes_through(err):
                return self._serve(
                    request,
                    entry,
                    src,
                    token,
                    protocols=None,
                    upgrade=upgrade,
                    key=key,
                    user=None,
                    foreign=True,
                )
            return self._answer_now(token_refusal(err), entry, request, src)
        except Refusal as refusal:
            return self._answer_now(refusal, entry, request, src)
        except Exception:
            log.exception("proxy handler failed")
            answer = self._failed(entry, request, src)
            self._recorder.finish(entry, request, src)
            return answer
        return self._serve(
            request,
            entry,
            src,
            token,
            protocols=protocols,
            upgrade=upgrade,
            key=key,
            user=user,
        )

    def _answer_now(
        self, err: Refusal, entry: Entry, request: http1.Request, src: _Headers
    ) -> http1.Answer:
        """A refusal ``handle`` reached before any task: answered and finished."""
        answer = self._refusal_answer(err, entry, request, src)
        self._recorder.finish(entry, request, src)
        return answer

    def _refused(
        self, err: Refusal | UpstreamError, entry: Entry
    ) -> tuple[int, str, Mapping[str, str] | None]:
        """The answer to a refusal or an upstream failure, recorded in ``entry``."""
        if isinstance(err, Refusal):
            # Said once, in the request's access line (a refused token is the
            # common refusal): at most one line each, none past the limit.
            entry.detail = err.detail or err.message
            entry.reason = err.reason
            entry.cause = err.cause
            entry.status = err.status
            return err.status, err.message, err.headers
        log.warning("upstream failed", extra={"status": err.status, "detail": str(err)})
        self._recorder.count_upstream(_UPSTREAM_LABELS.get(err.status, "error"))
        entry.status = err.status
        return err.status, _UPSTREAM_MESSAGES.get(err.status, "proxy error"), None

    def _passes_through(self, err: TokenError) -> bool:
        """Whether a refused token is still "not mine" here: a near-miss
        issuer under ``--token-passthrough`` goes to the API server, which
        may know that issuer (only our explanation of it changed).
        """
        return (
            self._settings.token_passthrough
            and isinstance(err, IssuerMismatch)
            and err.near_miss
        )

    def _refusal_answer(
        self,
        err: Refusal | UpstreamError,
        entry: Entry,
        request: http1.Request,
        src: _Headers,
    ) -> http1.Answer:
        status, message, extra = self._refused(err, entry)
        body = _status_body(status, message)
        headers = tuple(extra.items()) if extra else ()
        recorder = self._recorder
        if recorder.auditor is not None:
            # Refused before authentication finished: audited with no user,
            # as kube-apiserver audits a failed authentication.
            audited = recorder.audit_refusal(entry, request, src, status, body)
            headers = (*headers, *audited)
        return http1.Answer(status, body, headers)

    def _failed(
        self, entry: Entry, request: http1.Request, src: _Headers
    ) -> http1.Answer:
        """The answer to an unexpected failure: 500, and a ``Panic`` event."""
        entry.status = 500
        headers = self._recorder.audit_panic(entry, request, src)
        return http1.Answer(500, _status_body(500, "internal error"), headers)

    async def _serve(
        self,
        request: http1.Request,
        entry: Entry,
        src: _Headers,
        token: str,
        *,
        protocols: list[str] | None,
        upgrade: str | None,
        key: bytes,
        user: UserInfo | None,
        foreign: bool = False,
    ) -> http1.Answer | None:
        """The rest of a request: validation on a cache miss, the checks
        after it, the upstream exchange. ``foreign``: the token is known not
        to be ours (``_passes_through``).
        """
        recorder = self._recorder
        try:
            if user is None and not foreign:
                try:
                    user = await self._authenticator.validate(token, key)
                except TokenError as err:
                    if not self._passes_through(err):
                        raise token_refusal(err) from err
            audit = (
                recorder.audit_begin(entry, request, src, user)
                if recorder.auditor is not None
                else None
            )
            headers = await self._admitted(
                user,
                src,
                peer=request.peer,
                entry=entry,
                protocols=protocols,
            )
            if audit is not None:
                headers.append(recorder.audit_admitted(audit, request, entry))
            if upgrade is not None:
                return await self._relay.forward_upgrade(
                    request, headers, entry, upgrade
                )
            if entry.kind is not None:
                return await self._relay.forward_stream(request, headers, entry)
            return await self._relay.forward(request, headers, entry)
        except (Refusal, UpstreamError) as refusal:
            return self._refusal_answer(refusal, entry, request, src)
        except asyncio.CancelledError:
            # The listener cancels a request whose client has gone.
            entry.outcome = "client_closed"
            raise
        except Exception:
            if entry.prepared:
                if entry.audit is not None:
                    entry.audit.panic()
                request.abort()
                raise
            log.exception("proxy handler failed")
            return self._failed(entry, request, src)
        finally:
            recorder.finish(entry, request, src)

    async def _admitted(
        self,
        user: UserInfo | None,
        src: _Headers,
        *,
        peer: str | None,
        entry: Entry,
        protocols: list[str] | None,
    ) -> list[tuple[str, str]]:
        """The checks after authentication; the headers to forward."""
        settings = self._settings
        if user is None:
            if not settings.token_passthrough:
                raise Refusal(
                    401,
                    "Unauthorized",
                    "token of no configured issuer",
                    reason="not_mine",
                )
            if self._upstream.client_certificate:
                # The API server would authenticate our certificate, not the
                # client's token: the client would act as the proxy.
                raise Refusal(401, "Unauthorized", "passthrough over a client cert")
            entry.mode = "passthrough"
            return forward_headers(
                src, peer, settings.trusted_proxies, passthrough=True, protocols=None
            )
        entry.user = user.username
        entry.groups_count = len(user.groups)
        impersonate: Sequence[tuple[str, str]] = self._own_headers(user)
        identity = requested_identity(
            src,
            allowed=settings.allow_client_impersonation,
            max_values=settings.max_impersonation_values,
        )
        if identity is not None:
            entry.as_user = identity.username
            await self._reviewer.authorize(user, identity)
            if entry.audit is not None:
                entry.audit.set_impersonated(identity.user_info())
            impersonate = with_original(identity, user).headers()
        headers = forward_headers(
            src, peer, settings.trusted_proxies, passthrough=False, protocols=protocols
        )
        headers.extend(self._upstream.auth_items)
        headers.extend(impersonate)
        return headers

    def _own_headers(self, user: UserInfo) -> tuple[tuple[str, str], ...]:
        """The checked ``Impersonate-*`` headers for ``user``, once per cached user."""
        return self._identities(user)

    def _checked_headers(self, user: UserInfo) -> tuple[tuple[str, str], ...]:
        check_identity(user, self._settings.allow_reserved_groups)
        return tuple(Identity.of(user).headers())


def proxy_server(
    *,
    authenticator: TokenAuthenticator,
    upstream: Upstream,
    settings: ProxySettings,
    metrics: Metrics | None,
    max_field_bytes: int | None = None,
    auditor: Auditor | None = None,
) -> http1.Server:
    """The proxy's listener: every method and path goes to one handler.

    The server's ``stopping`` event (set when it starts draining) ends watches
    and log streams with a proper end of body and closes tunnels on both
    sides, instead of holding the grace period and being cut.
    """
    server = http1.Server(
        {},
        limits=http1.Limits(
            max_head_bytes=settings.max_header_bytes + _REQUEST_LINE,
            max_headers=4096,
            max_field_bytes=max_field_bytes,
            max_body_bytes=_WHOLE_BODY,
            stream_bodies=True,
            body_timeout=settings.request_timeout,
        ),
        error_body=status_body,
    )
    handler = _ProxyHandler(
        authenticator, upstream, settings, metrics, server.stopping, auditor=auditor
    )
    server.default = http1.Route(handler.handle, methods=None)
    server.on_drained.append(handler.cleanup)
    return server
