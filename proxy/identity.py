"""The proxy's identity policy, as pure functions: who a request is, who it may
say it is, and what kind of request it is.

No I/O and no aiohttp (import-linter's "the proxy's policy is pure" contract):
every function here takes header fields and values and returns a result or
raises ``Refusal``, the one answer the proxy gives itself. The handler
(``proxy.impersonate``) composes them in the order its module docstring
gives; ``tests/test_identity.py`` tables each rule without a socket.

- ``presented_token``: header size and target, then ``credentials``: exactly
  one bearer token, from ``Authorization`` or (WebSocket only) the
  ``base64url.bearer.authorization.k8s.io.`` subprotocol kube-apiserver
  accepts for browsers.
- ``check_identity``: a mapped identity may be impersonated unless its
  username is empty (401), it is a ``system:`` name not listed in
  ``allow_reserved_groups`` (403: an IdP must not mint ``system:masters``),
  or a value would not survive a header unchanged (403).
- ``requested_identity``: what a client's ``Impersonate-*`` headers ask for
  (``kubectl --as``), and the malformed sets kube-apiserver refuses;
  ``impersonation_checks`` the SubjectAccessReview attributes each requested
  value needs, as kube-apiserver's impersonation filter asks them;
  ``with_original`` adds ``ORIGINAL_USER_EXTRA``, never a client's to send.
- ``escape_extra_key``: an extra key as a header name kube-apiserver reads
  back exactly.
- ``classify_request``/``classify_target``/``request_kind``: the verb,
  subresource and long-running kind (watch, log, exec, attach, portforward,
  proxy, any upgrade) that decide a request's timeouts and its log line.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import string
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from multidict import CIMultiDict

from proxy.errors import TokenError
from proxy.kube import UserInfo

__all__ = [
    "BEARER_PROTOCOL_PREFIX",
    "LONG_SUBRESOURCES",
    "ORIGINAL_USER_EXTRA",
    "Identity",
    "Refusal",
    "check_identity",
    "classify_request",
    "classify_target",
    "credentials",
    "decoded_path",
    "escape_extra_key",
    "has_blank",
    "impersonation_checks",
    "original_user_json",
    "presented_token",
    "request_kind",
    "requested_identity",
    "token_refusal",
    "upgrade_protocol",
    "with_original",
]

#: WebSocket subprotocol prefix carrying a bearer token (kube-apiserver's).
BEARER_PROTOCOL_PREFIX: Final = "base64url.bearer.authorization.k8s.io."

#: The extra key under which an approved ``--as`` carries the user who asked
#: (reserved: a client sending it is refused; see ``proxy.impersonate``).
ORIGINAL_USER_EXTRA: Final = "kube-oidc-gate.io/original-user"

#: Subresources kube-apiserver treats as long-running (besides ``watch``).
LONG_SUBRESOURCES: Final = frozenset({"log", "exec", "attach", "portforward", "proxy"})

_Headers = CIMultiDict[str]
_VERBS: Final = {
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
}
_TRUE: Final = frozenset({"1", "t", "true"})
_AUTH_GROUP: Final = "authentication.k8s.io"
_SA_PREFIX: Final = "system:serviceaccount:"
_IMPERSONATE: Final = "impersonate-"
_IMPERSONATE_EXTRA: Final = "impersonate-extra-"
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


class Refusal(Exception):
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


def token_refusal(err: TokenError) -> Refusal:
    """A refused token's answer: 401, or 503 while the keys are not loaded.

    The access line says the ``reason`` code and, as ``detail``, the engine's
    message (claim values and issuers, never the token); the refusal log
    limit counts by the reason alone, so distinct values cannot flood it.
    """
    if err.temporary:
        return Refusal(
            503,
            "authentication temporarily unavailable",
            str(err),
            headers={"Retry-After": "5"},
            cause=err.reason,
            reason=err.reason,
        )
    return Refusal(401, "Unauthorized", str(err), cause=err.reason, reason=err.reason)


# --------------------------------------------------------------------------
# Request classification


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


def decoded_path(path: str) -> str:
    """The path as aiohttp's ``request.path`` gives it (percent-decoded)."""
    return urllib.parse.unquote(path) if "%" in path else path


def classify_target(method: str, target: str) -> tuple[str, str]:
    """``classify_request`` for a raw request target (path and query)."""
    path, _, query = target.partition("?")
    params: dict[str, str] = {}
    # Only ``watch`` is read: skip the parse (on every proxied request) when
    # the query cannot name it, even percent-encoded.
    if query and ("watch" in query or "%" in query):
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            params.setdefault(name, value)
    return classify_request(method, decoded_path(path), params)


def request_kind(upgrade: str | None, verb: str, subresource: str) -> str | None:
    """The long-running kind of a request (its ``kind`` in the access log and
    the streams gauge), or ``None`` for an ordinary one: an upgrade is its
    subresource or ``upgrade``; else ``watch`` or a long-running subresource.
    """
    if upgrade is not None:
        return subresource or "upgrade"
    if verb == "watch" or subresource in LONG_SUBRESOURCES:
        return "watch" if verb == "watch" else subresource
    return None


def _connection_tokens(headers: _Headers) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upgrade_protocol(headers: _Headers) -> str | None:
    """The ``Upgrade`` value when this is an upgrade we relay, else ``None``."""
    if "upgrade" not in _connection_tokens(headers):
        return None
    value = headers.get("Upgrade", "").strip()
    lowered = value.lower()
    if lowered == "websocket" or lowered.startswith("spdy/"):
        return value
    return None


# --------------------------------------------------------------------------
# Credentials


def has_blank(text: str) -> bool:
    """Whether ``text`` holds any whitespace (what ``re``'s ``\\s`` matches).

    ``str.split`` splits on exactly those characters and scans a kilobyte
    token in 0.5 µs, where ``re.search(r"\\s")`` took 4.1 µs.
    """
    return bool(text) and text.split(None, 1) != [text]


def presented_token(
    headers: _Headers,
    *,
    size: int,
    max_header_bytes: int,
    target: str,
    upgrade: str | None,
) -> tuple[str, list[str] | None]:
    """The checks before authentication: size, target, exactly one credential
    (``credentials``' result).
    """
    if size > max_header_bytes:
        raise Refusal(
            431,
            "request headers too large",
            f"{size} bytes",
            cause="request headers too large",
        )
    if not target.startswith("/"):
        raise Refusal(400, "bad request target")
    websocket = upgrade is not None and upgrade.lower() == "websocket"
    return credentials(headers, websocket)


def credentials(headers: _Headers, websocket: bool) -> tuple[str, list[str] | None]:
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
        raise Refusal(401, "Unauthorized", "more than one authorization header")
    if authorization and bearer:
        raise Refusal(401, "Unauthorized", "token in both header and subprotocol")
    if authorization:
        # kube-apiserver's reading: the scheme in any case, one space, a token
        # without blanks; anything else (tabs, two spaces) is refused here as
        # it is there.
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token or has_blank(token):
            raise Refusal(401, "Unauthorized", "authorization is not a bearer token")
        return token, None
    if len(bearer) == 1:
        encoded = bearer[0][len(BEARER_PROTOCOL_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            token = raw.decode("utf-8")
        except (binascii.Error, ValueError) as err:
            raise Refusal(
                401, "Unauthorized", "undecodable bearer subprotocol"
            ) from err
        if not token:
            raise Refusal(401, "Unauthorized", "empty bearer subprotocol")
        return token, [p for p in protocols if not p.startswith(BEARER_PROTOCOL_PREFIX)]
    if bearer:
        raise Refusal(401, "Unauthorized", "more than one bearer subprotocol")
    raise Refusal(401, "Unauthorized", "no bearer token")


# --------------------------------------------------------------------------
# The mapped identity


def _unsafe(value: str) -> bool:
    return not value or value != value.strip(" \t") or bool(_UNSAFE_VALUE.search(value))


def check_identity(user: UserInfo, allowed: Sequence[str]) -> None:
    """Refuse a mapped identity the proxy must not impersonate: an empty
    username (401), a ``system:`` user or group not in ``allowed`` (403), a
    value or extra key a header would alter (403).
    """
    if not user.username:
        raise Refusal(401, "Unauthorized", "token maps to an empty username")
    for value in (user.username, *user.groups):
        if value.startswith("system:") and value not in allowed:
            raise Refusal(403, "forbidden: reserved identity", "reserved name in token")
    values = [
        user.username,
        *user.groups,
        *(v for vs in user.extra.values() for v in vs),
    ]
    if user.uid:
        values.append(user.uid)
    if any(_unsafe(v) for v in values) or any(_unsafe(k) for k in user.extra):
        raise Refusal(403, "forbidden: identity not expressible", "unsafe header value")


def _escape_extra_key(key: str) -> str:
    return "".join(
        chr(b) if chr(b) in _HEADER_KEY_SAFE else f"%{b:02X}" for b in key.encode()
    )


#: Percent-encode an extra key for a header name so that kube-apiserver
#: (which lower-cases the name, then percent-decodes it) reads back exactly
#: the key: client-go's encoding plus upper-case letters, without which a key
#: authorised as ``Scopes`` would arrive as ``scopes``. Remembered: the keys
#: are few (the configuration's ``claimMappings.extra`` and ``credential-id``)
#: and every new token's user has them; encoding one byte at a time cost
#: ~3 % of a new token's proxied request (a ``--as`` request's keys come from
#: the client, hence the bound).
escape_extra_key: Final = functools.lru_cache(maxsize=1024)(_escape_extra_key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who the API server should see: the mapped user or an approved ``--as``."""

    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, user: UserInfo) -> Identity:
        """The mapped user as the identity to impersonate."""
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
        """The ``Impersonate-*`` headers that name this identity upstream."""
        out = [("Impersonate-User", self.username)]
        out.extend(("Impersonate-Group", g) for g in self.groups)
        if self.uid:
            out.append(("Impersonate-Uid", self.uid))
        for key, values in self.extra.items():
            name = "Impersonate-Extra-" + escape_extra_key(key)
            out.extend((name, v) for v in values)
        return out


# --------------------------------------------------------------------------
# A client's --as


def requested_identity(
    headers: _Headers, *, allowed: bool, max_values: int
) -> Identity | None:
    """The identity the client asks for with ``Impersonate-*``, or ``None``.

    ``allowed``: ``allow_client_impersonation`` (403 else); ``max_values``:
    ``max_impersonation_values`` (431 beyond). The checks run in this order:
    allowed, the reserved extra, the count, unknown names, one user and at
    most one uid.
    """
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
    _check_request(count, unknown, extra, allowed=allowed, max_values=max_values)
    if len(users) != 1 or not users[0] or len(uids) > 1:
        raise Refusal(400, "impersonation requires exactly one Impersonate-User")
    return Identity(
        username=users[0],
        groups=tuple(groups),
        uid=uids[0] if uids else "",
        extra={k: tuple(v) for k, v in extra.items()},
    )


def _check_request(
    count: int,
    unknown: Sequence[str],
    extra: Mapping[str, object],
    *,
    allowed: bool,
    max_values: int,
) -> None:
    """The refusals of a request's ``Impersonate-*`` set before its shape."""
    if not allowed:
        raise Refusal(403, "impersonation is not allowed through this proxy")
    # Compared without case: kube-apiserver's keys are case-sensitive, but a
    # near-twin of the reserved key would mislead whoever reads the audit log.
    if any(key.lower() == ORIGINAL_USER_EXTRA for key in extra):
        raise Refusal(
            403,
            f'forbidden: the extra "{ORIGINAL_USER_EXTRA}" is set by the proxy, '
            "never by a client",
            "client sent the reserved original-user extra",
        )
    if count > max_values:
        raise Refusal(
            431,
            "too many impersonation headers",
            f"{count} values",
            cause="too many impersonation headers",
        )
    if unknown:
        raise Refusal(
            400,
            "unknown impersonation header",
            f"headers {unknown!r}",
            cause="unknown impersonation header",
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


def with_original(identity: Identity, user: UserInfo) -> Identity:
    """The approved ``--as`` identity plus who asked for it (``ORIGINAL_USER_EXTRA``)."""
    return replace(
        identity,
        extra={**identity.extra, ORIGINAL_USER_EXTRA: (original_user_json(user),)},
    )


def impersonation_checks(identity: Identity) -> list[dict[str, str]]:
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
