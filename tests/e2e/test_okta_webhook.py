"""Part 2: the TokenReview webhook, run as the installed command, on real tokens.

kube-apiserver posts a ``TokenReview`` with the user's bearer token to
``--authentication-token-webhook-config-file``'s server; here the test is
kube-apiserver. The bodies are built and parsed with the ``kubernetes``
package's own models, over TLS trusting the CA the webhook wrote to
``--cert-dir``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.harness import (
    ADMINS,
    OTHER_CLIENT_ID,
    VIEWERS,
    GateProcess,
    OktaProvider,
    running_gate,
)
from tests.e2e.support import (
    Verdict,
    article_flags,
    id_token,
    metric,
    probe,
    review_at,
    wait_http_ok,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def webhook(
    okta: OktaProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    workdir: Path = tmp_path_factory.mktemp("webhook")
    with running_gate(["webhook", *article_flags(okta.issuer)], workdir) as gate:
        wait_http_ok(f"{gate.probe_url}/readyz")
        yield gate


@pytest.fixture
async def apiserver(webhook: GateProcess) -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP client kube-apiserver would be: trusts the webhook's own CA."""
    connector = aiohttp.TCPConnector(ssl=webhook.client_ssl())
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        yield s


@pytest.mark.parametrize(
    ("username", "groups"),
    [("alice", (ADMINS,)), ("bob", (VIEWERS,))],
    ids=["alice-naxslabs-admins", "bob-naxslabs-viewers"],
)
async def test_real_token_authenticates_user_with_okta_groups(
    okta: OktaProvider,
    webhook: GateProcess,
    apiserver: aiohttp.ClientSession,
    username: str,
    groups: tuple[str, ...],
) -> None:
    token = await id_token(okta, username)
    verdict = await review_at(apiserver, webhook.url, token)
    assert verdict == Verdict(
        authenticated=True,
        username=f"{okta.issuer}#{okta.users[username].sub}",
        groups=groups,
    )
    assert token not in webhook.log_text(), "the token must never be logged"


async def test_token_for_another_app_is_not_authenticated(
    okta: OktaProvider, webhook: GateProcess, apiserver: aiohttp.ClientSession
) -> None:
    token = await id_token(okta, "alice", client_id=OTHER_CLIENT_ID)
    verdict = await review_at(apiserver, webhook.url, token)
    assert verdict.authenticated is False
    assert verdict.username in (None, "")
    async with aiohttp.ClientSession() as plain:
        _, metrics = await probe(plain, f"{webhook.probe_url}/metrics")
    assert (
        metric(
            metrics,
            "kube_oidc_gate_authentications_total",
            result="rejected",
            reason="audience_mismatch",
        )
        >= 1
    )
