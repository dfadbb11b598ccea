"""The stand-in is shaped like the article's Okta setup, and the login flow works.

These pin the provider's side of the contract the other e2e tests rely on: an
Okta custom authorization server's URLs, a native app that must use PKCE and
has no secret, the ``groups`` claim in the ID token, one-hour ID tokens.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from tests.e2e.harness import ADMINS, CLIENT_ID, VIEWERS, OktaProvider
from tests.e2e.login import REDIRECT_URI, LoginRefused, login, unverified_claims
from tests.e2e.support import probe

pytestmark = pytest.mark.e2e


async def test_discovery_has_the_okta_custom_authorization_server_shape(
    okta: OktaProvider, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{okta.issuer}/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        doc = await resp.json()
    base = okta.issuer
    assert base.endswith("/oauth2/default")
    assert doc["issuer"] == base
    assert doc["authorization_endpoint"] == f"{base}/v1/authorize"
    assert doc["token_endpoint"] == f"{base}/v1/token"
    assert doc["jwks_uri"] == f"{base}/v1/keys"
    assert "S256" in doc["code_challenge_methods_supported"]
    status, text = await probe(http, doc["jwks_uri"])
    assert status == 200
    assert '"d"' not in text, "the JWKS must publish public keys only"


@pytest.mark.parametrize(
    ("username", "groups"),
    [("alice", [ADMINS]), ("bob", [VIEWERS])],
    ids=["alice-admin", "bob-viewer"],
)
async def test_login_returns_an_hour_long_id_token_with_groups(
    okta: OktaProvider, username: str, groups: list[str]
) -> None:
    user = okta.users[username]
    tokens = await login(
        okta.issuer, client_id=CLIENT_ID, username=username, password=user.password
    )
    claims = unverified_claims(tokens.id_token)
    assert claims["iss"] == okta.issuer
    assert claims["aud"] == CLIENT_ID
    assert claims["sub"] == user.sub
    assert claims["groups"] == groups
    assert claims["exp"] - claims["iat"] == 3600
    assert "email" not in claims, "Okta's ID token has no email claim by default"


async def test_wrong_password_is_refused_at_the_login_form(okta: OktaProvider) -> None:
    with pytest.raises(LoginRefused, match="login form answered http 401"):
        await login(okta.issuer, client_id=CLIENT_ID, username="alice", password="no")


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({}, "invalid_request"),
        (
            {"code_challenge": "x" * 43, "code_challenge_method": "plain"},
            "invalid_request",
        ),
    ],
    ids=["no-pkce", "plain-pkce"],
)
async def test_the_native_app_must_use_pkce_s256(
    okta: OktaProvider, http: aiohttp.ClientSession, params: dict[str, str], error: str
) -> None:
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "state": "s",
        **params,
    }
    url = f"{okta.issuer}/v1/authorize?{urlencode(query)}"
    async with http.get(url, allow_redirects=False) as resp:
        location = resp.headers.get("Location", "")
    assert location.startswith(REDIRECT_URI), location
    assert parse_qs(urlsplit(location).query)["error"] == [error]
