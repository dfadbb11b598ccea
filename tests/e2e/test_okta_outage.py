"""Part 5: the provider goes down, and comes back.

Availability over freshness: a webhook that has loaded the keys keeps
validating already-issued tokens from them while every refresh fails (the
result cache is off, so this is the key set at work, not remembered answers).
Its ``/readyz`` stays ready, since the keys it serves are still the IdP's
latest, while ``kube_oidc_gate_jwks_fetches_total{result="error"}`` counts
the failed fetches. A webhook that starts during the outage has no keys: its
``/readyz`` answers 503 naming the issuer, and TokenReviews get 503 with
``Retry-After``. When the provider is back, the refresh succeeds (the last
success timestamp moves past the outage) and both webhooks are ready.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from proxy.config import AuthConfig, CacheSettings
from tests.e2e.harness import ADMINS, OktaProvider
from tests.e2e.support import (
    article_config,
    id_token,
    metric,
    probe,
    review,
    wait_until,
)
from tests.keygen import new_key
from tests.support.running_webhook import (
    RunningWebhook,
    review_body,
    running_webhook,
    wait_ready,
)

pytestmark = pytest.mark.e2e

_FETCHES = "kube_oidc_gate_jwks_fetches_total"
_LAST_SUCCESS = "kube_oidc_gate_jwks_last_success_timestamp_seconds"


def _config(issuer: str) -> AuthConfig:
    return article_config(
        issuer,
        keyset={
            "min_refresh_interval": 0.3,
            "max_refresh_interval": 0.3,
            "retry_min": 0.05,
            "retry_max": 0.2,
            "fetch_timeout": 1.0,
        },
        cache=CacheSettings(success_ttl=0, failure_ttl=0),
    )


async def _metrics(webhook: RunningWebhook) -> str:
    status, text = await probe(webhook.session, f"{webhook.probe_url}/metrics")
    assert status == 200
    return text


async def test_outage_keeps_issued_tokens_working_and_recovers(
    fresh_okta: OktaProvider, tmp_path: Path
) -> None:
    keys = [new_key("RS256", kid="okta-key-outage")]
    await asyncio.to_thread(fresh_okta.start, keys, jwks_max_age=300)
    issuer = fresh_okta.issuer
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_webhook(_config(issuer), tmp_path / "a") as webhook:
        await wait_ready(webhook.engine)
        token = await id_token(fresh_okta, "alice")
        assert (await review(webhook, token)).authenticated is True
        assert metric(await _metrics(webhook), _FETCHES, result="error") == 0

        await asyncio.to_thread(fresh_okta.stop)
        down_since = time.time()

        async def failed_fetches() -> float:
            return metric(await _metrics(webhook), _FETCHES, result="error")

        await wait_until(failed_fetches, what="a failed key set fetch")
        keyset = webhook.engine.keysets.get(issuer)
        assert keyset.last_error is not None
        assert issuer in keyset.last_error
        answer = await review(webhook, token)
        assert answer.authenticated is True, answer.error
        assert answer.groups == (ADMINS,)
        status, text = await probe(webhook.session, f"{webhook.probe_url}/readyz")
        assert (status, text.startswith("ok")) == (200, True), text
        text = await _metrics(webhook)
        assert metric(text, "kube_oidc_gate_issuer_ready") == 1
        assert metric(text, _LAST_SUCCESS) < down_since

        async with running_webhook(_config(issuer), tmp_path / "b") as latecomer:
            status, text = await probe(
                latecomer.session, f"{latecomer.probe_url}/readyz"
            )
            assert status == 503, text
            assert f"issuer {issuer}: keys not loaded" in text
            status, body, headers = await latecomer.post(review_body(token))
            assert status == 503, body
            assert "Retry-After" in headers

            await asyncio.to_thread(fresh_okta.start, keys, jwks_max_age=300)

            async def recovered() -> bool:
                text = await _metrics(webhook)
                return (
                    keyset.last_error is None
                    and metric(text, _LAST_SUCCESS) > down_since
                )

            await wait_until(recovered, what="a successful fetch after the outage")
            await wait_ready(latecomer.engine)
            status, _ = await probe(latecomer.session, f"{latecomer.probe_url}/readyz")
            assert status == 200
            for running in (webhook, latecomer):
                answer = await review(running, token)
                assert answer.authenticated is True, answer.error
            fresh = await id_token(fresh_okta, "bob")
            assert (await review(webhook, fresh)).authenticated is True
