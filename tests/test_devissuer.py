"""The ``--dev`` issuer: real HTTP on loopback, tokens verified with PyJWT."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shlex
import shutil
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp import web

from proxy.authn import Authenticator
from proxy.devissuer import (
    DEFAULT_LIFETIME,
    DEMO_GROUP,
    DEMO_USER,
    DEV_CLIENT_ID,
    DEV_WARNING,
    MAX_LIFETIME,
    MIN_LIFETIME,
    DevIssuer,
    demo_instructions,
    dev_auth_config,
)
from proxy.errors import ConfigError
from proxy.keyset import KeySets

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def dev() -> AsyncIterator[DevIssuer]:
    issuer = DevIssuer()
    await issuer.start()
    try:
        yield issuer
    finally:
        await issuer.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


async def get_json(
    session: aiohttp.ClientSession, url: str
) -> tuple[dict[str, Any], str]:
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        return await resp.json(), resp.headers.get("Cache-Control", "")


async def verify(
    session: aiohttp.ClientSession, dev: DevIssuer, token: str
) -> dict[str, Any]:
    """Verify ``token`` the way a relying party would: keys from the served JWKS."""
    discovery, _ = await get_json(
        session, dev.url + "/.well-known/openid-configuration"
    )
    jwks, _ = await get_json(session, discovery["jwks_uri"])
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=DEV_CLIENT_ID,
        issuer=discovery["issuer"],
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
    return claims


# -- served documents --------------------------------------------------------------


async def test_discovery_names_itself_and_its_endpoints(
    dev: DevIssuer, session: aiohttp.ClientSession
) -> None:
    assert dev.url.startswith("http://127.0.0.1:")
    doc, _ = await get_json(session, dev.url + "/.well-known/openid-configuration")
    assert doc["issuer"] == dev.url
    assert doc["jwks_uri"] == dev.url + "/keys"
    assert doc["token_endpoint"] == dev.url + "/token"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]


async def test_jwks_is_one_rsa_2048_signing_key_cached_five_minutes(
    dev: DevIssuer, session: aiohttp.ClientSession
) -> None:
    body, cache_control = await get_json(session, dev.jwks_uri)
    assert "max-age=300" in cache_control
    [key] = body["keys"]
    assert key["kty"] == "RSA"
    assert key["alg"] == "RS256"
    assert key["use"] == "sig"
    assert key["kid"]
    modulus = base64.urlsafe_b64decode(key["n"] + "=" * (-len(key["n"]) % 4))
    assert len(modulus) * 8 == 2048
    assert "d" not in key  # the public half only


async def test_every_start_makes_a_new_key(session: aiohttp.ClientSession) -> None:
    kids = []
    for _ in range(2):
        async with DevIssuer() as issuer:
            body, _ = await get_json(session, issuer.jwks_uri)
            kids.append(body["keys"][0]["kid"])
    assert kids[0] != kids[1]


# -- minting -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("send", "want_groups", "want_email", "want_lifetime"),
    [
        (
            {"data": [("sub", "bob"), ("groups", "a"), ("groups", "b")]},
            ["a", "b"],
            None,
            DEFAULT_LIFETIME,
        ),
        (
            {"data": {"sub": "bob", "groups": "a, b", "lifetime": "600"}},
            ["a", "b"],
            None,
            600,
        ),
        (
            {"data": {"sub": "bob", "email": "bob@example.com"}},
            [],
            "bob@example.com",
            DEFAULT_LIFETIME,
        ),
        (
            {"json": {"sub": "bob", "groups": ["a", "b"], "lifetime": 120}},
            ["a", "b"],
            None,
            120,
        ),
        ({"json": {"sub": "bob", "groups": "a"}}, ["a"], None, DEFAULT_LIFETIME),
        (
            {"json": {"sub": "bob", "email": "b@example.com", "lifetime": 60.0}},
            [],
            "b@example.com",
            60,
        ),
    ],
    ids=[
        "form-repeated-groups",
        "form-comma-groups-lifetime",
        "form-email",
        "json-list",
        "json-one-group",
        "json-email-float-lifetime",
    ],
)
async def test_token_endpoint_mints_a_verifiable_id_token(
    dev: DevIssuer,
    session: aiohttp.ClientSession,
    send: dict[str, Any],
    want_groups: list[str],
    want_email: str | None,
    want_lifetime: int,
) -> None:
    async with session.post(dev.token_endpoint, **send) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == want_lifetime
    claims = await verify(session, dev, body["id_token"])
    assert claims["iss"] == dev.url
    assert claims["aud"] == DEV_CLIENT_ID
    assert claims["sub"] == "bob"
    assert claims["groups"] == want_groups
    assert claims["exp"] - claims["iat"] == want_lifetime
    assert claims.get("email") == want_email
    assert claims.get("email_verified") is (True if want_email else None)
    assert jwt.get_unverified_header(body["id_token"])["alg"] == "RS256"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("send", "field"),
    [
        ({"data": {"groups": "a"}}, '"sub"'),
        ({"json": {"groups": ["a"]}}, '"sub"'),
        ({"json": {"sub": ""}}, '"sub"'),
        ({"json": {"sub": "x" * 257}}, '"sub"'),
        ({"data": {"sub": "bob", "lifetime": "0"}}, '"lifetime"'),
        ({"data": {"sub": "bob", "lifetime": str(MAX_LIFETIME + 1)}}, '"lifetime"'),
        ({"data": {"sub": "bob", "lifetime": "-5"}}, '"lifetime"'),
        ({"data": {"sub": "bob", "lifetime": "soon"}}, '"lifetime"'),
        ({"json": {"sub": "bob", "lifetime": 1.5}}, '"lifetime"'),
        ({"json": {"sub": "bob", "lifetime": True}}, '"lifetime"'),
        ({"json": {"sub": "bob", "groups": [1]}}, '"groups"'),
        ({"json": {"sub": "bob", "groups": [""]}}, '"groups"'),
        ({"json": {"sub": "bob", "groups": ["g"] * 101}}, "groups"),
        ({"json": {"sub": "bob", "email": 7}}, '"email"'),
        ({"json": ["sub", "bob"]}, "JSON object"),
        (
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            "not valid JSON",
        ),
    ],
    ids=[
        "form-no-sub",
        "json-no-sub",
        "empty-sub",
        "long-sub",
        "lifetime-zero",
        "lifetime-over-max",
        "lifetime-negative",
        "lifetime-word",
        "lifetime-fraction",
        "lifetime-bool",
        "group-not-string",
        "group-empty",
        "too-many-groups",
        "email-not-string",
        "json-array",
        "json-garbage",
    ],
)
async def test_token_endpoint_refuses_bad_requests(
    dev: DevIssuer, session: aiohttp.ClientSession, send: dict[str, Any], field: str
) -> None:
    async with session.post(dev.token_endpoint, **send) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] == "invalid_request"
    assert field in body["error_description"]
    assert "id_token" not in body


async def test_token_endpoint_is_post_only(
    dev: DevIssuer, session: aiohttp.ClientSession
) -> None:
    async with session.get(dev.token_endpoint, params={"sub": "bob"}) as resp:
        assert resp.status == 405


@pytest.mark.slow
async def test_mint_and_demo_token_verify_against_the_served_keys(
    dev: DevIssuer, session: aiohttp.ClientSession
) -> None:
    claims = await verify(session, dev, dev.mint(sub="carol", groups=("x", "y")))
    assert (claims["sub"], claims["groups"]) == ("carol", ["x", "y"])
    assert claims["exp"] - claims["iat"] == DEFAULT_LIFETIME
    assert "email" not in claims
    demo = await verify(session, dev, dev.demo_token())
    assert (demo["sub"], demo["groups"]) == (DEMO_USER, [DEMO_GROUP])


async def test_mint_uses_the_injected_clock(session: aiohttp.ClientSession) -> None:
    async with DevIssuer(clock=lambda: 1_000_000.0) as issuer:
        token = issuer.mint(sub="bob", lifetime=60)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (
        1_000_000,
        1_000_000,
        1_000_060,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lifetime", "ok"),
    [
        (MIN_LIFETIME, True),
        (MAX_LIFETIME, True),
        (MIN_LIFETIME - 1, False),
        (MAX_LIFETIME + 1, False),
        (-3600, False),
        (True, False),
        (60.0, False),
    ],
    ids=["min", "max", "below-min", "above-max", "negative", "bool", "float"],
)
async def test_mint_lifetime_bounds(dev: DevIssuer, lifetime: Any, ok: bool) -> None:
    if ok:
        claims = jwt.decode(
            dev.mint(sub="bob", lifetime=lifetime),
            options={"verify_signature": False},
        )
        assert claims["exp"] - claims["iat"] == lifetime
    else:
        with pytest.raises(ValueError, match="lifetime"):
            dev.mint(sub="bob", lifetime=lifetime)


async def test_not_started_and_closed_issuers_mint_nothing(
    session: aiohttp.ClientSession,
) -> None:
    issuer = DevIssuer()
    with pytest.raises(RuntimeError, match="not started"):
        issuer.mint(sub="bob")
    with pytest.raises(RuntimeError, match="not started"):
        _ = issuer.url
    await issuer.start()
    url = issuer.token_endpoint
    await issuer.close()
    await issuer.close()  # idempotent
    with pytest.raises(RuntimeError, match="not started"):
        issuer.mint(sub="bob")
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(url, data={"sub": "bob"}):
            pass


# -- impossible to enable by accident ---------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "10.0.0.1", "192.168.1.10", "::", "2001:db8::1", "localhost", ""],
    ids=["any-v4", "private", "lan", "any-v6", "global-v6", "name", "empty"],
)
def test_refuses_every_non_loopback_host(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback") as info:
        DevIssuer(host=host)
    assert json.dumps(host) in str(info.value)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1"], ids=["v4", "v4-range", "v6"]
)
def test_accepts_loopback_hosts(host: str) -> None:
    DevIssuer(host=host)  # constructing only: nothing is bound


@pytest.mark.parametrize("port", [-1, 65536, True], ids=["negative", "big", "bool"])
def test_refuses_bad_ports(port: Any) -> None:
    with pytest.raises(ConfigError, match="port"):
        DevIssuer(port=port)


@pytest.mark.slow
async def test_start_warns_loudly_and_minting_never_logs_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.devissuer")
    async with DevIssuer() as issuer:
        token = issuer.mint(sub="bob", groups=("g",))
        url = issuer.url
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [DEV_WARNING]
    assert warnings[0].__dict__["issuer"] == url
    assert warnings[0].__dict__["client_id"] == DEV_CLIENT_ID
    minted = [r for r in caplog.records if r.getMessage() == "dev token minted"]
    assert len(minted) == 1
    assert minted[0].__dict__["sub"] == "bob"
    for record in caplog.records:
        assert token not in repr(vars(record))
        for part in token.split("."):
            assert part not in repr(vars(record))


# -- the configuration --dev runs with ----------------------------------------------


def test_dev_auth_config_shape() -> None:
    config = dev_auth_config("http://127.0.0.1:5556", "cid")
    [auth] = config.authenticators
    assert auth.issuer.url == "http://127.0.0.1:5556"
    assert auth.issuer.audiences == ("cid",)
    assert auth.issuer.signing_algs == ("RS256",)
    username = auth.claim_mappings.username
    assert (username.claim, username.prefix) == ("sub", "dev:")
    groups = auth.claim_mappings.groups
    assert groups is not None
    assert (groups.claim, groups.prefix) == ("groups", "")
    assert auth.claim_validation_rules == ()


@pytest.mark.parametrize(
    ("mint", "want_user", "want_groups"),
    [
        ({"sub": DEMO_USER, "groups": (DEMO_GROUP,)}, "dev:alice", (DEMO_GROUP,)),
        ({"sub": "bob", "groups": ()}, "dev:bob", ()),
        (
            {"sub": "carol", "groups": ("a", "b"), "email": "c@example.com"},
            "dev:carol",
            ("a", "b"),
        ),
    ],
    ids=["demo", "no-groups", "email"],
)
async def test_engine_accepts_dev_tokens_with_the_dev_config(
    dev: DevIssuer,
    session: aiohttp.ClientSession,
    mint: dict[str, Any],
    want_user: str,
    want_groups: tuple[str, ...],
) -> None:
    config = dev_auth_config(dev.url, dev.client_id)
    key_sets = KeySets(
        [a.issuer for a in config.authenticators], config.keyset, session=session
    )
    try:
        await key_sets.get(dev.url).refresh(force=True)
        authn = Authenticator(config, {dev.url: key_sets.get(dev.url)})
        user = await authn.authenticate(dev.mint(**mint))
    finally:
        await key_sets.close()
    assert user is not None
    assert user.username == want_user
    assert [g for g in user.groups if not g.startswith("system:")] == list(want_groups)


# -- the printed example -------------------------------------------------------------


def command_lines(text: str) -> list[list[str]]:
    return [
        shlex.split(line)
        for line in text.splitlines()
        if line.strip().startswith("curl ")
    ]


@pytest.mark.parametrize(
    "webhook_url",
    [
        "https://127.0.0.1:8443",
        "https://127.0.0.1:8443/",
        "https://127.0.0.1:8443/authenticate",
    ],
    ids=["base", "trailing-slash", "full"],
)
def test_demo_instructions_commands(webhook_url: str) -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
    text = demo_instructions(
        token=token,
        webhook_url=webhook_url,
        ca_file="/tmp/my certs/ca.crt",
        issuer_url="http://127.0.0.1:5556",
    )
    assert f"\n  {token}\n" in text
    assert "never use --dev in production" in text
    assert "dev:alice" in text
    assert DEMO_GROUP in text
    review, mint = command_lines(text)
    assert review[:4] == ["curl", "-s", "--cacert", "/tmp/my certs/ca.crt"]
    assert review[review.index("-X") + 1] == "POST"
    assert "https://127.0.0.1:8443/authenticate" in review
    assert review[review.index("-H") + 1] == "Content-Type: application/json"
    body = json.loads(review[review.index("-d") + 1])
    assert body == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }
    assert "http://127.0.0.1:5556/token" in mint


async def run(argv: list[str]) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
async def test_printed_commands_run_as_printed(
    dev: DevIssuer,
    session: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    """Both printed curl commands work: quoting, --cacert, the JSON body."""
    ca = trustme.CA()
    ca_file = tmp_path / "my ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    received: list[tuple[str, str, Any]] = []

    async def authenticate(request: web.Request) -> web.Response:
        received.append((request.path, request.content_type, await request.json()))
        return web.json_response({"status": {"authenticated": True}})

    app = web.Application()
    app.router.add_post("/authenticate", authenticate)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    try:
        await site.start()
        port = runner.addresses[0][1]
        token = dev.demo_token()
        text = demo_instructions(
            token=token,
            webhook_url=f"https://127.0.0.1:{port}",
            ca_file=str(ca_file),
            issuer_url=dev.url,
        )
        review, mint = command_lines(text)
        code, out = await run(review)
        assert code == 0
        assert json.loads(out) == {"status": {"authenticated": True}}
        assert received == [
            (
                "/authenticate",
                "application/json",
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token},
                },
            )
        ]
        code, out = await run(mint)
        assert code == 0
        minted = json.loads(out)
        claims = await verify(session, dev, minted["id_token"])
        assert (claims["sub"], claims["groups"]) == ("bob", ["team-a", "team-b"])
        assert minted["expires_in"] == 600
    finally:
        await runner.cleanup()
