"""Part 6: a user disabled at the provider, with a token already in hand.

The article says disabling a user in Okta removes cluster access
"immediately". With locally validated JWTs it does not: the provider stops
issuing tokens at once (the login is refused), but a token issued before is a
signed statement that stays valid until its ``exp``, and kube-oidc-gate (like
kube-apiserver's own OIDC authenticator) accepts it until then (``exp`` has
no leeway; ``--clock-skew`` applies to ``nbf`` only). With Okta's one-hour ID
tokens that is up to an hour;
a later issue brings revocation. The user's test token here lives 4 seconds
so the whole window fits in the test, run against the installed webhook.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.harness import GateProcess, OktaProvider, running_gate
from tests.e2e.login import LoginRefused, unverified_claims
from tests.e2e.support import (
    article_flags,
    id_token,
    metric,
    probe,
    review_at,
    wait_http_ok,
)
from tests.keygen import new_key

pytestmark = pytest.mark.e2e

_TTL = 4
_SKEW = 1


@pytest.fixture
def okta_short(fresh_okta: OktaProvider) -> OktaProvider:
    fresh_okta.users["bob"] = replace(fresh_okta.users["bob"], id_token_ttl=_TTL)
    fresh_okta.start([new_key("RS256", kid="okta-key-disable")])
    return fresh_okta


@pytest.fixture
def webhook(okta_short: OktaProvider, tmp_path: Path) -> Iterator[GateProcess]:
    args = ["webhook", *article_flags(okta_short.issuer), f"--clock-skew={_SKEW}"]
    with running_gate(args, tmp_path / "webhook") as gate:
        wait_http_ok(f"{gate.probe_url}/readyz")
        yield gate


@pytest.fixture
async def apiserver(webhook: GateProcess) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=webhook.client_ssl())
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


async def authenticated(
    session: aiohttp.ClientSession, webhook: GateProcess, token: str
) -> bool:
    return (await review_at(session, webhook.url, token)).authenticated


async def test_disabled_user_keeps_access_until_the_token_expires(
    okta_short: OktaProvider, webhook: GateProcess, apiserver: aiohttp.ClientSession
) -> None:
    token = await id_token(okta_short, "bob")
    exp = unverified_claims(token)["exp"]
    assert exp - unverified_claims(token)["iat"] == _TTL
    assert await authenticated(apiserver, webhook, token)

    okta_short.set_user("bob", disabled=True)
    with pytest.raises(LoginRefused, match="login form answered http 401"):
        await id_token(okta_short, "bob")

    # The token issued before keeps working: nothing tells the webhook.
    seen: list[tuple[float, bool]] = []
    deadline = time.time() + _TTL + _SKEW + 10
    while time.time() < deadline:
        now = time.time()
        accepted = await authenticated(apiserver, webhook, token)
        seen.append((now, accepted))
        if not accepted:
            break
        await asyncio.sleep(0.25)
    assert seen[0][1] is True, "still accepted right after the user was disabled"
    assert seen[-1][1] is False, f"never refused: {seen}"
    refused_at = seen[-1][0]
    assert refused_at >= exp, "refused only once the token has expired"
    assert all(ok for t, ok in seen if t < exp), seen

    async with aiohttp.ClientSession() as plain:
        _, text = await probe(plain, f"{webhook.probe_url}/metrics")
    expired = metric(
        text,
        "kube_oidc_gate_authentications_total",
        result="rejected",
        reason="expired",
    )
    assert expired >= 1
    assert await id_token(okta_short, "alice"), "other users are not affected"
