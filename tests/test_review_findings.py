"""Regression tests for the defects found in the security review of the proxy and
the engine (each test failed before its fix).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import ssl
import urllib.parse
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from proxy.authn import Authenticator
from proxy.errors import MalformedToken, TokenError
from proxy.impersonate import ProxySettings, escape_extra_key
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver_harness import WHOAMI, Stack, client_ssl, run_proxy
from tests.fakes.apiserver_raw import serve_raw_upgrade
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import claims_for, new_key, sign
from tests.webhook_harness import issuer_auth_config, running_webhook

SAR = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64std(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------
# A remembered refusal must not keep the refused request alive


class _Marker:
    """Something the caller's frame holds, standing for its request and body."""


def _refused_tokens() -> dict[str, str]:
    key = new_key("RS256")
    header, payload, _ = sign(key, claims_for(ISSUER, sub="a")).split(".")
    return {
        "payload-not-json": f"{header}.{_b64(b'{not json' + b'x' * 4000)}.AAAA",
        "payload-not-utf8": f"{header}.{_b64(bytes([0xFF]) * 4000)}.AAAA",
        "bad-signature": f"{header}.{payload}.{_b64(b'x' * 256)}",
        "two-parts": "a.b",
    }


@pytest.mark.parametrize("replayed", [False, True], ids=["first", "replayed"])
@pytest.mark.parametrize("kind", list(_refused_tokens()), ids=list(_refused_tokens()))
async def test_cached_refusal_pins_no_caller_frame(kind: str, replayed: bool) -> None:
    token = _refused_tokens()[kind]
    key = new_key("RS256")
    authn = Authenticator(
        auth_config(authenticator_config()), {ISSUER: DictResolver(key)}
    )
    if replayed:
        with pytest.raises(TokenError):
            await authn.authenticate(token)

    async def caller() -> weakref.ref[_Marker]:
        pinned = _Marker()
        with pytest.raises(TokenError):
            await authn.authenticate(token)
        return weakref.ref(pinned)

    ref = await caller()
    gc.collect()
    assert ref() is None, "the cached refusal keeps the caller's frame alive"
    hit = authn.cache.get(authn.cache.key(token))
    assert hit is not None
    assert hit.error is not None
    assert hit.error.__traceback__ is None
    assert hit.error.__cause__ is None
    assert hit.error.__context__ is None


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


async def test_engine_refuses_lone_surrogates_with_a_typed_error() -> None:
    authn = Authenticator(
        auth_config(authenticator_config()), {ISSUER: DictResolver(new_key("RS256"))}
    )
    with pytest.raises(MalformedToken):
        await authn.authenticate("e30.e30.\udcff")


async def test_webhook_refuses_lone_surrogate_token_with_400(tmp_path: Path) -> None:
    config = issuer_auth_config("https://127.0.0.1:1/never", None)
    async with running_webhook(config, tmp_path) as webhook:
        body = (
            '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview",'
            '"spec":{"token":"e30.e30.\\ud800"}}'
        )
        status, text, _ = await webhook.post(body)
        assert status == 400, text
        assert json.loads(text)["kind"] == "Status"


# --------------------------------------------------------------------------
# Client impersonation: what is authorised is what the API server applies


@pytest.mark.parametrize(
    "key",
    ["Scopes", "example.com/Team", "ünï/X", "a b%c", "scopes"],
    ids=["capital", "capital-path", "utf8-capital", "space-percent", "lower"],
)
def test_escaped_extra_key_reads_back_as_kube_apiserver_decodes_it(key: str) -> None:
    # kube-apiserver: strings.ToLower(name), then url.PathUnescape.
    assert urllib.parse.unquote(escape_extra_key(key).lower()) == key


async def _whoami(stack: Stack, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with stack.client.post(
        stack.url + WHOAMI, headers={**stack.bearer(), **headers}, json={}
    ) as r:
        return r.status, await r.json(content_type=None)


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


async def test_x_remote_uid_is_not_forwarded(tmp_path: Path, ca: trustme.CA) -> None:
    async with run_proxy(tmp_path, ca) as stack:
        code, _ = await _whoami(stack, {"X-Remote-Uid": "0", "x-remote-uid": "1"})
        assert code == 201
        (seen,) = stack.fake.requests
        assert "X-Remote-Uid" not in seen.headers


# --------------------------------------------------------------------------
# Token passthrough must not ride the proxy's client certificate


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
