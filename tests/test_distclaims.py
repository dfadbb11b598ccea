"""Distributed claims: kube-apiserver's resolution, our egress policy, real TLS."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy import errors
from proxy.authn import Authenticator
from proxy.config import (
    AuthConfig,
    ClaimMappings,
    IssuerConfig,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
)
from proxy.distclaims import claim_sources, endpoint_problem
from proxy.keyset import ClaimSourceClient
from tests.helpers import DictResolver
from tests.keygen import SigningKey, claims_for, new_key, sign

KEY = new_key("RS256")
CLIENT = "my-client"


# --- pure: the shapes go-oidc checks on every token ------------------------------

SHAPE_BAD: list[tuple[str, dict[str, Any], str]] = [
    ("names-list", {"_claim_names": ["groups"]}, "object of strings"),
    ("names-number-value", {"_claim_names": {"groups": 1}}, "object of strings"),
    ("names-empty-source", {"_claim_names": {"groups": ""}}, "names no source"),
    (
        "names-missing-source",
        {"_claim_names": {"groups": "nope"}, "_claim_sources": {"src1": {}}},
        "source does not exist",
    ),
    ("names-without-sources", {"_claim_names": {"x": "src1"}}, "does not exist"),
    ("sources-list", {"_claim_sources": []}, "must be an object"),
    ("source-string", {"_claim_sources": {"s": "x"}}, "not an object"),
    ("endpoint-number", {"_claim_sources": {"s": {"endpoint": 1}}}, "strings"),
    ("token-number", {"_claim_sources": {"s": {"access_token": 1}}}, "strings"),
]


@pytest.mark.parametrize(
    ("claims", "message"), [c[1:] for c in SHAPE_BAD], ids=[c[0] for c in SHAPE_BAD]
)
def test_malformed_claim_sources_are_refused(
    claims: dict[str, Any], message: str
) -> None:
    with pytest.raises(errors.InvalidClaim, match=message):
        claim_sources(claims, "https://idp.test")


def test_well_formed_claim_sources() -> None:
    got = claim_sources(
        {
            "_claim_names": {"groups": "a", "roles": "b"},
            "_claim_sources": {
                "a": {"endpoint": "https://idp.test/g", "access_token": "s3cret"},
                "b": {"JWT": "x.y.z"},
            },
        },
        "https://idp.test",
    )
    assert got["groups"].endpoint == "https://idp.test/g"
    assert got["roles"].endpoint == ""
    assert "s3cret" not in repr(got["groups"])


EGRESS = [
    ("same-origin", "https://idp.test/groups", "https://idp.test/o", None),
    ("default-port", "https://idp.test:443/g", "https://idp.test", None),
    ("plain-http", "http://idp.test/g", "https://idp.test", "https"),
    ("other-host", "https://evil.test/g", "https://idp.test", "origin"),
    ("sub-host", "https://a.idp.test/g", "https://idp.test", "origin"),
    ("other-port", "https://idp.test:8443/g", "https://idp.test", "origin"),
    ("user-info", "https://u:p@idp.test/g", "https://idp.test", "user info"),
    ("relative", "/groups", "https://idp.test", "https"),
    ("bad-port", "https://idp.test:99999/g", "https://idp.test", "valid URL"),
]


@pytest.mark.parametrize(
    ("endpoint", "issuer", "problem"),
    [c[1:] for c in EGRESS],
    ids=[c[0] for c in EGRESS],
)
def test_egress_policy(endpoint: str, issuer: str, problem: str | None) -> None:
    got = endpoint_problem(endpoint, issuer)
    if problem is None:
        assert got is None
    else:
        assert got is not None
        assert problem in got


# --- a real HTTPS claim source (trustme) -----------------------------------------


@dataclass
class Source:
    url: str
    ca_pem: str
    answers: dict[str, str] = field(default_factory=dict)
    seen: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def source(ca: trustme.CA) -> AsyncIterator[Source]:
    state = Source(url="", ca_pem=ca.cert_pem.bytes().decode())

    async def answer(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state.seen.append((name, request.headers.get("Authorization")))
        if name == "broken":
            return web.Response(status=500)
        if name == "slow":
            await asyncio.sleep(2)
        if name == "big":
            return web.Response(body=b"a" * 70_000)
        if name == "redirect":
            raise web.HTTPFound("https://127.0.0.1:1/elsewhere")
        return web.Response(text=state.answers.get(name, "") + "\n")

    app = web.Application()
    app.router.add_get("/{name}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"https://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _config(
    src: Source, *, prefix: str = "", audiences: tuple[str, ...] = (CLIENT,)
) -> AuthConfig:
    return AuthConfig(
        authenticators=(
            JWTAuthenticatorConfig(
                issuer=IssuerConfig(
                    url=src.url, audiences=audiences, certificate_authority=src.ca_pem
                ),
                claim_mappings=ClaimMappings(
                    username=PrefixedClaimOrExpression(claim="username", prefix=""),
                    groups=PrefixedClaimOrExpression(claim="groups", prefix=prefix),
                ),
            ),
        ),
        max_token_bytes=16 * 1024,
    )


def _token(src: Source, key: SigningKey = KEY, **extra: Any) -> str:
    claims = claims_for(src.url, CLIENT, username="jane", **extra)
    return sign(key, claims)


def _distributed(
    endpoint: str, access_token: str | None = "groups_token"
) -> dict[str, Any]:
    entry = {"endpoint": endpoint}
    if access_token is not None:
        entry["access_token"] = access_token
    return {
        "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": entry},
    }


def _answer(src: Source, key: SigningKey = KEY, **claims: Any) -> str:
    body = claims_for(src.url, CLIENT)
    body.pop("sub")
    body.update(claims)
    return sign(key, {k: v for k, v in body.items() if v is not None})


async def _run(
    src: Source, token: str, *, config: AuthConfig | None = None, fetch: bool = True
) -> Any:
    async with aiohttp.ClientSession() as session:
        auth = Authenticator(
            config or _config(src),
            {src.url: DictResolver(KEY)},
            claim_sources=ClaimSourceClient(session, timeout=0.5) if fetch else None,
        )
        return await auth.explain(token)


async def test_groups_are_resolved_with_the_source_access_token(
    source: Source,
) -> None:
    source.answers["groups"] = _answer(source, groups=["team1", "team2"])
    verdict = await _run(
        source,
        _token(source, **_distributed(source.url + "/groups")),
        config=_config(source, prefix="groups:"),
    )
    assert verdict.error is None, verdict.error
    assert verdict.user.groups == ("groups:team1", "groups:team2")
    assert source.seen == [("groups", "Bearer groups_token")]


async def test_no_access_token_sends_no_authorization(source: Source) -> None:
    source.answers["groups"] = _answer(source, groups="team1")
    verdict = await _run(
        source, _token(source, **_distributed(source.url + "/groups", None))
    )
    assert verdict.user.groups == ("team1",)
    assert source.seen == [("groups", None)]


async def test_a_normal_claim_wins_and_nothing_is_fetched(source: Source) -> None:
    token = _token(source, groups="team1", **_distributed(source.url + "/groups"))
    verdict = await _run(source, token)
    assert verdict.user.groups == ("team1",)
    assert source.seen == []


async def test_an_aggregated_source_is_ignored(source: Source) -> None:
    token = _token(
        source,
        _claim_names={"groups": "src1"},
        _claim_sources={"src1": {"JWT": "some.jwt.token"}},
    )
    verdict = await _run(source, token)
    assert verdict.error is None
    assert verdict.user.groups == ()


async def test_resolved_values_are_cached(source: Source) -> None:
    source.answers["groups"] = _answer(source, groups=["team1"])
    async with aiohttp.ClientSession() as session:
        auth = Authenticator(
            _config(source),
            {source.url: DictResolver(KEY)},
            claim_sources=ClaimSourceClient(session),
        )
        for n in range(3):
            token = _token(source, jti=str(n), **_distributed(source.url + "/groups"))
            user = (await auth.explain(token)).user
            assert user is not None
            assert user.groups == ("team1",)
    assert len(source.seen) == 1


REFUSED: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("answer-lacks-claim", "groups", {}, "claim_source", "does not contain"),
    (
        "answer-wrong-audience",
        "groups",
        {"aud": "your-client", "groups": ["x"]},
        "claim_source",
        "audience mismatch",
    ),
    (
        "answer-expired",
        "groups",
        {"exp": int(time.time()) - 60, "groups": ["x"]},
        "claim_source",
        "expired",
    ),
    (
        "answer-other-issuer",
        "groups",
        {"iss": "https://other.test", "groups": ["x"]},
        "claim_source",
        "not a JWT of issuer",
    ),
    ("answer-not-a-jwt", "text", {}, "claim_source", "does not verify"),
    ("http-500", "broken", {}, "claim_source_unavailable", "http 500"),
    ("too-slow", "slow", {}, "claim_source_unavailable", "no answer within"),
    ("too-big", "big", {}, "claim_source_unavailable", "over the limit of 16384 bytes"),
    ("redirect-not-followed", "redirect", {}, "claim_source_unavailable", "http 302"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "answer", "reason", "message"),
    [c[1:] for c in REFUSED],
    ids=[c[0] for c in REFUSED],
)
async def test_refusals(
    source: Source, path: str, answer: dict[str, Any], reason: str, message: str
) -> None:
    source.answers["groups"] = _answer(source, **answer)
    source.answers["text"] = '{"groups": ["x"]}'
    verdict = await _run(source, _token(source, **_distributed(f"{source.url}/{path}")))
    assert verdict.user is None
    assert verdict.error.reason == reason, verdict.error
    assert message in str(verdict.error)
    assert verdict.error.temporary == (reason == "claim_source_unavailable")


EGRESS_REFUSED = [
    ("plain-http", lambda url: url.replace("https://", "http://") + "/groups"),
    ("other-port", lambda url: url.rsplit(":", 1)[0] + ":1/groups"),
    ("other-host", lambda url: "https://localhost:" + url.rsplit(":", 1)[1] + "/g"),
]


@pytest.mark.parametrize(
    "endpoint", [c[1] for c in EGRESS_REFUSED], ids=[c[0] for c in EGRESS_REFUSED]
)
async def test_endpoints_outside_the_policy_are_never_called(
    source: Source, endpoint: Any
) -> None:
    verdict = await _run(source, _token(source, **_distributed(endpoint(source.url))))
    assert verdict.error.reason == "claim_source"
    assert "egress policy" in str(verdict.error)
    assert source.seen == []


async def test_malformed_names_are_refused_even_without_a_groups_mapping(
    source: Source,
) -> None:
    token = _token(
        source,
        _claim_names={"groups": "nonexistent-claim-source"},
        _claim_sources={"src1": {"endpoint": source.url + "/groups"}},
    )
    verdict = await _run(source, token)
    assert verdict.error.reason == "claim_invalid"
    assert "source does not exist" in str(verdict.error)


async def test_offline_refuses_instead_of_dropping_groups(source: Source) -> None:
    verdict = await _run(
        source, _token(source, **_distributed(source.url + "/groups")), fetch=False
    )
    assert verdict.error.reason == "claim_source"
    assert source.seen == []
