"""Part 4: the provider rotates its signing key the way Okta does.

Okta publishes a new key before signing with it and withdraws the old one
later. Here the provider is restarted twice on the same issuer URL:

1. ``[new, old]``: the new key signs, the old one is still published. The
   first token with the new ``kid`` is accepted on its first request: a webhook
   whose cached key set is still fresh refetches it because the ``kid`` is
   unknown. Tokens signed with the old key keep working.
2. ``[new]``: the old key is withdrawn. Once a webhook's key set refreshes,
   tokens signed with the old key are refused (``unknown_kid``).

Two webhooks watch the same rotation, both in-process with the article's flags
(the CLI's one-minute refresh floor is too slow for a test): ``by_refetch``
caches the key set for an hour, so only the unknown-``kid`` refetch can explain
its accepting the new key; ``by_refresh`` refreshes every second, which is the
refresh that drops the withdrawn key. A refetch does not reschedule the
background refresh, so a webhook like ``by_refetch`` notices the withdrawal
only when its hour is up. The result cache is off so each answer comes from
the key set; with it on, a token already accepted stays accepted up to
``--token-cache-success-ttl`` after its key is withdrawn.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.config import AuthConfig, CacheSettings
from tests.e2e.harness import OktaProvider
from tests.e2e.login import unverified_claims, unverified_header
from tests.e2e.support import (
    article_config,
    id_token,
    metric,
    probe,
    review,
    wait_until,
)
from tests.keygen import new_key
from tests.support.running_webhook import running_webhook, wait_ready

pytestmark = pytest.mark.e2e

#: What the provider says in ``Cache-Control``; each webhook clamps it to its
#: own bounds (``min_refresh_interval`` = ``max_refresh_interval``).
_OKTA_MAX_AGE = 300


def _kid(token: str) -> str:
    kid: str = unverified_header(token)["kid"]
    return kid


def _config(issuer: str, *, refresh: float) -> AuthConfig:
    return article_config(
        issuer,
        keyset={
            "unknown_kid_cooldown": 0.2,
            "min_refresh_interval": refresh,
            "max_refresh_interval": refresh,
            "retry_min": 0.05,
            "retry_max": 0.2,
            "fetch_timeout": 2.0,
        },
        cache=CacheSettings(success_ttl=0, failure_ttl=0),
    )


async def test_rotation_new_key_by_refetch_then_old_key_withdrawn(
    fresh_okta: OktaProvider, tmp_path: Path
) -> None:
    old = new_key("RS256", kid="okta-key-old")
    new = new_key("RS256", kid="okta-key-new")
    await asyncio.to_thread(fresh_okta.start, [old], jwks_max_age=_OKTA_MAX_AGE)
    issuer = fresh_okta.issuer
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    async with (
        running_webhook(_config(issuer, refresh=3600), tmp_path / "a") as by_refetch,
        running_webhook(_config(issuer, refresh=1), tmp_path / "b") as by_refresh,
    ):
        webhooks = (by_refetch, by_refresh)
        for webhook in webhooks:
            await wait_ready(webhook.engine)
        hour_cache = by_refetch.engine.keysets.get(issuer)
        old_token = await id_token(fresh_okta, "alice")
        assert _kid(old_token) == old.kid
        for webhook in webhooks:
            assert (await review(webhook, old_token)).authenticated is True

        # 1. New key first, old key still published.
        await asyncio.to_thread(
            fresh_okta.restart, [new, old], jwks_max_age=_OKTA_MAX_AGE
        )
        fetches = hour_cache.fetch_count
        new_token = await id_token(fresh_okta, "alice")
        assert _kid(new_token) == new.kid
        for webhook in webhooks:
            first = await review(webhook, new_token)
            assert first.authenticated is True, first.error
            assert (await review(webhook, old_token)).authenticated is True
            _, text = await probe(webhook.session, f"{webhook.probe_url}/metrics")
            for result in ("rejected", "error"):
                name = "kube_oidc_gate_authentications_total"
                assert metric(text, name, result=result) == 0, result
        assert hour_cache.fetch_count == fetches + 1, "one unknown-kid refetch"
        assert {k.kid for k in hour_cache.keys} == {new.kid, old.kid}

        # 2. Old key withdrawn: refused once the key set has refreshed.
        await asyncio.to_thread(fresh_okta.restart, [new], jwks_max_age=_OKTA_MAX_AGE)

        async def old_refused() -> str:
            answer = await review(by_refresh, old_token)
            return "" if answer.authenticated else str(answer.error)

        error = await wait_until(
            old_refused, timeout=15, what="old key's token refused"
        )
        assert error.startswith("unknown_kid:"), error
        refreshed = by_refresh.engine.keysets.get(issuer)
        assert [k.kid for k in refreshed.keys] == [new.kid]
        assert (await review(by_refresh, new_token)).authenticated is True
        newest = await id_token(fresh_okta, "bob")
        assert unverified_claims(newest)["groups"] == ["naxslabs-viewers"]
        assert (await review(by_refresh, newest)).authenticated is True
