"""The façade: routing by issuer, the three outcomes, the cache, metrics, explain."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import errors
from proxy.authn import Authenticator
from proxy.metrics import Metrics
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import SigningKey, claims_for, new_key, sign, sign_bytes

OTHER = "https://login.other.test"


@pytest.fixture
def key() -> SigningKey:
    return new_key("RS256")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def make(
    key: SigningKey, other: SigningKey | None = None
) -> tuple[Authenticator, DictResolver, Metrics]:
    resolver = DictResolver(key)
    metrics = Metrics()
    cfg = auth_config(authenticator_config(), authenticator_config(OTHER))
    auth = Authenticator(
        cfg,
        {ISSUER: resolver, OTHER: DictResolver(other or new_key())},
        metrics=metrics,
    )
    return auth, resolver, metrics


async def test_valid_token_maps_to_user(key: SigningKey) -> None:
    auth, _, metrics = make(key)
    user = await auth.authenticate(
        sign(key, claims_for(ISSUER, groups=["naxslabs-admins"]))
    )
    assert user is not None
    assert user.username == f"{ISSUER}#00u1alice"
    assert user.groups == ("naxslabs-admins",)
    assert sample(metrics, "kube_oidc_gate_authentications_total", result="ok") == 1


async def test_routes_by_issuer(key: SigningKey) -> None:
    other_key = new_key("RS256")
    auth, _, _ = make(key, other_key)
    user = await auth.authenticate(sign(other_key, claims_for(OTHER)))
    assert user is not None
    assert user.username == f"{OTHER}#00u1alice"


@pytest.mark.parametrize(
    "iss",
    ["https://not-configured.test", ISSUER + "/", None, 42],
    ids=["other", "trailing-slash", "absent", "int"],
)
async def test_token_of_no_configured_issuer_is_not_mine(
    key: SigningKey, iss: object
) -> None:
    auth, resolver, metrics = make(key)
    claims = claims_for(ISSUER)
    claims["iss"] = iss
    if iss is None:
        del claims["iss"]
    assert await auth.authenticate(sign_bytes(key, json.dumps(claims).encode())) is None
    assert resolver.lookups == 0, "no key was looked at"
    assert (
        sample(metrics, "kube_oidc_gate_authentications_total", result="not_mine") == 1
    )


async def test_cache_hit_skips_verification(key: SigningKey) -> None:
    auth, resolver, metrics = make(key)
    token = sign(key, claims_for(ISSUER))
    first = await auth.authenticate(token)
    for _ in range(5):
        assert await auth.authenticate(token) is first
    assert resolver.lookups == 1
    assert (
        sample(metrics, "kube_oidc_gate_token_cache_requests_total", outcome="hit") == 5
    )
    assert (
        sample(metrics, "kube_oidc_gate_validation_duration_seconds_count", result="ok")
        == 1
    )


async def test_refusal_is_cached_and_replayed(key: SigningKey) -> None:
    auth, resolver, metrics = make(key)
    token = sign(key, claims_for(ISSUER, "someone-else"))
    for _ in range(3):
        with pytest.raises(errors.AudienceMismatch):
            await auth.authenticate(token)
    assert resolver.lookups == 1
    assert (
        sample(
            metrics,
            "kube_oidc_gate_authentications_total",
            result="rejected",
            reason="audience_mismatch",
        )
        == 3
    )


async def test_keys_not_loaded_is_not_cached(key: SigningKey) -> None:
    resolver = DictResolver(ready=False)
    auth = Authenticator(auth_config(), {ISSUER: resolver})
    token = sign(key, claims_for(ISSUER))
    with pytest.raises(errors.KeysUnavailable):
        await auth.authenticate(token)
    resolver.publish_on_refresh(key)
    user = await auth.authenticate(token)
    assert user is not None


async def test_expired_token_leaves_the_cache_at_exp(key: SigningKey) -> None:
    now = [time.time()]
    mono = [100.0]
    resolver = DictResolver(key)
    auth = Authenticator(
        auth_config(),
        {ISSUER: resolver},
        clock=lambda: now[0],
        monotonic=lambda: mono[0],
    )
    token = sign(key, claims_for(ISSUER, lifetime=30, now=now[0]))
    assert await auth.authenticate(token) is not None
    now[0] += 29
    mono[0] += 29
    assert await auth.authenticate(token) is not None
    assert resolver.lookups == 1
    now[0] += 2
    mono[0] += 2
    with pytest.raises(errors.TokenExpired):
        await auth.authenticate(token)


async def test_malformed_token_is_an_error(key: SigningKey) -> None:
    auth, _, _ = make(key)
    with pytest.raises(errors.MalformedToken):
        await auth.authenticate("not-a-jwt")


async def test_explain_says_everything(key: SigningKey) -> None:
    auth, _, _ = make(key)
    good = await auth.explain(sign(key, claims_for(ISSUER, groups="g")))
    assert good.user is not None
    assert good.header is not None
    assert good.header["kid"] == key.kid
    bad = await auth.explain(sign(key, claims_for(ISSUER, lifetime=-10)))
    assert isinstance(bad.error, errors.TokenExpired)
    assert bad.issuer == ISSUER
    stranger = await auth.explain(
        sign(key, claims_for("https://wrong.test/oauth2/default"))
    )
    assert stranger.not_mine is not None
    assert "https://wrong.test/oauth2/default" in stranger.not_mine
    assert ISSUER in stranger.not_mine
