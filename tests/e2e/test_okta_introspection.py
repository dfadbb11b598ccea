"""Part 7: token introspection (RFC 7662) against the real provider.

The gate asks the provider's ``introspection_endpoint`` (from discovery) with
``client_secret_basic`` and ``token_type_hint=id_token``. oidc-provider does
the client authentication and the endpoint itself, but introspects only the
tokens it stores and refuses any JWT (400 ``unsupported_token_type``), so
with introspection on, every ID token of a plain oidc-provider is refused as
``introspection_unavailable`` (first test; the message says why). Okta's endpoint takes
ID tokens; the stand-in's ``id_token_introspection`` answers that one
question the way we expect Okta to for a deactivated user (see provider.mjs;
not checked against a real Okta org), and the second test disables a user "in Okta" with a token in
hand and measures how soon the webhook refuses it (compare part 6, where the
token stays valid until its ``exp``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.harness import GateProcess, OktaProvider, running_gate
from tests.e2e.support import (
    article_flags,
    id_token,
    metric,
    probe,
    review_at,
    wait_http_ok,
)
from tests.e2e.test_okta_check_token import check_token
from tests.keygen import new_key

pytestmark = pytest.mark.e2e

INTROSPECTOR = "0oa3gate0introspector"
SECRET = "introspector-secret-e2e"
_TTL = 2.0


def _provider(okta: OktaProvider, *, okta_like: bool) -> OktaProvider:
    okta.extra_clients = [
        {
            "client_id": INTROSPECTOR,
            "client_secret": SECRET,
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": [],
            "response_types": [],
            "redirect_uris": [],
        }
    ]
    okta.id_token_introspection = okta_like
    okta.start([new_key("RS256", kid="okta-key-introspection")])
    return okta


def _flags(okta: OktaProvider, tmp_path: Path, secret: str = SECRET) -> list[str]:
    secret_file = tmp_path / "introspection-secret"
    secret_file.write_text(secret + "\n")
    return [
        *article_flags(okta.issuer),
        f"--oidc-introspection-client-id={INTROSPECTOR}",
        f"--oidc-introspection-client-secret-file={secret_file}",
        f"--introspection-cache-ttl={_TTL:g}",
    ]


@pytest.fixture
def okta_like(fresh_okta: OktaProvider) -> OktaProvider:
    return _provider(fresh_okta, okta_like=True)


@pytest.fixture
def webhook(okta_like: OktaProvider, tmp_path: Path) -> Iterator[GateProcess]:
    args = ["webhook", *_flags(okta_like, tmp_path)]
    with running_gate(args, tmp_path / "webhook") as gate:
        wait_http_ok(f"{gate.probe_url}/readyz")
        yield gate


async def test_plain_oidc_provider_does_not_introspect_id_tokens(
    fresh_okta: OktaProvider, tmp_path: Path
) -> None:
    okta = _provider(fresh_okta, okta_like=False)
    token = await id_token(okta, "alice")
    code, out = await check_token(tmp_path, token, article_flags(okta.issuer))
    assert code == 0, out
    code, out = await check_token(tmp_path, token, _flags(okta, tmp_path))
    assert code == 1, out
    assert "result: rejected (introspection_unavailable)" in out
    assert "unsupported_token_type" in out
    # The client authentication is oidc-provider's: a wrong secret is refused.
    code, out = await check_token(tmp_path, token, _flags(okta, tmp_path, "wrong"))
    assert code == 1, out
    assert "result: rejected (introspection_unavailable)" in out
    assert "http 401" in out
    assert SECRET not in out


async def test_disabled_user_is_refused_within_the_introspection_ttl(
    okta_like: OktaProvider, webhook: GateProcess, tmp_path: Path
) -> None:
    token = await id_token(okta_like, "bob")
    code, out = await check_token(tmp_path, token, _flags(okta_like, tmp_path))
    assert code == 0, out
    assert "introspection: active" in out

    connector = aiohttp.TCPConnector(ssl=webhook.client_ssl())
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as apiserver:
        assert (await review_at(apiserver, webhook.url, token)).authenticated
        okta_like.set_user("bob", disabled=True)
        disabled_at = time.monotonic()
        refused_after: float | None = None
        while time.monotonic() - disabled_at < _TTL + 10:
            if not (await review_at(apiserver, webhook.url, token)).authenticated:
                refused_after = time.monotonic() - disabled_at
                break
            await asyncio.sleep(0.1)
    assert refused_after is not None, "never refused"
    # Within the TTL (plus one poll and one introspection round trip).
    assert refused_after <= _TTL + 0.5, refused_after
    print(
        f"revocation delay: {refused_after:.2f}s (--introspection-cache-ttl={_TTL:g})"
    )

    async with aiohttp.ClientSession() as plain:
        _, text = await probe(plain, f"{webhook.probe_url}/metrics")
    assert (
        metric(
            text,
            "kube_oidc_gate_authentications_total",
            result="rejected",
            reason="revoked",
        )
        >= 1
    )
    assert (
        metric(text, "kube_oidc_gate_introspection_requests_total", result="inactive")
        >= 1
    )
    assert await id_token(okta_like, "alice"), "other users are not affected"
