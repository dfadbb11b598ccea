"""The impersonating proxy end to end: real tokens, real TLS, a fake API server
that checks what a real one checks and records everything it receives.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import ipaddress
import json
import logging
import secrets
import ssl
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import WSMsgType, web
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import KeysUnavailable, Overloaded, TokenError
from proxy.impersonate import ORIGINAL_USER_EXTRA, ProxySettings
from proxy.kube import UserInfo
from proxy.metrics import Metrics
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver import ABORT
from tests.fakes.apiserver_harness import (
    PODS,
    PROXY_TOKEN,
    WHOAMI,
    Stack,
    client_ssl,
    mappings,
    run_proxy,
    upstream_kubeconfig,
)
from tests.fakes.apiserver_impersonation import Rule
from tests.fakes.apiserver_raw import serve_raw_upgrade
from tests.fakes.issuer import FakeIssuer
from tests.helpers import ISSUER
from tests.hostile import corpus
from tests.keygen import claims_for, new_key, sign
from tests.support.running_gate import (
    Gate,
    normal_request,
    running_gate,
    secrets_of,
    wait_until,
)

SAR = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def stack(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Stack]:
    async with run_proxy(tmp_path, ca) as s:
        yield s


def allow_as(**kw: Any) -> ProxySettings:
    return ProxySettings(allow_client_impersonation=True, **kw)


async def whoami(stack: Stack, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with stack.client.post(stack.url + WHOAMI, headers=headers, json={}) as r:
        return r.status, await r.json(content_type=None)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def upstream_calls(stack: Stack) -> list[str]:
    """Paths that reached the API server other than SubjectAccessReviews."""
    return [r.path for r in stack.fake.requests if r.path != SAR]


# --------------------------------------------------------------------------
# The happy path: what reaches the API server


@pytest.mark.slow
async def test_whoami_shows_mapped_identity_and_client_credentials_stay_behind(
    stack: Stack,
) -> None:
    token = stack.token(sub="alice", groups=["devs", "ops"], jti="abc")
    code, body = await whoami(stack, {"Authorization": f"Bearer {token}"})
    assert code == 201
    assert body["status"]["userInfo"] == {
        "username": "oidc:alice",
        "groups": ["oidc:devs", "oidc:ops", "system:authenticated"],
        "extra": {"authentication.kubernetes.io/credential-id": ["JTI=abc"]},
    }
    (seen,) = stack.fake.requests
    assert seen.headers.getall("Authorization") == [f"Bearer {PROXY_TOKEN}"]
    assert seen.headers.getall("Impersonate-Group") == ["oidc:devs", "oidc:ops"]
    assert seen.headers.getall(
        "Impersonate-Extra-authentication.kubernetes.io%2Fcredential-id"
    ) == ["JTI=abc"]
    assert token not in json.dumps(list(seen.headers.items()))


async def test_hop_by_hop_and_spoofable_headers_are_stripped(stack: Stack) -> None:
    headers = {
        **stack.bearer(),
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "drop me",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Remote-User": "admin",
        "X-Remote-Group": "system:masters",
        "X-Remote-Extra-Scopes": "all",
        "X-Forwarded-For": "6.6.6.6",
        "X-Custom": "kept",
    }
    code, _ = await whoami(stack, headers)
    assert code == 201
    (seen,) = stack.fake.requests
    for name in (
        "X-Secret",
        "Keep-Alive",
        "TE",
        "Proxy-Authorization",
        "X-Remote-User",
        "X-Remote-Group",
        "X-Remote-Extra-Scopes",
    ):
        assert name not in seen.headers, name
    assert seen.headers["X-Custom"] == "kept"
    assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        ((), "127.0.0.1"),
        (("127.0.0.0/8",), "1.2.3.4, 127.0.0.1"),
        (("10.0.0.0/8",), "127.0.0.1"),
    ],
    ids=["untrusted", "trusted-peer", "other-network"],
)
async def test_x_forwarded_for_only_from_trusted_proxies(
    tmp_path: Path, ca: trustme.CA, trusted: tuple[str, ...], expected: str
) -> None:
    settings = ProxySettings(
        trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted)
    )
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        code, _ = await whoami(stack, {**stack.bearer(), "X-Forwarded-For": "1.2.3.4"})
        assert code == 201
        assert stack.fake.requests[0].headers.getall("X-Forwarded-For") == [expected]


@pytest.mark.slow
async def test_bearer_scheme_is_case_insensitive(stack: Stack) -> None:
    code, body = await whoami(stack, {"Authorization": f"bEaReR {stack.token()}"})
    assert code == 201
    assert body["status"]["userInfo"]["username"] == "oidc:alice"


@pytest.mark.slow
async def test_upstream_status_and_headers_are_relayed(stack: Stack) -> None:
    async with stack.client.get(
        stack.url + PODS + "/missing", headers=stack.bearer()
    ) as r:
        assert r.status == 404
        body = await r.json()
    assert body["reason"] == "NotFound"
    assert (
        metric(stack.metrics, "kube_oidc_gate_upstream_requests_total", code="404") == 1
    )
    assert (
        metric(
            stack.metrics,
            "kube_oidc_gate_http_requests_total",
            handler="proxy",
            code="404",
        )
        == 1
    )
    duration = "kube_oidc_gate_http_request_duration_seconds"
    assert metric(stack.metrics, f"{duration}_count", handler="proxy") == 1
    assert 0 < metric(stack.metrics, f"{duration}_sum", handler="proxy") < 5


# --------------------------------------------------------------------------
# Refusals: nothing goes upstream


def _status_of(body: dict[str, Any], code: int) -> None:
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]


REFUSALS: list[tuple[str, Any, int, str]] = [
    ("no-token", lambda s: {}, 401, "Unauthorized"),
    (
        "basic-auth",
        lambda s: {"Authorization": "Basic YWxpY2U6cHc="},
        401,
        "Unauthorized",
    ),
    ("empty-bearer", lambda s: {"Authorization": "Bearer "}, 401, "Unauthorized"),
    ("not-a-jwt", lambda s: {"Authorization": "Bearer not.a.jwt"}, 401, "Unauthorized"),
    (
        "expired",
        lambda s: {"Authorization": "Bearer " + s.token(lifetime=-3600)},
        401,
        "Unauthorized",
    ),
    (
        "other-issuer",
        lambda s: {
            "Authorization": "Bearer "
            + sign(new_key(), claims_for("https://other.test"))
        },
        401,
        "Unauthorized",
    ),
    (
        "wrong-key",
        lambda s: {"Authorization": "Bearer " + sign(new_key(), claims_for(ISSUER))},
        401,
        "Unauthorized",
    ),
    (
        "client-impersonate-user",
        lambda s: {**s.bearer(), "Impersonate-User": "admin"},
        403,
        "Forbidden",
    ),
    (
        "client-impersonate-group-lowercase",
        lambda s: {**s.bearer(), "impersonate-group": "system:masters"},
        403,
        "Forbidden",
    ),
    (
        "client-impersonate-extra",
        lambda s: {**s.bearer(), "Impersonate-Extra-Scopes": "all"},
        403,
        "Forbidden",
    ),
    (
        "client-impersonate-uid",
        lambda s: {**s.bearer(), "Impersonate-Uid": "1"},
        403,
        "Forbidden",
    ),
    (
        "username-with-trailing-blank",
        lambda s: s.bearer(sub="alice "),
        403,
        "Forbidden",
    ),
    (
        "group-with-newline",
        lambda s: s.bearer(groups=["devs\nx"]),
        403,
        "Forbidden",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_headers", "code", "reason"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
async def test_refusals_answer_status_and_send_nothing_upstream(
    stack: Stack, make_headers: Any, code: int, reason: str
) -> None:
    status, body = await whoami(stack, make_headers(stack))
    assert status == code
    _status_of(body, code)
    assert body["reason"] == reason
    assert stack.fake.requests == []


@pytest.mark.slow
async def test_two_authorization_headers_are_refused(stack: Stack) -> None:
    token = stack.token()
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Authorization", f"Bearer {token}"),
    ]
    async with stack.client.post(stack.url + WHOAMI, headers=headers) as r:
        assert r.status == 401
    assert stack.fake.requests == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("groups", "allowed", "code"),
    [
        (["system:masters"], (), 403),
        (["devs", "system:nodes"], ("system:masters",), 403),
        (["system:masters"], ("system:masters",), 201),
    ],
    ids=["reserved-group", "not-listed", "listed"],
)
async def test_reserved_identities_are_refused_unless_listed(
    tmp_path: Path,
    ca: trustme.CA,
    groups: list[str],
    allowed: tuple[str, ...],
    code: int,
) -> None:
    settings = ProxySettings(allow_reserved_groups=allowed)
    async with run_proxy(
        tmp_path, ca, settings=settings, claim_mappings=mappings(group_prefix="")
    ) as stack:
        status, body = await whoami(stack, stack.bearer(groups=groups))
        assert status == code
        if code == 201:
            assert "system:masters" in body["status"]["userInfo"]["groups"]
        else:
            _status_of(body, code)
            assert stack.fake.requests == []


@pytest.mark.slow
async def test_reserved_username_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    async with run_proxy(
        tmp_path, ca, claim_mappings=mappings(user_prefix="")
    ) as stack:
        status, _ = await whoami(stack, stack.bearer(sub="system:admin"))
        assert status == 403
        status, _ = await whoami(stack, stack.bearer(sub="alice"))
        assert status == 201


class _Unready:
    def __init__(self, error: TokenError) -> None:
        self.error = error

    def lookup(self, token: str) -> tuple[bytes, UserInfo | None]:
        return b"", None

    async def validate(self, token: str, key: bytes) -> UserInfo | None:
        raise self.error


@pytest.mark.slow
@pytest.mark.parametrize(
    "error",
    [
        KeysUnavailable("jwks: keys not loaded yet"),
        Overloaded("authn: 1024 new tokens are already waiting for their turn; retry"),
    ],
    ids=["keys-not-loaded", "new-token-queue-full"],
)
async def test_temporary_refusals_are_503_with_retry_after(
    tmp_path: Path, ca: trustme.CA, error: TokenError
) -> None:
    async with run_proxy(tmp_path, ca, authenticator=_Unready(error)) as stack:
        async with stack.client.get(stack.url + PODS, headers=stack.bearer()) as r:
            assert r.status == 503
            assert r.headers["Retry-After"]
            _status_of(await r.json(), 503)
        assert stack.fake.requests == []


# --------------------------------------------------------------------------
# Client impersonation (kubectl --as) checked by SubjectAccessReview


async def test_as_user_allowed_by_sar_is_forwarded(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca, settings=allow_as()) as stack:
        stack.fake.sar_rules.add(("oidc:alice", "users", "bob"))
        code, body = await whoami(
            stack,
            {**stack.bearer(groups=["devs"], jti="j1"), "Impersonate-User": "bob"},
        )
        assert code == 201
        assert body["status"]["userInfo"] == {
            "username": "bob",
            "groups": ["system:authenticated"],
            "extra": {
                ORIGINAL_USER_EXTRA: [
                    '{"username":"oidc:alice","uid":"","groups":["oidc:devs"]}'
                ]
            },
        }
        (review,) = stack.fake.sar_reviews
        spec = review["spec"]
        assert spec["user"] == "oidc:alice"
        assert spec["groups"] == ["oidc:devs", "system:authenticated"]
        assert spec["extra"] == {
            "authentication.kubernetes.io/credential-id": ["JTI=j1"]
        }
        assert spec["resourceAttributes"] == {
            "resource": "users",
            "name": "bob",
            "group": "",
            "verb": "impersonate",
        }
        sar_request = stack.fake.seen(SAR)[0]
        assert sar_request.bearer == PROXY_TOKEN
        assert "Impersonate-User" not in sar_request.headers
        forwarded = stack.fake.seen(WHOAMI)[0]
        assert forwarded.headers.getall("Impersonate-User") == ["bob"]
        assert "Impersonate-Group" not in forwarded.headers


async def test_as_forwards_the_original_user_in_the_reserved_extra(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """kube-apiserver lower-cases the header name, then percent-decodes it; the
    value is compact JSON of who authenticated, never reviewed as the user."""
    async with run_proxy(tmp_path, ca, settings=allow_as()) as stack:
        stack.fake.sar_rules |= {
            ("oidc:alice", "users", "bob"),
            ("oidc:alice", "groups", "admins"),
            ("oidc:alice", "userextras/example.com/scopes", "read"),
        }
        code, _ = await whoami(
            stack,
            {
                **stack.bearer(groups=["devs", "ops"]),
                "Impersonate-User": "bob",
                "Impersonate-Group": "admins",
                "Impersonate-Extra-example.com%2fscopes": "read",
            },
        )
        assert code == 201
        sent = stack.fake.seen(WHOAMI)[0].headers
        names = [n for n in sent if n.lower().startswith("impersonate-extra-")]
        reserved = [n for n in names if "original-user" in n.lower()]
        assert reserved == ["Impersonate-Extra-kube-oidc-gate.io%2Foriginal-user"]
        (value,) = sent.getall(reserved[0])
        assert json.loads(value) == {
            "username": "oidc:alice",
            "uid": "",
            "groups": ["oidc:devs", "oidc:ops"],
        }
        assert value == json.dumps(json.loads(value), separators=(",", ":"))
        assert sent.getall("Impersonate-Extra-example.com%2fscopes") == ["read"]
        user = stack.fake.seen(WHOAMI)[0].user
        assert user is not None
        assert set(user["extra"]) == {"example.com/scopes", ORIGINAL_USER_EXTRA}
        checked = [
            r["spec"]["resourceAttributes"].get("subresource")
            for r in stack.fake.sar_reviews
        ]
        assert ORIGINAL_USER_EXTRA not in checked
        assert len(stack.fake.sar_reviews) == 3


async def test_without_as_no_original_user_extra_is_sent(stack: Stack) -> None:
    code, body = await whoami(stack, stack.bearer())
    assert code == 201
    assert "extra" not in body["status"]["userInfo"]
    sent = stack.fake.seen(WHOAMI)[0].headers
    assert not [n for n in sent if "original-user" in n.lower()]


@pytest.mark.parametrize(
    "name",
    [
        "Impersonate-Extra-kube-oidc-gate.io%2foriginal-user",
        "Impersonate-Extra-kube-oidc-gate.io%2Foriginal-user",
        "IMPERSONATE-EXTRA-KUBE-OIDC-GATE.IO%2FORIGINAL-USER",
        "impersonate-extra-kube-oidc-gate.io%2Foriginal%2Duser",
        "Impersonate-Extra-%6Bube-oidc-gate.io%2foriginal-user",
        "Impersonate-Extra-%4Bube-oidc-gate.io%2foriginal-user",
        "Impersonate-Extra-kube%2doidc%2dgate%2eio%2f%6f%72iginal-user",
    ],
    ids=[
        "lower-escape",
        "upper-escape",
        "upper-case",
        "escaped-dash",
        "escaped-letter",
        "escaped-capital",
        "all-escaped",
    ],
)
async def test_a_client_can_never_set_the_original_user_extra(
    tmp_path: Path, ca: trustme.CA, name: str
) -> None:
    async with run_proxy(tmp_path, ca, settings=allow_as()) as stack:
        stack.fake.sar_rules.add(("oidc:alice", "users", "bob"))
        stack.fake.sar_rules.add(("oidc:alice", "userextras/*", "*"))
        status, body = await whoami(
            stack,
            {**stack.bearer(), "Impersonate-User": "bob", name: '{"username":"x"}'},
        )
        assert status == 403
        _status_of(body, 403)
        assert "kube-oidc-gate.io/original-user" in body["message"]
        assert "set by the proxy" in body["message"]
        assert stack.fake.requests == []


SAR_CASES: list[
    tuple[str, dict[str, Any], set[tuple[str, str, str]], int, list[dict[str, str]]]
] = [
    (
        "user-denied",
        {"Impersonate-User": "bob"},
        set(),
        403,
        [{"resource": "users", "name": "bob", "group": ""}],
    ),
    (
        "service-account",
        {"Impersonate-User": "system:serviceaccount:team:builder"},
        {("oidc:alice", "serviceaccounts", "builder")},
        201,
        [
            {
                "resource": "serviceaccounts",
                "namespace": "team",
                "name": "builder",
                "group": "",
            }
        ],
    ),
    (
        "malformed-service-account-is-a-user",
        {"Impersonate-User": "system:serviceaccount:team"},
        {("oidc:alice", "users", "system:serviceaccount:team")},
        201,
        [{"resource": "users", "name": "system:serviceaccount:team", "group": ""}],
    ),
    (
        "user-group-uid-extra",
        {
            "Impersonate-User": "bob",
            "Impersonate-Group": "admins",
            "Impersonate-Uid": "u-1",
            "Impersonate-Extra-Example.com%2fScopes": "read",
        },
        {
            ("oidc:alice", "users", "bob"),
            ("oidc:alice", "groups", "admins"),
            ("oidc:alice", "uids", "u-1"),
            ("oidc:alice", "userextras/example.com/scopes", "read"),
        },
        201,
        [
            {"resource": "users", "name": "bob", "group": ""},
            {"resource": "groups", "name": "admins", "group": ""},
            {
                "resource": "userextras",
                "subresource": "example.com/scopes",
                "name": "read",
                "group": "authentication.k8s.io",
            },
            {"resource": "uids", "name": "u-1", "group": "authentication.k8s.io"},
        ],
    ),
    (
        "group-denied-after-user-allowed",
        {"Impersonate-User": "bob", "Impersonate-Group": "admins"},
        {("oidc:alice", "users", "bob")},
        403,
        [
            {"resource": "users", "name": "bob", "group": ""},
            {"resource": "groups", "name": "admins", "group": ""},
        ],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("headers", "rules", "code", "checks"),
    [c[1:] for c in SAR_CASES],
    ids=[c[0] for c in SAR_CASES],
)
async def test_impersonation_checks_like_kube_apiserver(
    tmp_path: Path,
    ca: trustme.CA,
    headers: dict[str, str],
    rules: set[tuple[str, str, str]],
    code: int,
    checks: list[dict[str, str]],
) -> None:
    async with run_proxy(tmp_path, ca, settings=allow_as()) as stack:
        stack.fake.sar_rules |= rules
        status, body = await whoami(stack, {**stack.bearer(), **headers})
        assert status == code
        seen = [r["spec"]["resourceAttributes"] for r in stack.fake.sar_reviews]
        assert seen == [{**c, "verb": "impersonate"} for c in checks]
        if code == 403:
            _status_of(body, 403)
            assert upstream_calls(stack) == []
        else:
            forwarded = stack.fake.seen(WHOAMI)[0].headers
            for name, value in headers.items():
                assert forwarded.getall(name) == [value]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Impersonate-Group": "admins"}, 400),
        ({"Impersonate-Uid": "1"}, 400),
        ({"Impersonate-User": ""}, 400),
        ({"Impersonate-Foo": "x", "Impersonate-User": "bob"}, 400),
        (
            [("Impersonate-User", "bob")]
            + [("Impersonate-Group", f"g{i}") for i in range(4)],
            431,
        ),
    ],
    ids=[
        "group-without-user",
        "uid-without-user",
        "empty-user",
        "unknown-header",
        "too-many",
    ],
)
async def test_malformed_impersonation_requests(
    tmp_path: Path, ca: trustme.CA, headers: Any, code: int
) -> None:
    async with run_proxy(
        tmp_path, ca, settings=allow_as(max_impersonation_values=4)
    ) as stack:
        items = list(headers.items()) if isinstance(headers, dict) else headers
        async with stack.client.post(
            stack.url + WHOAMI, headers=[*stack.bearer().items(), *items]
        ) as r:
            assert r.status == code
            _status_of(await r.json(), code)
        assert stack.fake.requests == []


@pytest.mark.slow
async def test_repeated_impersonate_user_is_refused(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca, settings=allow_as()) as stack:
        headers = [
            *stack.bearer().items(),
            ("Impersonate-User", "a"),
            ("Impersonate-User", "b"),
        ]
        async with stack.client.post(stack.url + WHOAMI, headers=headers) as r:
            assert r.status == 400
        assert stack.fake.requests == []


# --------------------------------------------------------------------------
# Token passthrough


@pytest.mark.slow
async def test_passthrough_forwards_foreign_tokens_unchanged(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(
        tmp_path, ca, settings=ProxySettings(token_passthrough=True)
    ) as stack:
        foreign = sign(new_key(), claims_for("https://other.test", sub="carol"))
        stack.fake.user_tokens[foreign] = {"username": "carol", "groups": ["team"]}
        # As kube-apiserver would, the fake applies the forwarded
        # Impersonate-User only if carol may impersonate (she may, here).
        stack.fake.user_impersonation_rules["carol"] = (
            Rule(api_groups=("",), resources=("users",), verbs=("impersonate",)),
        )
        headers = {"Authorization": f"Bearer {foreign}", "Impersonate-User": "dave"}
        code, body = await whoami(stack, headers)
        assert code == 201
        assert body["status"]["userInfo"]["username"] == "dave"
        (seen,) = stack.fake.requests
        assert seen.headers.getall("Authorization") == [f"Bearer {foreign}"]
        assert seen.headers.getall("Impersonate-User") == ["dave"]
        # our own tokens are still impersonated, never passed through
        code, body = await whoami(stack, stack.bearer())
        assert body["status"]["userInfo"]["username"] == "oidc:alice"
        assert stack.fake.requests[1].bearer == PROXY_TOKEN


async def test_without_passthrough_foreign_tokens_are_401(stack: Stack) -> None:
    foreign = sign(new_key(), claims_for("https://other.test"))
    stack.fake.user_tokens[foreign] = {"username": "carol"}
    code, body = await whoami(stack, {"Authorization": f"Bearer {foreign}"})
    _status_of(body, 401)
    assert code == 401
    assert stack.fake.requests == []


# --------------------------------------------------------------------------
# Upstream failures


@pytest.mark.slow
async def test_upstream_down_is_503_status(stack: Stack) -> None:
    await stack.fake.stop()
    async with stack.client.get(stack.url + PODS, headers=stack.bearer()) as r:
        assert r.status == 503
        body = await r.json()
    _status_of(body, 503)
    assert body["reason"] == "ServiceUnavailable"
    assert (
        metric(
            stack.metrics, "kube_oidc_gate_upstream_requests_total", code="unavailable"
        )
        == 1
    )


@pytest.mark.slow
async def test_upstream_too_slow_is_504_status(tmp_path: Path, ca: trustme.CA) -> None:
    async with run_proxy(
        tmp_path, ca, settings=ProxySettings(request_timeout=0.3)
    ) as stack:
        stack.fake.delay = 3.0
        async with stack.client.get(stack.url + PODS, headers=stack.bearer()) as r:
            assert r.status == 504
            body = await r.json()
        _status_of(body, 504)
        assert body["reason"] == "Timeout"


@pytest.mark.slow
async def test_upstream_refusing_the_proxy_credential_is_relayed(stack: Stack) -> None:
    stack.fake.proxy_tokens = {"another-token"}
    code, body = await whoami(stack, stack.bearer())
    assert code == 401
    assert body["kind"] == "Status"


# --------------------------------------------------------------------------
# Streaming


@pytest.mark.slow
async def test_request_body_is_streamed(stack: Stack) -> None:
    digest = hashlib.sha256()
    block = bytes(range(256)) * 256

    async def body() -> AsyncIterator[bytes]:
        for _ in range(128):
            digest.update(block)
            yield block

    async with stack.client.post(
        stack.url + "/api/v1/namespaces/default/configmaps",
        headers=stack.bearer(),
        data=body(),
    ) as r:
        assert r.status == 201
        answer = await r.json()
    assert answer == {"bytes": 128 * len(block), "sha256": digest.hexdigest()}


@pytest.mark.slow
async def test_watch_events_arrive_while_streaming_and_disconnect_cancels(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca) as stack:
        await _watch_and_leave(stack)


async def _watch_and_leave(stack: Stack) -> None:
    async with stack.client.get(
        stack.url + PODS, params={"watch": "true"}, headers=stack.bearer()
    ) as r:
        assert r.status == 200
        first = json.loads(await asyncio.wait_for(r.content.readline(), 5))
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "p")
        stack.fake.emit("ADDED", "q")
        second = json.loads(await asyncio.wait_for(r.content.readline(), 5))
        assert (second["type"], second["object"]["metadata"]["name"]) == ("ADDED", "q")
        assert (
            metric(stack.metrics, "kube_oidc_gate_inflight_streams", kind="watch") == 1
        )
        # A stream is timed to its headers, once, while it is still open.
        duration = "kube_oidc_gate_http_request_duration_seconds"
        assert metric(stack.metrics, f"{duration}_count", handler="proxy") == 1
        r.close()
    await asyncio.wait_for(stack.fake.watch_closed.wait(), 5)
    for _ in range(50):
        if metric(stack.metrics, "kube_oidc_gate_inflight_streams", kind="watch") == 0:
            break
        await asyncio.sleep(0.05)
    assert metric(stack.metrics, "kube_oidc_gate_inflight_streams", kind="watch") == 0
    assert metric(stack.metrics, f"{duration}_count", handler="proxy") == 1


@pytest.mark.slow
async def test_long_running_requests_have_no_total_timeout(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with (
        run_proxy(tmp_path, ca, settings=ProxySettings(request_timeout=0.3)) as stack,
        stack.client.get(
            stack.url + PODS + "/p/log",
            params={"follow": "true"},
            headers=stack.bearer(),
        ) as r,
    ):
        assert await asyncio.wait_for(r.content.readline(), 5) == b"log line 0\n"
        await asyncio.sleep(0.6)
        stack.fake.log_lines.put_nowait("after the request timeout")
        line = await asyncio.wait_for(r.content.readline(), 5)
        assert line == b"after the request timeout\n"


@pytest.mark.slow
async def test_idle_stream_is_ended(tmp_path: Path, ca: trustme.CA) -> None:
    async with run_proxy(
        tmp_path, ca, settings=ProxySettings(stream_idle_timeout=0.3)
    ) as stack:
        async with stack.client.get(
            stack.url + PODS + "/p/log",
            params={"follow": "true"},
            headers=stack.bearer(),
        ) as r:
            body = await asyncio.wait_for(r.read(), 5)
        assert body == b"log line 0\n"
        await asyncio.wait_for(stack.fake.log_closed.wait(), 5)


@pytest.mark.slow
async def test_upstream_dying_mid_stream_cuts_the_client(stack: Stack) -> None:
    async with stack.client.get(
        stack.url + PODS + "/p/log", params={"follow": "true"}, headers=stack.bearer()
    ) as r:
        assert await asyncio.wait_for(r.content.readline(), 5) == b"log line 0\n"
        stack.fake.log_lines.put_nowait(ABORT)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 5)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak_rss() -> int | None:
    """Current RSS in bytes after resetting the peak (VmHWM), or None if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss_kib("VmRSS") * 1024
    except (OSError, LookupError):
        return None


@pytest.mark.slow
async def test_large_response_is_relayed_with_flat_memory(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca, tls=False) as stack:
        size = stack.fake.big_size
        assert size >= 100 * 1024 * 1024
        received = 0
        tail = b""
        rss_before = _reset_peak_rss()
        tracemalloc.start()
        try:
            async with stack.client.get(
                stack.url + "/api/v1/namespaces/default/configmaps",
                headers=stack.bearer(),
            ) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(256 * 1024):
                    received += len(chunk)
                    tail = (tail + chunk)[-64:]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received > size - 128 * 1024
        assert tail.endswith(b'{"metadata":{"name":"last"}}]}')
        # the whole process (fake server, proxy, client) held less than 1/5 of it
        assert peak < size // 5, f"peak traced memory {peak} bytes"
        if rss_before is not None:
            grown = _rss_kib("VmHWM") * 1024 - rss_before
            assert grown < size // 4, f"peak RSS grew by {grown} bytes"


# --------------------------------------------------------------------------
# Upgrades: exec and port-forward over WebSocket, raw SPDY


def _bearer_protocol(token: str) -> str:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return "base64url.bearer.authorization.k8s.io." + encoded


@pytest.mark.slow
@pytest.mark.parametrize(
    "token_in", ["header", "subprotocol"], ids=["header", "subprotocol"]
)
async def test_exec_over_websocket_v5(stack: Stack, token_in: str) -> None:
    token = stack.token()
    protocols = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
    headers: dict[str, str] = {}
    if token_in == "header":
        headers["Authorization"] = f"Bearer {token}"
    else:
        protocols.insert(0, _bearer_protocol(token))
    ws = await stack.client.ws_connect(
        stack.url + PODS + "/p/exec?command=cat&stdin=true&stdout=true",
        protocols=protocols,
        headers=headers,
    )
    async with ws:
        assert ws.protocol == "v5.channel.k8s.io"
        await ws.send_bytes(b"\x00hello ")
        await ws.send_bytes(b"\x00world")
        out = b""
        while out != b"hello world":
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type == WSMsgType.BINARY
            assert msg.data[0] == 1
            out += msg.data[1:]
        await ws.send_bytes(b"\xff\x00")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.data[0] == 3
        assert json.loads(msg.data[1:])["status"] == "Success"
    seen = stack.fake.seen(PODS + "/p/exec")[0].headers
    assert seen.getall("Authorization") == [f"Bearer {PROXY_TOKEN}"]
    assert seen["Impersonate-User"] == "oidc:alice"
    offered = [p.strip() for p in seen["Sec-WebSocket-Protocol"].split(",")]
    assert offered == ["v5.channel.k8s.io", "v4.channel.k8s.io"]
    assert token not in json.dumps(list(seen.items()))


@pytest.mark.slow
async def test_websocket_upgrade_refused_without_token(stack: Stack) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await stack.client.ws_connect(
            stack.url + PODS + "/p/exec?command=cat", protocols=["v5.channel.k8s.io"]
        )
    assert info.value.status == 401
    assert stack.fake.requests == []


@pytest.mark.slow
async def test_port_forward_over_websocket_carries_bytes_both_ways(
    stack: Stack,
) -> None:
    async with stack.client.ws_connect(
        stack.url + PODS + "/p/portforward?port=8080&port=9090",
        protocols=["v4.channel.k8s.io"],
        headers=stack.bearer(),
    ) as ws:
        assert ws.protocol == "v4.channel.k8s.io"
        prefixes = {}
        for _ in range(4):
            msg = await asyncio.wait_for(ws.receive(), 5)
            prefixes[msg.data[0]] = struct.unpack("<H", msg.data[1:3])[0]
        assert prefixes == {0: 8080, 1: 8080, 2: 9090, 3: 9090}
        await ws.send_bytes(b"\x00ping one")
        await ws.send_bytes(b"\x02ping two")
        got = {}
        for _ in range(2):
            msg = await asyncio.wait_for(ws.receive(), 5)
            got[msg.data[0]] = msg.data[1:]
        assert got == {0: b"PING ONE", 2: b"PING TWO"}


@pytest.mark.slow
async def test_exec_upgrade_refused_upstream_is_relayed(stack: Stack) -> None:
    stack.fake.proxy_tokens = set()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await stack.client.ws_connect(
            stack.url + PODS + "/p/exec?command=cat",
            protocols=["v5.channel.k8s.io"],
            headers=stack.bearer(),
        )
    assert info.value.status == 401


async def _raw_upgrade(
    url: str, ca: trustme.CA, headers: list[str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    host, port = url.removeprefix("https://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    head = "\r\n".join(
        [f"POST {PODS}/p/portforward HTTP/1.1", f"Host: {host}:{port}", *headers]
    )
    writer.write(head.encode() + b"\r\n\r\n")
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, response


@pytest.mark.slow
async def test_raw_upgrade_with_client_impersonation_is_refused(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with serve_raw_upgrade(ca) as raw:
        config = upstream_kubeconfig(
            tmp_path / "raw.kubeconfig", raw.url, ca.cert_pem.bytes()
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        async with run_proxy(tmp_path, ca, upstream=upstream) as stack:
            _, writer, head = await _raw_upgrade(
                stack.url,
                ca,
                [
                    f"Authorization: Bearer {stack.token()}",
                    "Connection: Upgrade",
                    "Upgrade: SPDY/3.1",
                    "Impersonate-Group: system:masters",
                ],
            )
            writer.close()
            assert head.startswith(b"HTTP/1.1 403 ")
            assert raw.heads == []


@pytest.mark.slow
async def test_raw_spdy_bytes_flow_both_ways(tmp_path: Path, ca: trustme.CA) -> None:
    async with serve_raw_upgrade(ca) as raw:
        config = upstream_kubeconfig(
            tmp_path / "raw.kubeconfig", raw.url, ca.cert_pem.bytes()
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        async with run_proxy(tmp_path, ca, upstream=upstream) as stack:
            reader, writer, head = await _raw_upgrade(
                stack.url,
                ca,
                [
                    f"Authorization: Bearer {stack.token()}",
                    "Connection: Upgrade",
                    "Upgrade: SPDY/3.1",
                    "X-Stream-Protocol-Version: portforward.k8s.io",
                ],
            )
            assert head.startswith(b"HTTP/1.1 101 ")
            assert (
                await asyncio.wait_for(reader.readexactly(17), 5)
                == b"spdy-server-hello"
            )
            payload = bytes(range(97, 123)) * 4000
            writer.write(payload)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
            assert echoed == payload.upper()
            writer.write(b"BYE")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            line, sent = raw.heads[0]
            assert line == f"POST {PODS}/p/portforward HTTP/1.1"
            assert sent.getall("Authorization") == [f"Bearer {PROXY_TOKEN}"]
            assert sent["Impersonate-User"] == "oidc:alice"
            assert sent["Connection"] == "Upgrade"
            assert sent["Upgrade"] == "SPDY/3.1"


@pytest.mark.slow
async def test_raw_upgrade_refused_upstream_is_relayed(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with serve_raw_upgrade(ca) as raw:
        raw.refuse = 403
        config = upstream_kubeconfig(
            tmp_path / "raw.kubeconfig", raw.url, ca.cert_pem.bytes()
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        async with run_proxy(tmp_path, ca, upstream=upstream) as stack:
            async with stack.client.post(
                stack.url + PODS + "/p/portforward",
                headers={
                    **stack.bearer(),
                    "Connection": "Upgrade",
                    "Upgrade": "SPDY/3.1",
                },
            ) as r:
                assert r.status == 403
                body = await r.json()
            assert body["reason"] == "Forbidden"


# --------------------------------------------------------------------------
# Access log


@pytest.mark.slow
async def test_access_log_has_one_line_per_request_and_no_token(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = stack.token()
    async with stack.client.get(
        stack.url + PODS,
        params={"limit": "5", "token": token},
        headers={"Authorization": f"Bearer {token}"},
    ) as r:
        assert r.status == 200
    async with stack.client.get(
        stack.url + PODS, headers={"Authorization": "Bearer bad"}
    ) as r:
        assert r.status == 401
    lines = [rec for rec in caplog.records if rec.name == "proxy.access"]
    assert [rec.getMessage() for rec in lines] == ["request", "request"]
    ok, refused = (vars(rec) for rec in lines)
    assert ok["user"] == "oidc:alice"
    assert ok["groups_count"] == 1
    assert ok["verb"] == "list"
    assert ok["method"] == "GET"
    assert ok["path"] == PODS
    assert ok["status"] == 200
    assert ok["bytes"] > 0
    assert ok["duration"] >= 0
    assert refused["status"] == 401
    ours = [rec for rec in caplog.records if rec.name.startswith("proxy")]
    assert ours
    for rec in ours:
        text = json.dumps(vars(rec), default=str)
        assert token not in text
        assert "Bearer bad" not in text


@pytest.mark.slow
async def test_long_running_requests_are_logged_at_start_and_end(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with stack.client.get(
        stack.url + PODS, params={"watch": "1"}, headers=stack.bearer()
    ) as r:
        await asyncio.wait_for(r.content.readline(), 5)
        started = [
            rec.getMessage() for rec in caplog.records if rec.name == "proxy.access"
        ]
        assert started == ["request started"]
    for _ in range(50):
        events = [rec for rec in caplog.records if rec.name == "proxy.access"]
        if len(events) == 2:
            break
        await asyncio.sleep(0.05)
    assert [rec.getMessage() for rec in events] == ["request started", "request"]
    assert vars(events[1])["verb"] == "watch"
    assert vars(events[1])["kind"] == "watch"


# --------------------------------------------------------------------------
# Settings


def test_settings_defaults_are_fail_closed() -> None:
    settings = ProxySettings()
    assert settings.allow_client_impersonation is False
    assert settings.token_passthrough is False
    assert settings.allow_reserved_groups == ()
    assert settings.trusted_proxies == ()
    assert settings.max_impersonation_values > 0


@pytest.mark.slow
async def test_client_leaving_a_tunnel_closes_the_upstream_side(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with serve_raw_upgrade(ca) as raw:
        config = upstream_kubeconfig(
            tmp_path / "raw.kubeconfig", raw.url, ca.cert_pem.bytes()
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        async with run_proxy(tmp_path, ca, upstream=upstream) as stack:
            reader, writer, head = await _raw_upgrade(
                stack.url,
                ca,
                [
                    f"Authorization: Bearer {stack.token()}",
                    "Connection: Upgrade",
                    "Upgrade: SPDY/3.1",
                ],
            )
            assert head.startswith(b"HTTP/1.1 101 ")
            assert (
                await asyncio.wait_for(reader.readexactly(17), 5)
                == b"spdy-server-hello"
            )
            gauge = "kube_oidc_gate_inflight_streams"
            assert metric(stack.metrics, gauge, kind="portforward") == 1
            writer.transport.abort()
            await asyncio.wait_for(raw.closed.wait(), 5)
            async with asyncio.timeout(5):
                while metric(stack.metrics, gauge, kind="portforward") != 0:
                    await asyncio.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "header-and-subprotocol",
        "two-subprotocols",
        "undecodable",
        "empty",
        "not-websocket",
    ],
    ids=[
        "header-and-subprotocol",
        "two-subprotocols",
        "undecodable",
        "empty",
        "not-websocket",
    ],
)
async def test_websocket_token_refusals(stack: Stack, case: str) -> None:
    token = stack.token()
    protocols = ["v5.channel.k8s.io"]
    headers: dict[str, str] = {}
    if case == "header-and-subprotocol":
        headers["Authorization"] = f"Bearer {token}"
        protocols.append(_bearer_protocol(token))
    elif case == "two-subprotocols":
        protocols += [_bearer_protocol(token), _bearer_protocol(token)]
    elif case == "undecodable":
        protocols.append("base64url.bearer.authorization.k8s.io.!!!")
    elif case == "empty":
        protocols.append("base64url.bearer.authorization.k8s.io.")
    if case == "not-websocket":
        get_headers = {"Sec-WebSocket-Protocol": _bearer_protocol(token)}
        async with stack.client.get(stack.url + PODS, headers=get_headers) as r:
            assert r.status == 401
    else:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await stack.client.ws_connect(
                stack.url + PODS + "/p/exec?command=cat",
                protocols=protocols,
                headers=headers,
            )
        assert info.value.status == 401
    assert stack.fake.requests == []


@pytest.mark.slow
async def test_oversized_request_headers_are_431(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(
        tmp_path, ca, settings=ProxySettings(max_header_bytes=4096)
    ) as stack:
        headers = {**stack.bearer(), "X-Padding": "x" * 4096}
        async with stack.client.get(stack.url + PODS, headers=headers) as r:
            assert r.status == 431
            _status_of(await r.json(), 431)
        async with stack.client.get(stack.url + PODS, headers=stack.bearer()) as r:
            assert r.status == 200
        assert [r.path for r in stack.fake.requests] == [PODS]


# --------------------------------------------------------------------------
# Identity headers are computed once per cached user, never shared across users


@pytest.mark.slow
@pytest.mark.parametrize(
    "groups",
    [("devs",), ("system:masters",)],
    ids=["ordinary", "reserved"],
)
async def test_identity_headers_follow_each_user_across_repeated_tokens(
    tmp_path: Path, ca: trustme.CA, groups: tuple[str, ...]
) -> None:
    async with run_proxy(
        tmp_path, ca, claim_mappings=mappings(group_prefix="")
    ) as stack:
        alice = stack.bearer(sub="alice", groups=list(groups))
        bob = stack.bearer(sub="bob", groups=["ops", "qa"])
        seen: list[tuple[str, list[str]]] = []
        for headers in (alice, bob, alice, bob, alice):
            status, _ = await whoami(stack, headers)
            expected = 403 if "system:masters" in groups and headers is alice else 201
            assert status == expected
            if status == 201:
                sent = stack.fake.requests[-1].headers
                seen.append(
                    (sent["Impersonate-User"], sent.getall("Impersonate-Group", []))
                )
        bob_seen = ("oidc:bob", ["ops", "qa"])
        if "system:masters" in groups:
            assert seen == [bob_seen, bob_seen]
        else:
            alice_seen = ("oidc:alice", list(groups))
            assert seen == [alice_seen, bob_seen, alice_seen, bob_seen, alice_seen]


@pytest.mark.slow
async def test_a_near_miss_issuer_is_401_with_its_reason_and_both_values(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with run_proxy(tmp_path, ca) as stack:
        token = sign(stack.key, claims_for(ISSUER + "/", groups=["devs"]))
        code, body = await whoami(stack, {"Authorization": f"Bearer {token}"})
        assert code == 401
        _status_of(body, 401)
        assert stack.fake.requests == []
    (line,) = [vars(r) for r in caplog.records if r.msg == "request"]
    assert line["reason"] == "issuer_mismatch"
    assert f'"{ISSUER}/"' in line["detail"]
    assert f'"{ISSUER}"' in line["detail"]
    assert token not in str(line)


@pytest.mark.slow
async def test_passthrough_still_forwards_a_near_miss_issuer(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """Only the explanation changed: a token that nearly names our issuer is
    still not ours to judge, and ``--token-passthrough`` lets the API server
    (which may trust that issuer) decide, twice (the second from the cache).
    """
    async with run_proxy(
        tmp_path, ca, settings=ProxySettings(token_passthrough=True)
    ) as stack:
        near = sign(new_key(), claims_for(ISSUER + "/", sub="carol"))
        stack.fake.user_tokens[near] = {"username": "carol", "groups": ["team"]}
        for _ in range(2):
            code, body = await whoami(stack, {"Authorization": f"Bearer {near}"})
            assert code == 201
            assert body["status"]["userInfo"]["username"] == "carol"
        assert [r.bearer for r in stack.fake.requests] == [near, near]


def _b64std(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
async def test_refused_proxy_requests_are_not_kept_alive(
    tmp_path: Path, ca: trustme.CA
) -> None:
    mark = f"review-{id(tmp_path)}"
    async with run_proxy(tmp_path, ca) as stack:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(ca), force_close=True)
        ) as client:
            for i in range(5):
                headers = {"Authorization": f"Bearer bad.token.{i}", "X-Mark": mark}
                async with client.get(stack.url + "/api", headers=headers) as r:
                    assert r.status == 401
        await asyncio.sleep(0.05)
        gc.collect()
        alive = [
            o
            for o in gc.get_objects()
            if isinstance(o, web.BaseRequest) and o.headers.get("X-Mark") == mark
        ]
        assert alive == []
        assert stack.fake.requests == []


# --------------------------------------------------------------------------
# A token that is not valid text is a refusal, not a crash


async def _raw_request(url: str, ca: trustme.CA, head: bytes) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    host, port = url.removeprefix("https://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        writer.write(head)
        async with asyncio.timeout(5):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "token",
    [b"abc\xff.def.ghi", b"\xed\xa0\x80.a.b", b"e30.e30.\xc3"],
    ids=["latin-1-byte", "encoded-surrogate", "truncated-utf8"],
)
async def test_non_utf8_token_on_the_proxy_is_401(
    tmp_path: Path,
    ca: trustme.CA,
    token: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with run_proxy(tmp_path, ca) as stack:
        head = await _raw_request(
            stack.url,
            ca,
            b"GET /api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token
            + b"\r\nConnection: close\r\n\r\n",
        )
        assert head.startswith(b"HTTP/1.1 401 "), head[:40]
        assert stack.fake.requests == []
        assert not [r for r in caplog.records if r.levelname == "ERROR"]


# --------------------------------------------------------------------------
# Client impersonation: what is authorised is what the API server applies


async def _whoami(stack: Stack, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with stack.client.post(
        stack.url + WHOAMI, headers={**stack.bearer(), **headers}, json={}
    ) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.slow
async def test_requested_extra_key_arrives_as_authorised(
    tmp_path: Path, ca: trustme.CA
) -> None:
    settings = ProxySettings(allow_client_impersonation=True)
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        stack.fake.sar_rules |= {
            ("oidc:alice", "users", "bob"),
            ("oidc:alice", "userextras/Example.com/scopes", "read"),
        }
        # kube-apiserver lower-cases the header name before decoding it, so
        # only the encoded capital (%45) is part of the key.
        code, body = await _whoami(
            stack,
            {
                "Impersonate-User": "bob",
                "Impersonate-Extra-%45xample.com%2fScopes": "read",
            },
        )
        assert code == 201, body
        (extra_check,) = [
            r["spec"]["resourceAttributes"]
            for r in stack.fake.sar_reviews
            if r["spec"]["resourceAttributes"]["resource"] == "userextras"
        ]
        assert extra_check["subresource"] == "Example.com/scopes"
        extra = body["status"]["userInfo"]["extra"]
        # Plus who asked (issue 24), which the client did not send.
        assert extra.pop("kube-oidc-gate.io/original-user")
        assert extra == {"Example.com/scopes": ["read"]}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("username", "resource"),
    [
        ("system:serviceaccount:team:builder", "serviceaccounts"),
        ("system:serviceaccount:team:build.er-1", "serviceaccounts"),
        ("system:serviceaccount:Team:builder", "users"),
        ("system:serviceaccount:team:Builder", "users"),
        ("system:serviceaccount:team:build_er", "users"),
        ("system:serviceaccount:-team:builder", "users"),
        (f"system:serviceaccount:{'n' * 64}:builder", "users"),
        (f"system:serviceaccount:team:{'b' * 254}", "users"),
        ("system:serviceaccount:team:a:b", "users"),
    ],
    ids=[
        "valid",
        "valid-subdomain-name",
        "namespace-not-a-label",
        "name-not-a-subdomain",
        "underscore-in-name",
        "namespace-leading-dash",
        "namespace-too-long",
        "name-too-long",
        "three-parts",
    ],
)
async def test_service_account_impersonation_is_checked_as_kube_apiserver_would(
    tmp_path: Path, ca: trustme.CA, username: str, resource: str
) -> None:
    settings = ProxySettings(allow_client_impersonation=True)
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        code, _ = await _whoami(stack, {"Impersonate-User": username})
        assert code == 403
        (review,) = stack.fake.sar_reviews
        assert review["spec"]["resourceAttributes"]["resource"] == resource
        assert [r.path for r in stack.fake.requests if r.path != SAR] == []


# --------------------------------------------------------------------------
# Request-header authentication names never reach the API server


@pytest.mark.slow
async def test_x_remote_uid_is_not_forwarded(tmp_path: Path, ca: trustme.CA) -> None:
    async with run_proxy(tmp_path, ca) as stack:
        code, _ = await _whoami(stack, {"X-Remote-Uid": "0", "x-remote-uid": "1"})
        assert code == 201
        (seen,) = stack.fake.requests
        assert "X-Remote-Uid" not in seen.headers


# --------------------------------------------------------------------------
# Token passthrough must not ride the proxy's client certificate


@pytest.mark.slow
async def test_passthrough_never_goes_out_with_the_proxys_client_certificate(
    tmp_path: Path, ca: trustme.CA
) -> None:
    # kube-apiserver authenticates a client certificate before any bearer
    # token, so a passthrough request on the proxy's mTLS connection would run
    # as the proxy, with the client's Impersonate-* headers.
    client_ca = trustme.CA()
    cert = client_ca.issue_cert("kube-oidc-gate-proxy")
    foreign = sign(new_key("RS256"), claims_for("https://elsewhere.example.test"))
    settings = ProxySettings(token_passthrough=True, request_timeout=5)
    async with serve_raw_upgrade(ca, token=None, client_ca=client_ca) as raw:
        config = tmp_path / "mtls.kubeconfig"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": raw.url,
                                "certificate-authority-data": _b64std(
                                    ca.cert_pem.bytes()
                                ),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "u",
                            "user": {
                                "client-certificate-data": _b64std(
                                    cert.cert_chain_pems[0].bytes()
                                ),
                                "client-key-data": _b64std(
                                    cert.private_key_pem.bytes()
                                ),
                            },
                        }
                    ],
                    "contexts": [
                        {"name": "c", "context": {"cluster": "c", "user": "u"}}
                    ],
                    "current-context": "c",
                }
            )
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        async with run_proxy(
            tmp_path, ca, settings=settings, upstream=upstream
        ) as stack:
            headers = {
                "Authorization": f"Bearer {foreign}",
                "Impersonate-User": "admin",
                "Impersonate-Group": "system:masters",
            }
            async with stack.client.get(stack.url + "/api", headers=headers) as r:
                assert r.status == 401
            head = await _raw_request(
                stack.url,
                ca,
                f"POST /api/v1/namespaces/default/pods/p/portforward HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: Bearer {foreign}\r\n"
                "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n".encode(),
            )
            assert head.startswith(b"HTTP/1.1 401 "), head[:40]
        assert raw.heads == []


# --------------------------------------------------------------------------
# Clients that vanish mid-stream


STREAMS = {
    "watch": f"GET {PODS}?watch=1 HTTP/1.1\r\n",
    "log": f"GET {PODS}/p/log?follow=true HTTP/1.1\r\n",
    "exec": f"GET {PODS}/p/exec?command=cat&stdin=true&stdout=true HTTP/1.1\r\n"
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}\r\n"
    "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STREAMS), ids=["watch", "log-follow", "exec"])
async def test_client_vanishing_mid_stream_leaves_nothing_behind(
    issuer: FakeIssuer, tmp_path: Path, kind: str
) -> None:
    async with running_gate(tmp_path, "proxy", issuer) as gate:
        assert gate.fake is not None
        token = gate.token()
        await normal_request(gate)  # warm the pool, the cache and the metrics
        gauge = "kube_oidc_gate_inflight_streams"
        baseline = len(asyncio.all_tasks())
        reader, writer = await gate.open_tls()
        head = (
            STREAMS[kind] + f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        writer.write(head.encode())
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(
            b"HTTP/1.1 101 " if kind == "exec" else b"HTTP/1.1 200 "
        )
        if kind != "exec":
            await asyncio.wait_for(reader.readuntil(b"\n"), 5)  # a chunk has arrived
        await wait_until(lambda: gate.value(gauge, kind=kind) == 1, what="stream open")
        assert len(asyncio.all_tasks()) > baseline
        writer.transport.abort()
        await wait_until(lambda: gate.value(gauge, kind=kind) == 0, what="gauge at 0")
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= baseline,
            what="proxy and upstream handlers finished",
        )
        await normal_request(gate)


# --------------------------------------------------------------------------
# Headers that must not reach the API server (the GET path in impersonation
# mode is covered by test_impersonate; these are the other paths)

SMUGGLED = {
    "X-Remote-User": "admin",
    "X-Remote-Group": "system:masters",
    "X-Remote-Extra-Scopes": "all",
    "Proxy-Authorization": "Basic YWRtaW46YWRtaW4=",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Trailer": "X-Late",
    "Proxy-Connection": "keep-alive",
}


async def _smuggle_exec(gate: Gate, token: str) -> None:
    ws = await gate.client.ws_connect(
        gate.url + PODS + "/p/exec?command=cat&stdin=true",
        protocols=["v5.channel.k8s.io"],
        headers={**SMUGGLED, "Authorization": f"Bearer {token}"},
    )
    await ws.close()


async def _smuggle_h2c(gate: Gate, token: str) -> None:
    headers = {
        **SMUGGLED,
        "Authorization": f"Bearer {token}",
        "X-Nominated": "dropped because Connection names it",
        "Connection": "Upgrade, HTTP2-Settings, X-Nominated",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
    }
    async with gate.client.get(gate.url + PODS, headers=headers) as r:
        assert r.status == 200


async def _smuggle_passthrough(gate: Gate, token: str) -> None:
    foreign = sign(new_key(), claims_for("https://other.test"))
    assert gate.fake is not None
    gate.fake.user_tokens[foreign] = {"username": "carol", "groups": []}
    headers = {
        **SMUGGLED,
        "Authorization": f"Bearer {foreign}",
        "X-Nominated": "dropped because Connection names it",
        "Connection": "X-Nominated",
    }
    async with gate.client.get(gate.url + PODS, headers=headers) as r:
        assert r.status == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "send",
    [_smuggle_exec, _smuggle_h2c, _smuggle_passthrough],
    ids=["websocket-exec", "h2c-upgrade-attempt", "token-passthrough"],
)
async def test_spoofable_and_hop_by_hop_headers_never_reach_upstream(
    issuer: FakeIssuer, tmp_path: Path, send: Any
) -> None:
    async with running_gate(
        tmp_path, "proxy", issuer, proxy_settings=ProxySettings(token_passthrough=True)
    ) as gate:
        assert gate.fake is not None
        await send(gate, gate.token())
        (seen,) = gate.fake.requests
        for name in (*SMUGGLED, "X-Nominated", "HTTP2-Settings"):
            assert name not in seen.headers, name
        if send is _smuggle_h2c:
            assert "Upgrade" not in seen.headers
            assert "upgrade" not in seen.headers.get("Connection", "").lower()
        if send is _smuggle_passthrough:
            assert "Impersonate-User" not in seen.headers
        else:
            assert seen.headers["Impersonate-User"] == "oidc:00u1alice"
            assert seen.headers.getall("Authorization") == ["Bearer proxy-sa-token-1"]


KEY = new_key("RS256")


@pytest.fixture
async def corpus_issuer() -> AsyncIterator[FakeIssuer]:
    fake = FakeIssuer(KEY)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def gate(corpus_issuer: FakeIssuer, tmp_path: Path) -> AsyncIterator[Gate]:
    # Every refusal's own access line is what these tests read: none is
    # left out for the log limit (tested in test_proxy_listener).
    settings = ProxySettings(refusal_log_limit=0)
    async with running_gate(
        tmp_path, "proxy", corpus_issuer, proxy_settings=settings
    ) as g:
        corpus_issuer.reset_counts()
        yield g


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the records say: message, fields, exception text."""
    out = []
    for record in caplog.records:
        out.append(record.getMessage())
        out.append(json.dumps(vars(record), default=str))
    return "\n".join(out)


def refusal_details(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why the proxy refused: the access line of each refused request says,
    as a reason code for a refused token, else in its detail.
    """
    return [
        str(vars(r).get("reason") or vars(r).get("detail"))
        for r in caplog.records
        if r.name == "proxy.access" and "detail" in vars(r)
    ]


def assert_status_401(text: str) -> None:
    body = json.loads(text)
    assert body["kind"] == "Status"
    assert body["status"] == "Failure"
    assert body["code"] == 401
    assert body["reason"] == "Unauthorized"


@pytest.mark.slow
async def test_corpus_is_refused_with_its_reason_and_nothing_reaches_upstream(
    gate: Gate, corpus_issuer: FakeIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert gate.fake is not None
    unknown_kids = 0
    for case in corpus(corpus_issuer.url, KEY):
        caplog.clear()
        before = len(gate.fake.requests)
        try:
            status, text = await gate.get(
                headers={"Authorization": f"Bearer {case.token}"}
            )
        except aiohttp.ClientConnectionError:
            # The server may close while a 1 MB header is still being sent.
            status, text = 0, ""
        reached = gate.fake.requests[before:]
        if case.reason == "ok":
            assert status == 200, (case.name, text)
            assert [r.path for r in reached] == [PODS], case.name
            assert reached[0].headers["Impersonate-User"].startswith("oidc:")
            continue
        assert reached == [], case.name
        if len(case.token) > 20 * 1024:
            # Beyond the listener's field limit: 431 before any handler (or
            # the connection cut while the client was still sending).
            assert status in (0, 431), case.name
        else:
            assert status == 401, (case.name, text)
            assert_status_401(text)
            expected = (
                "token of no configured issuer"
                if case.reason == "not_mine"
                else case.reason
            )
            assert refusal_details(caplog) == [expected], case.name
        pieces = secrets_of(case.token)
        trace = logged(caplog)
        for piece in pieces:
            assert piece not in text, case.name
            assert piece not in trace, case.name
        unknown_kids += case.reason == "unknown_kid"
    assert unknown_kids >= 3
    assert corpus_issuer.counts["jwks"] <= 1, "unknown kids cost one fetch per cooldown"
    assert corpus_issuer.counts["discovery"] <= 1


def _basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"alice:{token}".encode()).decode()


Placement = Callable[[str], tuple[list[tuple[str, str]], dict[str, str]]]

#: (name, headers and query made from a valid token, accepted?)
PLACEMENTS: list[tuple[str, Placement, bool]] = [
    ("bearer-lower-case", lambda t: ([("Authorization", f"bearer {t}")], {}), True),
    ("bearer-upper-case", lambda t: ([("Authorization", f"BEARER {t}")], {}), True),
    ("two-spaces", lambda t: ([("Authorization", f"Bearer  {t}")], {}), False),
    ("tab-separator", lambda t: ([("Authorization", f"Bearer\t{t}")], {}), False),
    ("space-then-tab", lambda t: ([("Authorization", f"Bearer \t{t}")], {}), False),
    ("trailing-word", lambda t: ([("Authorization", f"Bearer {t} x")], {}), False),
    ("bearer-empty", lambda t: ([("Authorization", "Bearer ")], {}), False),
    ("bearer-alone", lambda t: ([("Authorization", "Bearer")], {}), False),
    ("no-scheme", lambda t: ([("Authorization", t)], {}), False),
    (
        "two-authorization-headers",
        lambda t: ([("Authorization", f"Bearer {t}")] * 2, {}),
        False,
    ),
    (
        "valid-then-garbage-header",
        lambda t: ([("Authorization", f"Bearer {t}"), ("Authorization", "x")], {}),
        False,
    ),
    ("query-parameter", lambda t: ([], {"access_token": t}), False),
    ("basic-auth-password", lambda t: ([("Authorization", _basic(t))], {}), False),
    (
        "proxy-authorization",
        lambda t: ([("Proxy-Authorization", f"Bearer {t}")], {}),
        False,
    ),
    ("x-auth-token", lambda t: ([("X-Auth-Token", t)], {}), False),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "accepted"),
    [p[1:] for p in PLACEMENTS],
    ids=[p[0] for p in PLACEMENTS],
)
async def test_token_placement(
    gate: Gate,
    make: Placement,
    accepted: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert gate.fake is not None
    token = gate.token()
    headers, query = make(token)
    async with gate.client.get(gate.url + PODS, headers=headers, params=query) as r:
        status, text = r.status, await r.text()
    if accepted:
        assert status == 200, text
        (seen,) = gate.fake.requests
        assert seen.headers["Impersonate-User"] == "oidc:00u1alice"
        assert seen.headers.getall("Authorization") == ["Bearer proxy-sa-token-1"]
    else:
        assert status == 401, text
        assert_status_401(text)
        assert gate.fake.requests == []
    trace = logged(caplog)
    for piece in secrets_of(token):
        assert piece not in trace
        assert piece not in text
        assert all(piece not in str(r.headers) for r in gate.fake.requests)
