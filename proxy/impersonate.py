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
``ResponseComplete`` in ``_finish`` (or with the body, for an answer held
whole), ``Panic`` on an unexpected failure. Our audit id goes upstream as
``Audit-ID`` and back to the client as ``Audit-Id``. Without an auditor the
handler does nothing more per request (``_Entry`` keeps no audit slots).

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

Errors are Kubernetes ``Status`` objects with short, generic messages; the
detail goes to this module's log. One access-log line per request goes to the
``proxy.access`` logger (event ``request``), plus an event ``request started``
when a long-running request begins. No token is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import json
import logging
import re
import string
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Protocol

from multidict import CIMultiDict

from proxy import framing, http1, tunnel
from proxy.audit.auditor import AuditContext, Auditor
from proxy.audit.event import REQUEST_OBJECT_NOTE, RESPONSE_OBJECT_NOTE, source_ips
from proxy.errors import IssuerMismatch, TokenError, UpstreamError
from proxy.kube import SYSTEM_AUTHENTICATED, PerUser, UserInfo, status_body
from proxy.log import RefusalLimiter, RequestLog
from proxy.metrics import Metrics
from proxy.upstream import Upstream
from proxy.upstream_pool import PooledResponse

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
access_log = RequestLog("proxy.access")

#: WebSocket subprotocol prefix carrying a bearer token (kube-apiserver's).
BEARER_PROTOCOL_PREFIX: Final = "base64url.bearer.authorization.k8s.io."

#: The extra key under which an approved ``--as`` carries the user who asked
#: (reserved: a client sending it is refused; see the module docstring).
ORIGINAL_USER_EXTRA: Final = "kube-oidc-gate.io/original-user"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Dropped from every forwarded request, whatever the mode.
_REQUEST_DROP: Final = frozenset(
    {
        "host",
        "expect",
        # Ours is sent when the request is audited (it names our event and
        # the API server's); a client's would let it pick the id of records.
        "audit-id",
        "x-forwarded-for",
        "x-remote-user",
        "x-remote-group",
        "x-remote-uid",
    }
)
#: What ``_forward_headers`` never forwards, by mode (names, name prefixes).
_FORWARD_DROP_PASSTHROUGH: Final = framing.HOP_BY_HOP | framing.FRAMING | _REQUEST_DROP
_FORWARD_DROP: Final = _FORWARD_DROP_PASSTHROUGH | {"authorization"}
_FORWARD_DROP_PREFIXES_PASSTHROUGH: Final = ("x-remote-extra-",)
_FORWARD_DROP_PREFIXES: Final = ("x-remote-extra-", "impersonate-")
#: Users whose checked ``Impersonate-*`` headers are kept (see ``_own_headers``).
_IDENTITY_CACHE: Final = 1024
_LONG_SUBRESOURCES: Final = frozenset({"log", "exec", "attach", "portforward", "proxy"})
_VERBS: Final = {
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
}
_TRUE: Final = frozenset({"1", "t", "true"})
_SAR_PATH: Final = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
_AUTH_GROUP: Final = "authentication.k8s.io"
_SA_PREFIX: Final = "system:serviceaccount:"
_IMPERSONATE: Final = "impersonate-"
_IMPERSONATE_EXTRA: Final = "impersonate-extra-"
_MAX_ERROR_BODY: Final = 1024 * 1024
_MAX_SAR_BODY: Final = 256 * 1024
_UNSAFE_VALUE: Final = re.compile(r"[\x00-\x1f\x7f]")
#: Bytes an extra key keeps as they are in a header name. Upper-case letters
#: are not among them (client-go keeps them): kube-apiserver lower-cases the
#: name before percent-decoding it, so only an encoded capital survives.
_HEADER_KEY_SAFE: Final = frozenset(
    "!#$&'*+-.^_`|~" + string.ascii_lowercase + string.digits
)
#: kube-apiserver's ``serviceaccount.SplitUsername``: a namespace is a DNS-1123
#: label, a name a DNS-1123 subdomain; anything else is an ordinary user.
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
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
#: The annotation saying why the proxy refused a request it audited.
_REFUSAL_NOTE: Final = "kube-oidc-gate.io/refusal"
_MODE_NOTE: Final = "kube-oidc-gate.io/mode"
_MAX_NOTE: Final = 256


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
    """What the handler needs from ``proxy.authn.Authenticator``."""

    async def authenticate(self, token: str) -> UserInfo | None:
        """The user, ``None`` for "not mine", or raise ``TokenError``."""
        ...


# --------------------------------------------------------------------------
# Small pure helpers


class _Refusal(Exception):
    """A request the proxy answers itself; ``detail`` is for the log only.

    ``cause`` is what the refusal log limit counts by: the detail, unless that
    names a figure of this request (a size, a header's name), when it is the
    message.
    """

    def __init__(
        self,
        status: int,
        message: str,
        detail: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        cause: str = "",
        reason: str = "",
    ) -> None:
        super().__init__(detail or message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})
        self.cause = cause or detail or message
        #: The engine's reason code, for a refused token.
        self.reason = reason


#: The few refusal bodies there are, encoded once each (the messages are fixed
#: texts or name a requested identity; bounded all the same).
_status_body: Final = functools.lru_cache(maxsize=256)(status_body)


def _token_refusal(err: TokenError) -> _Refusal:
    """A refused token's answer: 401, or 503 while the keys are not loaded.

    The access line says the ``reason`` code and, as ``detail``, the engine's
    message (claim values and issuers, never the token); the refusal log
    limit counts by the reason alone, so distinct values cannot flood it.
    """
    if err.temporary:
        return _Refusal(
            503,
            "authentication temporarily unavailable",
            str(err),
            headers={"Retry-After": "5"},
            cause=err.reason,
            reason=err.reason,
        )
    return _Refusal(401, "Unauthorized", str(err), cause=err.reason, reason=err.reason)


def classify_request(
    method: str, path: str, query: Mapping[str, str]
) -> tuple[str, str]:
    """The Kubernetes verb and subresource of a request (kube-apiserver's rules,
    simplified): ``get``/``list``/``watch``/``create``/``update``/``patch``/
    ``delete``/``deletecollection`` for resource paths, the lower-case method for
    others.
    """
    parts = [p for p in path.split("/") if p]
    method = method.upper()
    if not parts or parts[0] not in ("api", "apis"):
        return method.lower(), ""
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    watching = bool(rest) and rest[0] == "watch"
    if watching:
        rest = rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    named = len(rest) >= 2
    subresource = rest[2] if len(rest) >= 3 else ""
    if method in ("GET", "HEAD"):
        if watching or query.get("watch", "").lower() in _TRUE:
            return "watch", subresource
        return ("get" if named else "list"), subresource
    if method == "DELETE":
        return ("delete" if named else "deletecollection"), subresource
    return _VERBS.get(method, method.lower()), subresource


def _decoded_path(path: str) -> str:
    """The path as aiohttp's ``request.path`` gives it (percent-decoded)."""
    return urllib.parse.unquote(path) if "%" in path else path


def _classify_target(method: str, target: str) -> tuple[str, str]:
    """``classify_request`` for a raw request target (path and query)."""
    path, _, query = target.partition("?")
    params: dict[str, str] = {}
    if query:
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            params.setdefault(name, value)
    return classify_request(method, _decoded_path(path), params)


def escape_extra_key(key: str) -> str:
    """Percent-encode an extra key for a header name so that kube-apiserver
    (which lower-cases the name, then percent-decodes it) reads back exactly
    ``key``: client-go's encoding plus upper-case letters, without which a key
    authorised as ``Scopes`` would arrive as ``scopes``.
    """
    return "".join(
        chr(b) if chr(b) in _HEADER_KEY_SAFE else f"%{b:02X}" for b in key.encode()
    )


def _connection_tokens(headers: _Headers) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _upgrade_protocol(headers: _Headers) -> str | None:
    """The ``Upgrade`` value when this is an upgrade we relay, else ``None``."""
    if "upgrade" not in _connection_tokens(headers):
        return None
    value = headers.get("Upgrade", "").strip()
    lowered = value.lower()
    if lowered == "websocket" or lowered.startswith("spdy/"):
        return value
    return None


def _has_blank(text: str) -> bool:
    """Whether ``text`` holds any whitespace (what ``re``'s ``\\s`` matches).

    ``str.split`` splits on exactly those characters and scans a kilobyte
    token in 0.5 µs, where ``re.search(r"\\s")`` took 4.1 µs.
    """
    return bool(text) and text.split(None, 1) != [text]


def _credentials(headers: _Headers, websocket: bool) -> tuple[str, list[str] | None]:
    """The bearer token, and the remaining WebSocket subprotocols if the token
    came from one (``None`` when the ``Sec-WebSocket-Protocol`` header is to be
    forwarded untouched).
    """
    authorization = headers.getall("Authorization", [])
    protocols: list[str] = []
    for value in headers.getall("Sec-WebSocket-Protocol", ()) if websocket else ():
        protocols.extend(p.strip() for p in value.split(",") if p.strip())
    bearer = [p for p in protocols if p.startswith(BEARER_PROTOCOL_PREFIX)]
    if len(authorization) > 1:
        raise _Refusal(401, "Unauthorized", "more than one authorization header")
    if authorization and bearer:
        raise _Refusal(401, "Unauthorized", "token in both header and subprotocol")
    if authorization:
        # kube-apiserver's reading: the scheme in any case, one space, a token
        # without blanks; anything else (tabs, two spaces) is refused here as
        # it is there.
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token or _has_blank(token):
            raise _Refusal(401, "Unauthorized", "authorization is not a bearer token")
        return token, None
    if len(bearer) == 1:
        encoded = bearer[0][len(BEARER_PROTOCOL_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            token = raw.decode("utf-8")
        except (binascii.Error, ValueError) as err:
            raise _Refusal(
                401, "Unauthorized", "undecodable bearer subprotocol"
            ) from err
        if not token:
            raise _Refusal(401, "Unauthorized", "empty bearer subprotocol")
        return token, [p for p in protocols if not p.startswith(BEARER_PROTOCOL_PREFIX)]
    if bearer:
        raise _Refusal(401, "Unauthorized", "more than one bearer subprotocol")
    raise _Refusal(401, "Unauthorized", "no bearer token")


def _unsafe(value: str) -> bool:
    return not value or value != value.strip(" \t") or bool(_UNSAFE_VALUE.search(value))


def _check_identity(user: UserInfo, allowed: Sequence[str]) -> None:
    if not user.username:
        raise _Refusal(401, "Unauthorized", "token maps to an empty username")
    for value in (user.username, *user.groups):
        if value.startswith("system:") and value not in allowed:
            raise _Refusal(
                403, "forbidden: reserved identity", "reserved name in token"
            )
    values = [
        user.username,
        *user.groups,
        *(v for vs in user.extra.values() for v in vs),
    ]
    if user.uid:
        values.append(user.uid)
    if any(_unsafe(v) for v in values) or any(_unsafe(k) for k in user.extra):
        raise _Refusal(
            403, "forbidden: identity not expressible", "unsafe header value"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Identity:
    """Who the API server should see: the mapped user or an approved ``--as``."""

    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, user: UserInfo) -> _Identity:
        return cls(
            username=user.username, groups=user.groups, uid=user.uid, extra=user.extra
        )

    def user_info(self) -> UserInfo:
        """This identity as the audit log's ``impersonatedUser``."""
        return UserInfo(
            username=self.username,
            uid=self.uid,
            groups=self.groups,
            extra=MappingProxyType(dict(self.extra)),
        )

    def headers(self) -> list[tuple[str, str]]:
        out = [("Impersonate-User", self.username)]
        out.extend(("Impersonate-Group", g) for g in self.groups)
        if self.uid:
            out.append(("Impersonate-Uid", self.uid))
        for key, values in self.extra.items():
            name = "Impersonate-Extra-" + escape_extra_key(key)
            out.extend((name, v) for v in values)
        return out


def _requested_identity(headers: _Headers, settings: ProxySettings) -> _Identity | None:
    """The identity the client asks for with ``Impersonate-*``, or ``None``."""
    users: list[str] = []
    groups: list[str] = []
    uids: list[str] = []
    extra: dict[str, list[str]] = {}
    unknown: list[str] = []
    count = 0
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith(_IMPERSONATE):
            continue
        count += 1
        if lower == "impersonate-user":
            users.append(value)
        elif lower == "impersonate-group":
            groups.append(value)
        elif lower == "impersonate-uid":
            uids.append(value)
        elif lower.startswith(_IMPERSONATE_EXTRA) and len(lower) > len(
            _IMPERSONATE_EXTRA
        ):
            key = urllib.parse.unquote(lower[len(_IMPERSONATE_EXTRA) :])
            extra.setdefault(key, []).append(value)
        else:
            unknown.append(lower)
    if not count:
        return None
    if not settings.allow_client_impersonation:
        raise _Refusal(403, "impersonation is not allowed through this proxy")
    # Compared without case: kube-apiserver's keys are case-sensitive, but a
    # near-twin of the reserved key would mislead whoever reads the audit log.
    if any(key.lower() == ORIGINAL_USER_EXTRA for key in extra):
        raise _Refusal(
            403,
            f'forbidden: the extra "{ORIGINAL_USER_EXTRA}" is set by the proxy, '
            "never by a client",
            "client sent the reserved original-user extra",
        )
    if count > settings.max_impersonation_values:
        raise _Refusal(
            431,
            "too many impersonation headers",
            f"{count} values",
            cause="too many impersonation headers",
        )
    if unknown:
        raise _Refusal(
            400,
            "unknown impersonation header",
            f"headers {unknown!r}",
            cause="unknown impersonation header",
        )
    if len(users) != 1 or not users[0] or len(uids) > 1:
        raise _Refusal(400, "impersonation requires exactly one Impersonate-User")
    return _Identity(
        username=users[0],
        groups=tuple(groups),
        uid=uids[0] if uids else "",
        extra={k: tuple(v) for k, v in extra.items()},
    )


def original_user_json(user: UserInfo) -> str:
    """The ``ORIGINAL_USER_EXTRA`` value for ``user``: compact JSON, ASCII only
    (``\\u`` escapes), so that a header carries it unchanged; groups as the
    token mapped them (the API server adds ``system:authenticated``).
    """
    return json.dumps(
        {"username": user.username, "uid": user.uid, "groups": list(user.groups)},
        separators=(",", ":"),
    )


def _with_original(identity: _Identity, user: UserInfo) -> _Identity:
    """The approved ``--as`` identity plus who asked for it (module docstring)."""
    return replace(
        identity,
        extra={**identity.extra, ORIGINAL_USER_EXTRA: (original_user_json(user),)},
    )


def _impersonation_checks(identity: _Identity) -> list[dict[str, str]]:
    """One ``resourceAttributes`` per requested value, as kube-apiserver checks."""
    checks: list[dict[str, str]] = []
    user = identity.username
    ns, _, name = user.removeprefix(_SA_PREFIX).partition(":")
    if (
        user.startswith(_SA_PREFIX)
        and _DNS_LABEL.fullmatch(ns)
        and len(name) <= 253
        and _DNS_SUBDOMAIN.fullmatch(name)
    ):
        checks.append({"resource": "serviceaccounts", "namespace": ns, "name": name})
    else:
        checks.append({"resource": "users", "name": user})
    checks.extend({"resource": "groups", "name": g} for g in identity.groups)
    for key, values in identity.extra.items():
        checks.extend(
            {
                "group": _AUTH_GROUP,
                "resource": "userextras",
                "subresource": key,
                "name": v,
            }
            for v in values
        )
    if identity.uid:
        checks.append({"group": _AUTH_GROUP, "resource": "uids", "name": identity.uid})
    for check in checks:
        check.setdefault("group", "")
        check["verb"] = "impersonate"
    return checks


def _trusted(peer: str | None, networks: Sequence[IPNetwork]) -> bool:
    if peer is None or not networks:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def _forward_headers(
    src: _Headers,
    peer: str | None,
    settings: ProxySettings,
    *,
    passthrough: bool,
    protocols: list[str] | None,
) -> list[tuple[str, str]]:
    """The client's headers as they may go upstream (see the module docstring),
    in their order; every header added here is one the loop dropped, so
    appending puts it where replacing would.
    """
    drop = _FORWARD_DROP_PASSTHROUGH if passthrough else _FORWARD_DROP
    prefixes = (
        _FORWARD_DROP_PREFIXES_PASSTHROUGH if passthrough else _FORWARD_DROP_PREFIXES
    )
    # What the client's Connection names, never a framing, routing or
    # identity field (proxy.framing): those follow the fixed rules above.
    extra = set(framing.connection_tokens(src.getall("Connection", ())))
    if protocols is not None:
        extra.add("sec-websocket-protocol")
    out: list[tuple[str, str]] = []
    for name, value in src.items():
        lower = name.lower()
        if lower in drop or lower in extra or lower.startswith(prefixes):
            continue
        out.append((name, value))
    if protocols:
        out.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    if peer is not None:
        chain = src.getall("X-Forwarded-For", [])
        if chain and _trusted(peer, settings.trusted_proxies):
            out.append(("X-Forwarded-For", ", ".join([*chain, peer])))
        else:
            out.append(("X-Forwarded-For", peer))
    return out


def _response_headers(
    headers: _Headers,
    *,
    upgrade: bool = False,
    length: int | None = None,
    audit_id: str | None = None,
) -> CIMultiDict[str]:
    """The API server's response headers as we relay them: minus hop-by-hop
    ones and every framing field (``proxy.framing``); ``length`` is the one
    ``Content-Length`` we declare, when we know the body we relay has exactly
    that many bytes (else the client's writer frames it). ``audit_id``: the
    request's audit id, echoed as ``Audit-Id`` as kube-apiserver does (the API
    server echoes the one we sent; a kubelet's exec answer has none).
    """
    drop = framing.hop_by_hop(headers.getall("Connection", ()))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() in drop:
            continue
        out.add(name, value)
    if length is not None:
        out["Content-Length"] = str(length)
    if audit_id is not None:
        out["Audit-Id"] = audit_id
    if upgrade:
        out["Connection"] = "Upgrade"
        out["Upgrade"] = headers.get("Upgrade", "")
    return out


def _declared_length(method: str, upstream: PooledResponse) -> int | None:
    """The length to declare for a pooled answer: its body's exact length,
    or for ``HEAD`` the length the API server declared (RFC 9110 §8.6: what a
    ``GET`` would have had; the pool parsed it as one field of digits).
    """
    if method == "HEAD":
        declared = upstream.headers.get("Content-Length")
        return int(declared) if declared is not None else None
    return upstream.body_length


class _UpstreamBroken(Exception):
    """The API server failed after the response head was relayed."""


class _ClientLeft(Exception):
    """The client went away while the response was being relayed."""


# --------------------------------------------------------------------------
# Access log


class _Entry:
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
    #: attributes here, slots in ``_AuditedEntry``: a proxy without auditing
    #: stores nothing more per request.
    audit: AuditContext | None = None
    #: The audit policy was consulted (``_ProxyHandler._audit_begin``).
    audited = False

    @property
    def audit_id(self) -> str | None:
        """The id sent upstream and echoed to the client, if audited."""
        audit = self.audit
        return audit.audit_id if audit is not None else None

    def fields(self) -> dict[str, Any]:
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


class _AuditedEntry(_Entry):
    """An ``_Entry`` of a proxy that audits (``--audit-policy-file``)."""

    __slots__ = ("audit", "audited")

    def __init__(self, method: str, path: str, verb: str, kind: str | None) -> None:
        super().__init__(method, path, verb, kind)
        self.audit = None
        self.audited = False


# --------------------------------------------------------------------------
# The handler


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
        self._auditor = auditor
        self._entry = _Entry if auditor is None else _AuditedEntry
        self._upstream = upstream
        self._settings = settings
        self._metrics = metrics
        self._stopping = stopping
        self._identities = PerUser(self._checked_headers, limit=_IDENTITY_CACHE)
        self._limiter = RefusalLimiter(access_log, limit=settings.refusal_log_limit)
        # The engine's two steps, when the authenticator has them (``handle``
        # answers a cached verdict without a task); ``authenticate`` else.
        lookup = getattr(authenticator, "lookup", None)
        validate = getattr(authenticator, "validate", None)
        self._lookup: Callable[[str], tuple[bytes, UserInfo | None]] | None = (
            lookup if lookup is not None and validate is not None else None
        )
        self._validate: Callable[[str, bytes], Awaitable[UserInfo | None]] | None = (
            validate if self._lookup is not None else None
        )

    def cleanup(self) -> None:
        """Report the refusals not logged yet (the server is stopping)."""
        self._limiter.flush()

    def handle(
        self, request: http1.Request
    ) -> http1.Answer | Coroutine[Any, Any, http1.Answer | None]:
        """Serve one request (the listener's only route).

        The checks before the upstream call run here, synchronously, up to the
        cache lookup: a refusal they reach (a replayed bad or expired token,
        no token) is answered without creating a task, which is most of what
        a refusal costs beyond the protocol and the log line.
        """
        path = _decoded_path(request.path)
        src = CIMultiDict(request.fields)
        upgrade = _upgrade_protocol(src) if request.upgrade else None
        verb, subresource = _classify_target(request.method, request.target)
        kind: str | None = None
        if upgrade is not None:
            kind = subresource or "upgrade"
        elif verb == "watch" or subresource in _LONG_SUBRESOURCES:
            kind = "watch" if verb == "watch" else subresource
        entry = self._entry(request.method, path, verb, kind)
        key: bytes | None = None
        user: UserInfo | None = None
        token = ""
        try:
            token, protocols = self._presented(
                src, size=request.size, target=request.target, upgrade=upgrade
            )
            if self._lookup is not None:
                key, user = self._lookup(token)
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
            answer = self._refusal_answer(_token_refusal(err), entry, request, src)
            self._finish(entry, request, src)
            return answer
        except _Refusal as refusal:
            answer = self._refusal_answer(refusal, entry, request, src)
            self._finish(entry, request, src)
            return answer
        except Exception:
            log.exception("proxy handler failed")
            answer = self._failed(entry, request, src)
            self._finish(entry, request, src)
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

    def _refused(
        self, err: _Refusal | UpstreamError, entry: _Entry
    ) -> tuple[int, str, Mapping[str, str] | None]:
        """The answer to a refusal or an upstream failure, recorded in ``entry``."""
        if isinstance(err, _Refusal):
            # Said once, in the request's access line (a refused token is the
            # common refusal): at most one line each, none past the limit.
            entry.detail = err.detail or err.message
            entry.reason = err.reason
            entry.cause = err.cause
            entry.status = err.status
            return err.status, err.message, err.headers
        log.warning("upstream failed", extra={"status": err.status, "detail": str(err)})
        self._count_upstream(_UPSTREAM_LABELS.get(err.status, "error"))
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
        err: _Refusal | UpstreamError,
        entry: _Entry,
        request: http1.Request,
        src: _Headers,
    ) -> http1.Answer:
        status, message, extra = self._refused(err, entry)
        body = _status_body(status, message)
        headers = tuple(extra.items()) if extra else ()
        if self._auditor is not None:
            # Refused before authentication finished: audited with no user,
            # as kube-apiserver audits a failed authentication.
            audit = (
                entry.audit
                if entry.audited
                else self._audit_begin(entry, request, src, None)
            )
            if audit is not None:
                headers = (*headers, ("Audit-Id", audit.audit_id))
                note = entry.reason or entry.detail
                if note:
                    audit.annotate(_REFUSAL_NOTE, note[:_MAX_NOTE])
                audit.complete(status, body, "application/json")
        return http1.Answer(status, body, headers)

    def _failed(
        self, entry: _Entry, request: http1.Request, src: _Headers
    ) -> http1.Answer:
        """The answer to an unexpected failure: 500, and a ``Panic`` event."""
        entry.status = 500
        headers: tuple[tuple[str, str], ...] = ()
        if self._auditor is not None:
            audit = (
                entry.audit
                if entry.audited
                else self._audit_begin(entry, request, src, None)
            )
            if audit is not None:
                audit.panic()
                headers = (("Audit-Id", audit.audit_id),)
        return http1.Answer(500, _status_body(500, "internal error"), headers)

    def _audit_begin(
        self,
        entry: _Entry,
        request: http1.Request,
        src: _Headers,
        user: UserInfo | None,
    ) -> AuditContext | None:
        """Consult the audit policy once ``user`` is known (kube-apiserver's
        audit filter runs after authentication, before impersonation);
        ``RequestReceived`` carries the time the request arrived.
        """
        assert self._auditor is not None
        assert isinstance(entry, _AuditedEntry)
        entry.audited = True
        peer = request.peer
        target = request.target
        audit = entry.audit = self._auditor.begin(
            request.method,
            entry.path,
            target.partition("?")[2],
            request_uri=target,
            user=user,
            source_ips=source_ips(
                peer,
                forwarded_for=src.getall("X-Forwarded-For", ()),
                real_ip=src.get("X-Real-Ip"),
                trusted=_trusted(peer, self._settings.trusted_proxies),
            ),
            user_agent=src.get("User-Agent", ""),
            long_running=entry.kind is not None,
            received=time.time() - (time.monotonic() - entry.started_at),
        )
        return audit

    def _audit_admitted(
        self, audit: AuditContext, request: http1.Request, entry: _Entry
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

    async def _serve(
        self,
        request: http1.Request,
        entry: _Entry,
        src: _Headers,
        token: str,
        *,
        protocols: list[str] | None,
        upgrade: str | None,
        key: bytes | None,
        user: UserInfo | None,
        foreign: bool = False,
    ) -> http1.Answer | None:
        """The rest of a request: validation on a cache miss, the checks
        after it, the upstream exchange. ``foreign``: the token is known not
        to be ours (``_passes_through``).
        """
        try:
            if user is None and not foreign:
                try:
                    if key is not None and self._validate is not None:
                        user = await self._validate(token, key)
                    else:
                        user = await self._authenticator.authenticate(token)
                except TokenError as err:
                    if not self._passes_through(err):
                        raise _token_refusal(err) from err
            audit = (
                self._audit_begin(entry, request, src, user)
                if self._auditor is not None
                else None
            )
            headers = await self._admitted(
                user,
                src,
                peer=request.peer,
                entry=entry,
                upgrade=upgrade,
                protocols=protocols,
            )
            if audit is not None:
                headers.append(self._audit_admitted(audit, request, entry))
            if upgrade is not None:
                return await self._forward_upgrade(request, headers, entry, upgrade)
            if entry.kind is not None:
                return await self._forward_stream(request, headers, entry)
            return await self._forward(request, headers, entry)
        except (_Refusal, UpstreamError) as refusal:
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
            self._finish(entry, request, src)

    async def _fetch(
        self, request: http1.Request, headers: list[tuple[str, str]], entry: _Entry
    ) -> PooledResponse:
        """Send a request upstream; the answer once its head is in.

        A whole body is sent as bytes (the pool declares exactly its length);
        a streamed one is copied as it arrives, under the length the client
        declared (llhttp read the body by it) or chunked.
        """
        settings = self._settings
        body: bytes | http1.Request | None = request.body or None
        length: int | None = None
        if request.streamed:
            body = request
            declared = request.headers.get("content-length")
            length = int(declared) if declared is not None else None
        return await self._upstream.fetch(
            request.method,
            request.target,
            headers=headers,
            body=body,
            body_length=length,
            connect_timeout=settings.connect_timeout,
            max_head_bytes=settings.max_header_bytes,
            passthrough=entry.mode == "passthrough",
        )

    async def _forward(
        self, request: http1.Request, headers: list[tuple[str, str]], entry: _Entry
    ) -> http1.Answer | None:
        """An ordinary request: answered whole when the API server's body is
        small and has a length, relayed piece by piece otherwise; the whole
        exchange within ``request_timeout``.
        """
        settings = self._settings
        started = False
        try:
            async with asyncio.timeout(settings.request_timeout):
                upstream = await self._fetch(request, headers, entry)
                async with upstream:
                    self._count_upstream(str(upstream.status))
                    relayed = tuple(
                        _response_headers(
                            upstream.headers, audit_id=entry.audit_id
                        ).items()
                    )
                    entry.status = upstream.status
                    if request.method == "HEAD":
                        # RFC 9110 §8.6: the length a GET would have had.
                        request.start_stream(
                            upstream.status,
                            relayed,
                            length=_declared_length(request.method, upstream),
                            reason=upstream.reason,
                        )
                        request.end_stream()
                        return None
                    body = upstream.body
                    audit = entry.audit
                    if body is not None:
                        entry.bytes_out = len(body)
                        if audit is not None:
                            _audit_answer(audit, upstream, body)
                        return http1.Answer(
                            upstream.status,
                            body,
                            relayed,
                            content_type=None,
                            reason=upstream.reason,
                        )
                    request.start_stream(
                        upstream.status,
                        relayed,
                        length=upstream.body_length,
                        reason=upstream.reason,
                    )
                    started = entry.prepared = True
                    if audit is not None and audit.wants_response_body:
                        audit.annotate(
                            RESPONSE_OBJECT_NOTE, "omitted: streamed response body"
                        )
                    await _relay_pooled(upstream, request.send, entry)
                    request.end_stream()
        except (TimeoutError, _UpstreamBroken, _ClientLeft, ConnectionError) as err:
            _relay_ended(err, started, request.abort, entry)
        return None

    async def _forward_stream(
        self, request: http1.Request, headers: list[tuple[str, str]], entry: _Entry
    ) -> http1.Answer | None:
        """A long-running request (watch, log stream): no total timeout, only
        the head's and, while streaming, the idle one; it ends cleanly when
        the server drains.
        """
        settings = self._settings
        started = False
        try:
            async with asyncio.timeout(settings.request_timeout):
                upstream = await self._fetch(request, headers, entry)
            async with upstream:
                self._count_upstream(str(upstream.status))
                request.start_stream(
                    upstream.status,
                    tuple(
                        _response_headers(
                            upstream.headers, audit_id=entry.audit_id
                        ).items()
                    ),
                    length=upstream.body_length,
                    reason=upstream.reason,
                )
                entry.status = upstream.status
                started = entry.prepared = True
                self._stream_started(entry)
                try:
                    if not await self._copy_until_stopped(upstream, request, entry):
                        # End the chunked body properly: a watch client
                        # sees the stream end and re-watches elsewhere.
                        entry.outcome = "shutdown"
                    request.end_stream()
                finally:
                    self._stream_ended(entry)
        except (TimeoutError, _UpstreamBroken, _ClientLeft, ConnectionError) as err:
            _relay_ended(err, started, request.abort, entry)
        return None

    async def _copy_until_stopped(
        self, upstream: PooledResponse, request: http1.Request, entry: _Entry
    ) -> bool:
        """Relay a stream's body; ``False`` if the server began to drain first."""
        stopping = self._stopping
        copy = asyncio.ensure_future(self._copy_body(upstream, request.send, entry))
        if stopping is None:
            await copy
            return True
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({copy, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (copy, stop):
                if not task.done():
                    task.cancel()
            await asyncio.wait({copy, stop})
        if copy.cancelled():
            return False
        copy.result()
        return True

    def _finish(self, entry: _Entry, request: http1.Request, src: _Headers) -> None:
        if entry.status == 0:
            entry.status = 499
            entry.outcome = "client_closed" if entry.outcome == "ok" else entry.outcome
        if self._auditor is not None:
            # Every request that reached the handler has its record closed
            # here, whatever way it ended (a client gone during validation
            # included); a record already completed is left as it is.
            audit = (
                entry.audit
                if entry.audited
                else self._audit_begin(entry, request, src, None)
            )
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

    def _observe_duration(self, entry: _Entry) -> None:
        assert self._metrics is not None
        self._metrics.histogram_tally(self._metrics.http_duration, "proxy").observe(
            time.monotonic() - entry.started_at
        )

    def _count_upstream(self, label: str) -> None:
        if self._metrics is not None:
            self._metrics.tally(self._metrics.upstream_requests, label).count += 1

    def _presented(
        self, src: _Headers, *, size: int, target: str, upgrade: str | None
    ) -> tuple[str, list[str] | None]:
        """The checks before authentication: size, target, exactly one credential."""
        if size > self._settings.max_header_bytes:
            raise _Refusal(
                431,
                "request headers too large",
                f"{size} bytes",
                cause="request headers too large",
            )
        if not target.startswith("/"):
            raise _Refusal(400, "bad request target")
        websocket = upgrade is not None and upgrade.lower() == "websocket"
        return _credentials(src, websocket)

    async def _admitted(
        self,
        user: UserInfo | None,
        src: _Headers,
        *,
        peer: str | None,
        entry: _Entry,
        upgrade: str | None,
        protocols: list[str] | None,
    ) -> list[tuple[str, str]]:
        """The checks after authentication; the headers to forward."""
        settings = self._settings
        if user is None:
            if not settings.token_passthrough:
                raise _Refusal(
                    401,
                    "Unauthorized",
                    "token of no configured issuer",
                    reason="not_mine",
                )
            if self._upstream.client_certificate:
                # The API server would authenticate our certificate, not the
                # client's token: the client would act as the proxy.
                raise _Refusal(401, "Unauthorized", "passthrough over a client cert")
            entry.mode = "passthrough"
            return _forward_headers(
                src, peer, settings, passthrough=True, protocols=None
            )
        entry.user = user.username
        entry.groups_count = len(user.groups)
        impersonate: Sequence[tuple[str, str]] = self._own_headers(user)
        identity = _requested_identity(src, settings)
        if identity is not None:
            entry.as_user = identity.username
            await self._authorize(user, identity)
            if entry.audit is not None:
                entry.audit.set_impersonated(identity.user_info())
            impersonate = _with_original(identity, user).headers()
        headers = _forward_headers(
            src, peer, settings, passthrough=False, protocols=protocols
        )
        headers.extend(self._upstream.auth_items)
        headers.extend(impersonate)
        return headers

    def _own_headers(self, user: UserInfo) -> tuple[tuple[str, str], ...]:
        """The checked ``Impersonate-*`` headers for ``user``, once per cached user."""
        return self._identities(user)

    def _checked_headers(self, user: UserInfo) -> tuple[tuple[str, str], ...]:
        _check_identity(user, self._settings.allow_reserved_groups)
        return tuple(_Identity.of(user).headers())

    async def _authorize(self, user: UserInfo, identity: _Identity) -> None:
        """SubjectAccessReviews for each requested value, as ``user``; 403 on a no."""
        groups = list(user.groups)
        if SYSTEM_AUTHENTICATED not in groups:
            groups.append(SYSTEM_AUTHENTICATED)
        spec: dict[str, Any] = {"user": user.username, "groups": groups}
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {k: list(v) for k, v in user.extra.items()}
        for attributes in _impersonation_checks(identity):
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {**spec, "resourceAttributes": attributes},
            }
            if not await self._review(review):
                what = attributes["resource"]
                if "subresource" in attributes:
                    what += "/" + attributes["subresource"]
                raise _Refusal(
                    403,
                    f'forbidden: cannot impersonate {what} "{attributes["name"]}"',
                    "subjectaccessreview denied",
                )

    async def _review(self, review: dict[str, Any]) -> bool:
        settings = self._settings
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            *self._upstream.auth_items,
        ]
        try:
            async with asyncio.timeout(settings.sar_timeout):
                response = await self._upstream.fetch(
                    "POST",
                    _SAR_PATH,
                    headers=headers,
                    body=json.dumps(review).encode(),
                    connect_timeout=settings.connect_timeout,
                )
                async with response:
                    body = await response.read(_MAX_SAR_BODY)
                    status = response.status
        except TimeoutError as err:
            raise UpstreamError(
                "proxy: subjectaccessreview timed out", status=504
            ) from err
        if status not in (200, 201):
            raise UpstreamError(f"proxy: subjectaccessreview answered {status}")
        try:
            allowed = json.loads(body)["status"]["allowed"]
        except (ValueError, KeyError, TypeError) as unreadable:
            raise UpstreamError(
                "proxy: subjectaccessreview answer unreadable"
            ) from unreadable
        return allowed is True

    def _stream_started(self, entry: _Entry) -> None:
        if entry.kind is None:
            return
        if entry.audit is not None:
            entry.audit.response_started(entry.status)
        access_log.info("request started", entry.fields())
        if self._metrics is not None:
            self._observe_duration(entry)
            self._metrics.inflight_streams.labels(entry.kind).inc()

    def _stream_ended(self, entry: _Entry) -> None:
        if entry.kind is not None and self._metrics is not None:
            self._metrics.inflight_streams.labels(entry.kind).dec()

    async def _copy_body(
        self,
        upstream: PooledResponse,
        write: Callable[[bytes], Awaitable[None]],
        entry: _Entry,
    ) -> None:
        """Relay a stream's body until it ends or nothing comes for
        ``stream_idle_timeout`` (``entry.outcome`` then says ``idle``).
        """
        if upstream.body is not None:  # read whole with the head
            await _write_to(write, upstream.body, entry)
            return
        idle = self._settings.stream_idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle if idle > 0 else None):
                    chunk = await upstream.read_chunk()
            except TimeoutError:
                entry.outcome = "idle"
                return
            except UpstreamError as err:
                log.warning("upstream stream broke", extra={"detail": str(err)})
                raise _UpstreamBroken from err
            if not chunk:
                return
            await _write_to(write, chunk, entry)

    async def _forward_upgrade(
        self,
        request: http1.Request,
        headers: list[tuple[str, str]],
        entry: _Entry,
        upgrade: str,
    ) -> http1.Answer | None:
        settings = self._settings
        answer = await self._upstream.upgrade(
            request.method,
            request.target,
            headers=headers,
            protocol=upgrade,
            connect_timeout=settings.connect_timeout,
            head_timeout=settings.request_timeout,
            max_head_bytes=settings.max_header_bytes,
            passthrough=entry.mode == "passthrough",
        )
        self._count_upstream(str(answer.status))
        if answer.status != 101:
            return await self._upgrade_refused(answer, entry)
        pipe = answer.detach()
        try:
            client = request.upgrade_to(
                _response_headers(
                    answer.headers, upgrade=True, audit_id=entry.audit_id
                ).items(),
                reason=answer.reason,
            )
        except ConnectionError:
            await pipe.close()
            entry.outcome = "client_closed"
            return None
        entry.status = 101
        entry.prepared = True
        self._stream_started(entry)
        try:
            result = await tunnel.relay(
                client,
                pipe,
                idle_seconds=settings.tunnel_idle_timeout,
                stop=self._stopping,
            )
        finally:
            self._stream_ended(entry)
            client.close()
            await pipe.close()
        entry.bytes_in = result.bytes_to_upstream
        entry.bytes_out = result.bytes_to_client
        if result.closed_by not in ("client", "upstream"):
            entry.outcome = result.closed_by
        return None

    async def _upgrade_refused(
        self, answer: PooledResponse, entry: _Entry
    ) -> http1.Answer:
        """Relay a non-101 answer to an upgrade (kubectl reads it to fall back)."""
        async with answer:
            try:
                async with asyncio.timeout(self._settings.request_timeout):
                    body = await answer.read(_MAX_ERROR_BODY)
            except TimeoutError as err:
                raise UpstreamError(
                    "proxy: upgrade answer timed out", status=504
                ) from err
        entry.status = answer.status
        entry.bytes_out = len(body)
        if entry.audit is not None:
            _audit_answer(entry.audit, answer, body)
        return http1.Answer(
            answer.status,
            body,
            tuple(_response_headers(answer.headers, audit_id=entry.audit_id).items()),
            content_type=None,
            reason=answer.reason,
        )


def _audit_answer(audit: AuditContext, upstream: PooledResponse, body: bytes) -> None:
    """Close the record of a request answered whole: the body is read for a
    failure's ``Status`` message, or recorded at ``RequestResponse``; a
    success's body is not parsed otherwise (a large list costs milliseconds).
    """
    status = upstream.status
    wanted = status >= 300 or audit.wants_response_body
    audit.complete(
        status,
        body if wanted else None,
        upstream.headers.get("Content-Type") if wanted else None,
    )


async def _relay_pooled(
    upstream: PooledResponse,
    write: Callable[[bytes], Awaitable[None]],
    entry: _Entry,
) -> None:
    """Copy a pooled answer's body to the client (either lane's ``write``):
    a failure on the API server's side is ``_UpstreamBroken``, on the
    client's ``_ClientLeft``.
    """
    while True:
        try:
            chunk = await upstream.read_chunk()
        except UpstreamError as err:
            log.warning("upstream stream broke", extra={"detail": str(err)})
            raise _UpstreamBroken from err
        if not chunk:
            return
        await _write_to(write, chunk, entry)


async def _write_to(
    write: Callable[[bytes], Awaitable[None]], chunk: bytes, entry: _Entry
) -> None:
    """Send a piece of the answer to the client (``_ClientLeft`` if it is gone)."""
    try:
        await write(chunk)
    except (ConnectionError, OSError) as err:
        raise _ClientLeft from err
    entry.bytes_out += len(chunk)


def _relay_ended(
    err: BaseException, answered: bool, abort: Callable[[], None], entry: _Entry
) -> None:
    """Record how a relay ended early; a timeout before any answer is a 504.

    ``abort`` cuts the client's connection: a response under way cannot be
    completed honestly.
    """
    if isinstance(err, TimeoutError):
        if not answered:
            raise UpstreamError("proxy: request timed out", status=504) from err
        entry.outcome = "timeout"
        abort()
    elif isinstance(err, _UpstreamBroken):
        entry.outcome = "upstream_error"
        abort()
    else:
        entry.outcome = "client_closed"


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
