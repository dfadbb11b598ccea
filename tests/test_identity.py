"""The proxy's identity policy as tables (``proxy.identity``): no sockets.

Each rule of ``proxy.identity`` has a table here; the end-to-end tests in
tests/test_impersonate.py check that the handler applies them in order and
that nothing reaches the API server on a refusal.
"""

from __future__ import annotations

import base64
import json
import re
from types import MappingProxyType
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.errors import IssuerMismatch, KeysUnavailable, SignatureInvalid, TokenError
from proxy.identity import (
    BEARER_PROTOCOL_PREFIX,
    ORIGINAL_USER_EXTRA,
    Identity,
    Refusal,
    check_identity,
    classify_request,
    classify_target,
    credentials,
    escape_extra_key,
    has_blank,
    impersonation_checks,
    original_user_json,
    presented_token,
    request_kind,
    requested_identity,
    token_refusal,
    upgrade_protocol,
    with_original,
)
from proxy.kube import UserInfo

WHOAMI = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


def fields(*items: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(items)


def refusal(call: Any, *args: Any, **kwargs: Any) -> tuple[int, str, str]:
    """The status, message and detail of the ``Refusal`` ``call`` raises."""
    with pytest.raises(Refusal) as info:
        call(*args, **kwargs)
    err = info.value
    return err.status, err.message, err.detail


# --------------------------------------------------------------------------
# Request classification


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/default/pods", {}, ("list", "")),
        ("GET", "/api/v1/namespaces/default/pods", {"watch": "true"}, ("watch", "")),
        ("GET", "/api/v1/namespaces/default/pods", {"watch": "1"}, ("watch", "")),
        ("GET", "/api/v1/watch/namespaces/default/pods", {}, ("watch", "")),
        ("GET", "/api/v1/namespaces/default/pods/p", {}, ("get", "")),
        (
            "GET",
            "/api/v1/namespaces/default/pods/p/log",
            {"follow": "true"},
            ("get", "log"),
        ),
        ("POST", "/api/v1/namespaces/default/pods/p/exec", {}, ("create", "exec")),
        ("GET", "/api/v1/namespaces/default", {}, ("get", "")),
        ("GET", "/api/v1/namespaces", {}, ("list", "")),
        (
            "DELETE",
            "/apis/apps/v1/namespaces/x/deployments",
            {},
            ("deletecollection", ""),
        ),
        ("DELETE", "/apis/apps/v1/namespaces/x/deployments/d", {}, ("delete", "")),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/x/deployments/d/scale",
            {},
            ("patch", "scale"),
        ),
        ("PUT", "/api/v1/nodes/n", {}, ("update", "")),
        ("POST", WHOAMI, {}, ("create", "")),
        ("GET", "/healthz", {}, ("get", "")),
    ],
    ids=[
        "list",
        "watch-param",
        "watch-1",
        "watch-prefix",
        "get",
        "log",
        "exec",
        "namespace-get",
        "namespace-list",
        "deletecollection",
        "delete",
        "patch-subresource",
        "update-cluster-scoped",
        "create",
        "non-resource",
    ],
)
def test_classify_request(
    method: str, path: str, query: dict[str, str], expected: tuple[str, str]
) -> None:
    assert classify_request(method, path, query) == expected


@pytest.mark.slow
def test_a_blank_anywhere_in_a_token_is_found_as_re_finds_it() -> None:
    """The token check's fast scan agrees with ``re``'s ``\\s`` on every code point."""
    blanks = frozenset(chr(c) for c in range(0x110000) if re.fullmatch(r"\s", chr(c)))
    assert {"\u00a0", "\u3000", "\x1f"} <= blanks
    others = (chr(c) for c in range(0x110000) if chr(c) not in blanks)
    assert not any(has_blank(f"a{c}b") for c in others)
    for c in blanks:
        for text in (c, c * 2, f"{c}abc", f"abc{c}", f"a{c}bc", f"a{c}b{c}c"):
            assert has_blank(text), repr(text)
    assert not has_blank("")


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("GET", "/api/v1/namespaces/d/pods?watch=true", ("watch", "")),
        ("GET", "/api/v1/namespaces/d/pods?watch=false&watch=true", ("list", "")),
        ("GET", "/api/v1/namespaces/d/pods?watch", ("list", "")),
        ("GET", "/api/v1/namespaces/d/pods/p/log?follow=1", ("get", "log")),
        ("GET", "/api/v1/namespaces/d/pods/p%2Fx/log", ("get", "x")),
        ("HEAD", "/api/v1/namespaces/d/pods?watch=T", ("watch", "")),
        ("post", "/api/v1/namespaces/d/pods/p/exec?command=ls", ("create", "exec")),
    ],
    ids=[
        "watch-param",
        "first-value-wins",
        "blank-watch",
        "log",
        "decoded-path",
        "head-watch",
        "lower-case-method",
    ],
)
def test_classify_target(method: str, target: str, expected: tuple[str, str]) -> None:
    assert classify_target(method, target) == expected


@pytest.mark.parametrize(
    ("upgrade", "verb", "subresource", "kind"),
    [
        (None, "list", "", None),
        (None, "get", "scale", None),
        (None, "watch", "", "watch"),
        (None, "watch", "log", "watch"),
        (None, "get", "log", "log"),
        (None, "create", "exec", "exec"),
        (None, "create", "attach", "attach"),
        (None, "create", "portforward", "portforward"),
        (None, "get", "proxy", "proxy"),
        ("websocket", "get", "exec", "exec"),
        ("SPDY/3.1", "create", "", "upgrade"),
    ],
    ids=[
        "list",
        "short-subresource",
        "watch",
        "watch-wins",
        "log",
        "exec",
        "attach",
        "portforward",
        "proxy",
        "upgrade-subresource",
        "upgrade-bare",
    ],
)
def test_request_kind(
    upgrade: str | None, verb: str, subresource: str, kind: str | None
) -> None:
    assert request_kind(upgrade, verb, subresource) == kind


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([("Connection", "Upgrade"), ("Upgrade", "websocket")], "websocket"),
        (
            [("Connection", "keep-alive, upgrade"), ("Upgrade", "WebSocket")],
            "WebSocket",
        ),
        ([("Connection", "Upgrade"), ("Upgrade", " SPDY/3.1 ")], "SPDY/3.1"),
        ([("Connection", "Upgrade"), ("Upgrade", "h2c")], None),
        ([("Upgrade", "websocket")], None),
        ([("Connection", "Upgrade")], None),
        (
            [
                ("Connection", "close"),
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
            ],
            "websocket",
        ),
    ],
    ids=[
        "websocket",
        "token-among-others",
        "spdy-trimmed",
        "other-protocol",
        "no-connection",
        "no-upgrade",
        "second-connection-field",
    ],
)
def test_upgrade_protocol(items: list[tuple[str, str]], expected: str | None) -> None:
    assert upgrade_protocol(fields(*items)) == expected


# --------------------------------------------------------------------------
# Credentials


def _bearer_protocol(token: str) -> str:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return BEARER_PROTOCOL_PREFIX + encoded


CREDENTIALS: list[tuple[str, list[tuple[str, str]], bool, Any]] = [
    ("bearer", [("Authorization", "Bearer abc")], False, ("abc", None)),
    ("scheme-any-case", [("Authorization", "bEaReR abc")], False, ("abc", None)),
    ("outer-blanks", [("Authorization", "  Bearer abc ")], False, ("abc", None)),
    (
        "header-keeps-subprotocols",
        [("Authorization", "Bearer abc"), ("Sec-WebSocket-Protocol", "v5")],
        True,
        ("abc", None),
    ),
    (
        "subprotocol",
        [("Sec-WebSocket-Protocol", f"v5.channel.k8s.io, {_bearer_protocol('t.k')}")],
        True,
        ("t.k", ["v5.channel.k8s.io"]),
    ),
    (
        "subprotocol-fields",
        [
            ("Sec-WebSocket-Protocol", _bearer_protocol("t")),
            ("Sec-WebSocket-Protocol", "a, b"),
        ],
        True,
        ("t", ["a", "b"]),
    ),
    ("none", [], False, "no bearer token"),
    (
        "basic",
        [("Authorization", "Basic dTpw")],
        False,
        "authorization is not a bearer token",
    ),
    (
        "no-token",
        [("Authorization", "Bearer")],
        False,
        "authorization is not a bearer token",
    ),
    (
        "two-spaces",
        [("Authorization", "Bearer  abc")],
        False,
        "authorization is not a bearer token",
    ),
    (
        "tab",
        [("Authorization", "Bearer\tabc")],
        False,
        "authorization is not a bearer token",
    ),
    (
        "inner-blank",
        [("Authorization", "Bearer a b")],
        False,
        "authorization is not a bearer token",
    ),
    (
        "two-headers",
        [("Authorization", "Bearer a"), ("Authorization", "Bearer a")],
        False,
        "more than one authorization header",
    ),
    (
        "header-and-subprotocol",
        [
            ("Authorization", "Bearer a"),
            ("Sec-WebSocket-Protocol", _bearer_protocol("a")),
        ],
        True,
        "token in both header and subprotocol",
    ),
    (
        "two-subprotocols",
        [
            (
                "Sec-WebSocket-Protocol",
                f"{_bearer_protocol('a')}, {_bearer_protocol('b')}",
            )
        ],
        True,
        "more than one bearer subprotocol",
    ),
    (
        "undecodable",
        [("Sec-WebSocket-Protocol", BEARER_PROTOCOL_PREFIX + "a")],
        True,
        "undecodable bearer subprotocol",
    ),
    (
        "non-alphabet-dropped",
        [("Sec-WebSocket-Protocol", BEARER_PROTOCOL_PREFIX + "!!!")],
        True,
        "empty bearer subprotocol",
    ),
    (
        "not-utf8",
        [("Sec-WebSocket-Protocol", BEARER_PROTOCOL_PREFIX + "_w")],
        True,
        "undecodable bearer subprotocol",
    ),
    (
        "empty-subprotocol",
        [("Sec-WebSocket-Protocol", BEARER_PROTOCOL_PREFIX)],
        True,
        "empty bearer subprotocol",
    ),
    (
        "subprotocol-without-websocket",
        [("Sec-WebSocket-Protocol", _bearer_protocol("a"))],
        False,
        "no bearer token",
    ),
]


@pytest.mark.parametrize(
    ("items", "websocket", "expected"),
    [c[1:] for c in CREDENTIALS],
    ids=[c[0] for c in CREDENTIALS],
)
def test_credentials(
    items: list[tuple[str, str]], websocket: bool, expected: Any
) -> None:
    """One bearer token, from the header or (WebSocket only) the subprotocol;
    every other shape is a 401 naming why in the log only.
    """
    if isinstance(expected, str):
        assert refusal(credentials, fields(*items), websocket) == (
            401,
            "Unauthorized",
            expected,
        )
    else:
        assert credentials(fields(*items), websocket) == expected


@pytest.mark.parametrize(
    ("size", "target", "upgrade", "expected"),
    [
        (100, "/api", None, ("t", None)),
        (101, "/api", None, (431, "request headers too large", "101 bytes")),
        (100, "*", None, (400, "bad request target", "")),
        (100, "http://x/api", None, (400, "bad request target", "")),
        (100, "/api", "websocket", ("s", [])),
        (100, "/api", "SPDY/3.1", ("t", None)),
    ],
    ids=["ok", "too-large", "asterisk", "absolute-form", "websocket", "spdy"],
)
def test_presented_token(
    size: int, target: str, upgrade: str | None, expected: Any
) -> None:
    """Size first, then the target, then the credential (the subprotocol
    counts on a WebSocket upgrade only).
    """
    headers = fields(
        ("Authorization", "Bearer t"),
    )
    if upgrade is not None:
        headers = fields(("Sec-WebSocket-Protocol", _bearer_protocol("s")))
        if upgrade != "websocket":
            headers.add("Authorization", "Bearer t")
    kwargs: dict[str, Any] = {
        "size": size,
        "max_header_bytes": 100,
        "target": target,
        "upgrade": upgrade,
    }
    if isinstance(expected[0], int):
        assert refusal(presented_token, headers, **kwargs) == expected
    else:
        assert presented_token(headers, **kwargs) == expected


# --------------------------------------------------------------------------
# The mapped identity


def user(
    username: str = "oidc:alice",
    *,
    groups: tuple[str, ...] = ("devs",),
    uid: str = "",
    extra: dict[str, tuple[str, ...]] | None = None,
) -> UserInfo:
    return UserInfo(
        username=username,
        uid=uid,
        groups=groups,
        extra=MappingProxyType(extra or {}),
    )


IDENTITIES: list[tuple[str, UserInfo, tuple[str, ...], tuple[int, str] | None]] = [
    ("ordinary", user(), (), None),
    ("empty-username", user(""), (), (401, "token maps to an empty username")),
    ("system-user", user("system:admin"), (), (403, "reserved name in token")),
    (
        "system-group",
        user(groups=("system:masters",)),
        (),
        (403, "reserved name in token"),
    ),
    (
        "listed-system-group",
        user(groups=("system:masters",)),
        ("system:masters",),
        None,
    ),
    ("listed-system-user", user("system:ci"), ("system:ci",), None),
    (
        "listed-elsewhere",
        user(groups=("system:masters",)),
        ("system:nodes",),
        (403, "reserved name in token"),
    ),
    ("system-uid-is-fine", user(uid="system:x"), (), None),
    ("leading-blank", user(" alice"), (), (403, "unsafe header value")),
    ("trailing-tab", user(groups=("devs\t",)), (), (403, "unsafe header value")),
    ("control-character", user(uid="a\nb"), (), (403, "unsafe header value")),
    ("delete-character", user("a\x7fb"), (), (403, "unsafe header value")),
    ("empty-group", user(groups=("",)), (), (403, "unsafe header value")),
    (
        "unsafe-extra-value",
        user(extra={"k": ("v ",)}),
        (),
        (403, "unsafe header value"),
    ),
    ("empty-extra-value", user(extra={"k": ("",)}), (), (403, "unsafe header value")),
    ("unsafe-extra-key", user(extra={"k\r": ("v",)}), (), (403, "unsafe header value")),
    ("inner-blank-is-fine", user("alice smith", extra={"a b": ("c d",)}), (), None),
    ("unicode-is-fine", user("ünï"), (), None),
    (
        "reserved-before-unsafe",
        user("system:x", groups=(" g",)),
        (),
        (403, "reserved name in token"),
    ),
]


@pytest.mark.parametrize(
    ("mapped", "allowed", "expected"),
    [c[1:] for c in IDENTITIES],
    ids=[c[0] for c in IDENTITIES],
)
def test_check_identity(
    mapped: UserInfo, allowed: tuple[str, ...], expected: tuple[int, str] | None
) -> None:
    if expected is None:
        check_identity(mapped, allowed)
        return
    status, _, detail = refusal(check_identity, mapped, allowed)
    assert (status, detail) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("scopes", "scopes"),
        ("example.com/team", "example.com%2Fteam"),
        ("a b%c", "a%20b%25c"),
        ("ünï", "%C3%BCn%C3%AF"),
        ("Scopes", "%53copes"),
        ("!#$&'*+-.^_`|~09", "!#$&'*+-.^_`|~09"),
        ("a:b=c", "a%3Ab%3Dc"),
    ],
    ids=[
        "plain",
        "slash",
        "space-percent",
        "utf8",
        "capital",
        "token-chars",
        "separators",
    ],
)
def test_escape_extra_key(key: str, expected: str) -> None:
    assert escape_extra_key(key) == expected


@pytest.mark.parametrize(
    "key",
    ["scopes", "Example.com/Team", "a b%c", "ünï", "%2F", "UPPER"],
)
def test_an_escaped_key_reads_back_as_kube_apiserver_reads_it(key: str) -> None:
    """kube-apiserver lower-cases the header name, then percent-decodes it."""
    from urllib.parse import unquote

    assert unquote(escape_extra_key(key).lower()) == key


def test_identity_headers_name_every_value() -> None:
    identity = Identity.of(
        user(
            "bob",
            groups=("a", "b"),
            uid="u-1",
            extra={"Example.com/x": ("1", "2"), "k": ("v",)},
        )
    )
    assert identity.headers() == [
        ("Impersonate-User", "bob"),
        ("Impersonate-Group", "a"),
        ("Impersonate-Group", "b"),
        ("Impersonate-Uid", "u-1"),
        ("Impersonate-Extra-%45xample.com%2Fx", "1"),
        ("Impersonate-Extra-%45xample.com%2Fx", "2"),
        ("Impersonate-Extra-k", "v"),
    ]
    assert Identity(username="bob").headers() == [("Impersonate-User", "bob")]
    assert identity.user_info() == UserInfo(
        username="bob",
        uid="u-1",
        groups=("a", "b"),
        extra=MappingProxyType({"Example.com/x": ("1", "2"), "k": ("v",)}),
    )


# --------------------------------------------------------------------------
# A client's --as


REQUESTED: list[tuple[str, list[tuple[str, str]], Any]] = [
    ("none", [("Authorization", "Bearer t")], None),
    ("user", [("Impersonate-User", "bob")], Identity(username="bob")),
    (
        "everything",
        [
            ("impersonate-user", "bob"),
            ("Impersonate-Group", "a"),
            ("IMPERSONATE-GROUP", "b"),
            ("Impersonate-Uid", "u-1"),
            ("Impersonate-Extra-Example.com%2fScopes", "read"),
            ("Impersonate-Extra-example.com%2Fscopes", "write"),
        ],
        Identity(
            username="bob",
            groups=("a", "b"),
            uid="u-1",
            extra={"example.com/scopes": ("read", "write")},
        ),
    ),
    (
        "group-without-user",
        [("Impersonate-Group", "a")],
        (400, "impersonation requires exactly one Impersonate-User"),
    ),
    (
        "uid-without-user",
        [("Impersonate-Uid", "1")],
        (400, "impersonation requires exactly one Impersonate-User"),
    ),
    (
        "empty-user",
        [("Impersonate-User", "")],
        (400, "impersonation requires exactly one Impersonate-User"),
    ),
    (
        "two-users",
        [("Impersonate-User", "a"), ("Impersonate-User", "b")],
        (400, "impersonation requires exactly one Impersonate-User"),
    ),
    (
        "two-uids",
        [("Impersonate-User", "a"), ("Impersonate-Uid", "1"), ("Impersonate-Uid", "2")],
        (400, "impersonation requires exactly one Impersonate-User"),
    ),
    (
        "unknown",
        [("Impersonate-User", "a"), ("Impersonate-Foo", "x")],
        (400, "unknown impersonation header"),
    ),
    (
        "extra-without-key",
        [("Impersonate-User", "a"), ("Impersonate-Extra-", "x")],
        (400, "unknown impersonation header"),
    ),
    (
        "too-many",
        [
            ("Impersonate-User", "a"),
            *[("Impersonate-Group", f"g{i}") for i in range(6)],
        ],
        (431, "too many impersonation headers"),
    ),
    (
        "too-many-before-unknown",
        [("Impersonate-Foo", "a"), *[("Impersonate-Group", f"g{i}") for i in range(6)]],
        (431, "too many impersonation headers"),
    ),
    (
        "reserved-extra",
        [
            ("Impersonate-User", "a"),
            ("Impersonate-Extra-kube-oidc-gate.io%2Foriginal-user", "{}"),
        ],
        (
            403,
            f'forbidden: the extra "{ORIGINAL_USER_EXTRA}" is set by the proxy, never by a client',
        ),
    ),
    (
        "reserved-extra-escaped",
        [
            ("Impersonate-User", "a"),
            ("Impersonate-Extra-%4Bube-oidc-gate.io%2foriginal%2duser", "{}"),
        ],
        (
            403,
            f'forbidden: the extra "{ORIGINAL_USER_EXTRA}" is set by the proxy, never by a client',
        ),
    ),
    (
        "reserved-before-count",
        [
            ("Impersonate-Extra-kube-oidc-gate.io%2Foriginal-user", "{}"),
            *[("Impersonate-Group", f"g{i}") for i in range(7)],
        ],
        (
            403,
            f'forbidden: the extra "{ORIGINAL_USER_EXTRA}" is set by the proxy, never by a client',
        ),
    ),
]


@pytest.mark.parametrize(
    ("items", "expected"),
    [c[1:] for c in REQUESTED],
    ids=[c[0] for c in REQUESTED],
)
def test_requested_identity(items: list[tuple[str, str]], expected: Any) -> None:
    """kube-apiserver's malformed sets, and the order the refusals come in:
    allowed, reserved extra, count, unknown names, one user and uid.
    """
    headers = fields(("Accept", "*/*"), *items)
    if isinstance(expected, tuple):
        status, message, _ = refusal(
            requested_identity, headers, allowed=True, max_values=6
        )
        assert (status, message) == expected
    else:
        assert requested_identity(headers, allowed=True, max_values=6) == expected


def test_requested_identity_is_refused_first_when_not_allowed() -> None:
    headers = fields(*[("Impersonate-Foo", str(i)) for i in range(20)])
    assert refusal(requested_identity, headers, allowed=False, max_values=3)[:2] == (
        403,
        "impersonation is not allowed through this proxy",
    )
    assert requested_identity(fields(), allowed=False, max_values=0) is None


def test_the_original_user_goes_with_an_approved_as() -> None:
    asker = user("oidc:ünï", groups=("devs", "ops"), uid="u-1", extra={"k": ("v",)})
    value = original_user_json(asker)
    assert value.isascii()
    assert json.loads(value) == {
        "username": "oidc:ünï",
        "uid": "u-1",
        "groups": ["devs", "ops"],
    }
    assert " " not in value
    requested = Identity(username="bob", extra={"scopes": ("read",)})
    assert with_original(requested, asker) == Identity(
        username="bob", extra={"scopes": ("read",), ORIGINAL_USER_EXTRA: (value,)}
    )
    assert requested.extra == {"scopes": ("read",)}


SA = "system:serviceaccount:"

CHECKS: list[tuple[str, Identity, list[dict[str, str]]]] = [
    ("user", Identity(username="bob"), [{"resource": "users", "name": "bob"}]),
    (
        "service-account",
        Identity(username=SA + "team:builder"),
        [{"resource": "serviceaccounts", "namespace": "team", "name": "builder"}],
    ),
    (
        "service-account-dotted-name",
        Identity(username=SA + "team:a.b-c"),
        [{"resource": "serviceaccounts", "namespace": "team", "name": "a.b-c"}],
    ),
    (
        "no-name",
        Identity(username=SA + "team"),
        [{"resource": "users", "name": SA + "team"}],
    ),
    (
        "empty-name",
        Identity(username=SA + "team:"),
        [{"resource": "users", "name": SA + "team:"}],
    ),
    (
        "capital-namespace",
        Identity(username=SA + "Team:b"),
        [{"resource": "users", "name": SA + "Team:b"}],
    ),
    (
        "dotted-namespace",
        Identity(username=SA + "a.b:c"),
        [{"resource": "users", "name": SA + "a.b:c"}],
    ),
    (
        "colon-in-name",
        Identity(username=SA + "a:b:c"),
        [{"resource": "users", "name": SA + "a:b:c"}],
    ),
    (
        "long-namespace",
        Identity(username=SA + "a" * 64 + ":b"),
        [{"resource": "users", "name": SA + "a" * 64 + ":b"}],
    ),
    (
        "longest-name",
        Identity(username=SA + "a:" + "b" * 253),
        [{"resource": "serviceaccounts", "namespace": "a", "name": "b" * 253}],
    ),
    (
        "too-long-name",
        Identity(username=SA + "a:" + "b" * 254),
        [{"resource": "users", "name": SA + "a:" + "b" * 254}],
    ),
    (
        "all-kinds-in-order",
        Identity(
            username="bob",
            groups=("g1", "g2"),
            uid="u-1",
            extra={"example.com/scopes": ("read", "write")},
        ),
        [
            {"resource": "users", "name": "bob"},
            {"resource": "groups", "name": "g1"},
            {"resource": "groups", "name": "g2"},
            {
                "group": "authentication.k8s.io",
                "resource": "userextras",
                "subresource": "example.com/scopes",
                "name": "read",
            },
            {
                "group": "authentication.k8s.io",
                "resource": "userextras",
                "subresource": "example.com/scopes",
                "name": "write",
            },
            {"group": "authentication.k8s.io", "resource": "uids", "name": "u-1"},
        ],
    ),
]


@pytest.mark.parametrize(
    ("identity", "expected"),
    [c[1:] for c in CHECKS],
    ids=[c[0] for c in CHECKS],
)
def test_impersonation_checks(
    identity: Identity, expected: list[dict[str, str]]
) -> None:
    """As kube-apiserver's filter asks: a service account only when its name
    splits as ``SplitUsername`` does; every check has a group and the verb.
    """
    assert impersonation_checks(identity) == [
        {"group": "", **c, "verb": "impersonate"} for c in expected
    ]


# --------------------------------------------------------------------------
# A refused token


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            SignatureInvalid("token: bad signature"),
            (401, "Unauthorized", {}, "bad_signature"),
        ),
        (
            IssuerMismatch("token: issuer mismatch", near_miss=True),
            (401, "Unauthorized", {}, "issuer_mismatch"),
        ),
        (
            KeysUnavailable("jwks: keys not loaded yet"),
            (
                503,
                "authentication temporarily unavailable",
                {"Retry-After": "5"},
                "keys_unavailable",
            ),
        ),
    ],
    ids=["bad-signature", "issuer", "keys-unavailable"],
)
def test_token_refusal(error: TokenError, expected: tuple[Any, ...]) -> None:
    """The engine's message is the detail; the limiter counts by reason."""
    refused = token_refusal(error)
    assert (
        refused.status,
        refused.message,
        refused.headers,
        refused.reason,
    ) == expected
    assert refused.detail == str(error)
    assert refused.cause == error.reason


@pytest.mark.parametrize(
    "key",
    ["Scopes", "example.com/Team", "ünï/X", "a b%c", "scopes"],
    ids=["capital", "capital-path", "utf8-capital", "space-percent", "lower"],
)
def test_escaped_extra_key_reads_back_as_kube_apiserver_decodes_it(key: str) -> None:
    # kube-apiserver: strings.ToLower(name), then url.PathUnescape.
    from urllib.parse import unquote

    assert unquote(escape_extra_key(key).lower()) == key
