"""The façade: routing by issuer, the three outcomes, the cache, metrics, explain."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import random
import time
import weakref
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import errors
from proxy.authn import Authenticator
from proxy.config import AdmissionSettings
from proxy.errors import MalformedToken, TokenError
from proxy.metrics import Metrics
from tests.fakes.issuer import FakeIssuer
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import SigningKey, claims_for, new_key, sign, sign_bytes
from tests.support.running_gate import (
    running_gate,
)

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


@pytest.mark.slow
@pytest.mark.parametrize(
    "iss",
    [
        "https://not-configured.test",
        "https://issuer.example.test.evil/oauth2/default",
        "not a url",
        None,
        42,
    ],
    ids=["other", "other-host-same-path", "not-a-url", "absent", "int"],
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("iss", "words"),
    [
        (ISSUER + "/", "trailing slash"),
        (ISSUER.replace("https:", "http:"), "scheme (http vs https)"),
        (ISSUER.replace("issuer.example", "Issuer.Example"), "letter case"),
        (ISSUER.replace("default", "Default"), "letter case"),
        (ISSUER.replace(".test/", ".test:8443/"), "port"),
        ("https://issuer.example.test", "different path"),
        ("https://issuer.example.test/oauth2/aus1other", "different path"),
    ],
    ids=[
        "slash",
        "scheme",
        "host-case",
        "path-case",
        "port",
        "org-server",
        "other-server",
    ],
)
async def test_a_near_miss_issuer_is_refused_with_both_values(
    key: SigningKey, iss: str, words: str
) -> None:
    """kube-apiserver would call these "not mine" and say nothing; they are
    almost always a configuration mistake, so they get their own reason.
    """
    auth, resolver, metrics = make(key)
    claims = claims_for(ISSUER)
    claims["iss"] = iss
    token = sign_bytes(key, json.dumps(claims).encode())
    with pytest.raises(errors.IssuerMismatch) as caught:
        await auth.authenticate(token)
    err = caught.value
    assert (err.expected, err.got, err.near_miss) == (ISSUER, iss, True)
    assert f'iss is "{iss}"' in str(err)
    assert f'configured issuer is "{ISSUER}"' in str(err)
    assert words in str(err)
    assert token not in str(err)
    assert resolver.lookups == 0, "no key was looked at: the signature is not trusted"
    assert (
        sample(
            metrics,
            "kube_oidc_gate_authentications_total",
            result="rejected",
            reason="issuer_mismatch",
        )
        == 1
    )
    verdict = await auth.explain(token)
    assert verdict.error is not None
    assert verdict.error.reason == "issuer_mismatch"


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


async def _new_tokens_in_turns(auth: Authenticator, tokens: list[str]) -> list[int]:
    """Validate ``tokens`` at once; how many were done after each turn of the loop."""
    done: list[int] = []

    async def one(token: str) -> None:
        await auth.authenticate(token)
        done.append(1)

    tasks = [asyncio.create_task(one(t)) for t in tokens]
    progress = []
    for _ in range(100):
        await asyncio.sleep(0)
        progress.append(len(done))
        if all(t.done() for t in tasks):
            break
    await asyncio.gather(*tasks)
    return progress


def _tokens(key: SigningKey, n: int) -> list[str]:
    return [sign(key, claims_for(ISSUER, sub=f"user{i}")) for i in range(n)]


async def _remember(auth: Authenticator, key: SigningKey) -> None:
    """An accepted user, then answered from the cache: traffic to protect."""
    remembered = sign(key, claims_for(ISSUER))
    await auth.authenticate(remembered)
    _, user = auth.lookup(remembered)
    assert user is not None


async def _not_ours(auth: Authenticator, n: int) -> None:
    stranger = new_key("RS256")
    for i in range(n):
        token = sign(stranger, claims_for("https://stranger.test", sub=f"s{i}"))
        assert await auth.authenticate(token) is None


@pytest.mark.slow
async def test_new_tokens_take_turns_behind_remembered_users_during_a_flood(
    key: SigningKey,
) -> None:
    auth, _, metrics = make(key)
    await _remember(auth, key)
    await _not_ours(auth, 10)  # new tokens lately: junk, not logins
    waits = "kube_oidc_gate_new_token_waits_total"
    before = sample(metrics, waits, outcome="waited")
    progress = await _new_tokens_in_turns(auth, _tokens(key, 6))
    steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
    assert max(steps) == 1, progress
    assert progress[-1] == 6
    assert sample(metrics, waits, outcome="waited") - before == 5


@pytest.mark.slow
async def test_a_wave_of_logins_keeps_its_pace_beside_remembered_users(
    key: SigningKey,
) -> None:
    auth, _, metrics = make(key)
    await _remember(auth, key)
    progress = await _new_tokens_in_turns(auth, _tokens(key, 6))
    assert progress[0] == 6, progress
    assert (
        sample(metrics, "kube_oidc_gate_new_token_waits_total", outcome="waited") == 0
    )


@pytest.mark.slow
async def test_replayed_refusals_do_not_hold_back_new_tokens(key: SigningKey) -> None:
    auth, _, metrics = make(key)
    bad = sign(new_key("RS256"), claims_for(ISSUER))
    with pytest.raises(errors.UnknownKeyId):
        await auth.authenticate(bad)
    with pytest.raises(errors.UnknownKeyId):
        auth.lookup(bad)  # a cached refusal: not a user to protect
    await _not_ours(auth, 10)
    progress = await _new_tokens_in_turns(auth, _tokens(key, 6))
    assert progress[0] == 6, progress
    assert (
        sample(metrics, "kube_oidc_gate_new_token_waits_total", outcome="waited") == 0
    )


@pytest.mark.slow
async def test_a_full_turn_queue_refuses_for_now_and_remembers_nothing(
    key: SigningKey,
) -> None:
    metrics = Metrics()
    auth = Authenticator(
        auth_config(admission=AdmissionSettings(per_turn=1, max_waiting=1)),
        {ISSUER: DictResolver(key)},
        metrics=metrics,
    )
    await _remember(auth, key)
    await _not_ours(auth, 5)
    first, second, third = _tokens(key, 3)
    results = await asyncio.gather(
        *(auth.authenticate(t) for t in (first, second, third)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, errors.Overloaded)]
    assert len(refused) == 1
    assert isinstance(results[2], errors.Overloaded)
    assert refused[0].temporary
    assert all(r is not None and not isinstance(r, Exception) for r in results[:2])
    labels = {"result": "error", "reason": "overloaded"}
    assert sample(metrics, "kube_oidc_gate_authentications_total", **labels) == 1
    assert sample(metrics, "kube_oidc_gate_new_token_waits_total", outcome="shed") == 1
    # Not remembered: the same token is accepted once there is room.
    assert await auth.authenticate(third) is not None


@pytest.mark.slow
async def test_forget_subject_drops_cached_verdicts(key: SigningKey) -> None:
    """Okta's group.user_membership.remove (issue 22): the next review verifies again."""
    auth, resolver, _ = make(key)
    token = sign(key, claims_for(ISSUER))
    await auth.authenticate(token)
    await auth.authenticate(token)
    assert resolver.lookups == 1
    auth.forget_subject(None, "00u1alice")
    assert len(auth.cache) == 0
    await auth.authenticate(token)
    assert resolver.lookups == 2


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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


@pytest.mark.slow
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


async def test_engine_refuses_lone_surrogates_with_a_typed_error() -> None:
    authn = Authenticator(
        auth_config(authenticator_config()), {ISSUER: DictResolver(new_key("RS256"))}
    )
    with pytest.raises(MalformedToken):
        await authn.authenticate("e30.e30.\udcff")


@pytest.mark.slow
async def test_replayed_invalid_tokens_are_validated_once_each(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    attacker = new_key("RS256", kid=issuer.keys[0].kid)
    distinct = [
        sign(attacker, claims_for(issuer.url, groups=["devs"], jti=f"forged-{i}"))
        for i in range(20)
    ]
    async with running_gate(tmp_path, "webhook", issuer) as gate:
        count = "kube_oidc_gate_validation_duration_seconds_count"
        before = gate.value(count, result="rejected")

        async def one(token: str) -> None:
            status, answer = await gate.review(token)
            assert status == 200
            assert answer["status"]["authenticated"] is False
            assert answer["status"]["error"].startswith("bad_signature:")

        await asyncio.gather(*(one(t) for t in distinct))
        replays = distinct * 9
        random.shuffle(replays)
        await asyncio.wait_for(asyncio.gather(*(one(t) for t in replays)), 30)
        assert gate.value(count, result="rejected") - before == len(distinct)
        hits = gate.value("kube_oidc_gate_token_cache_requests_total", outcome="hit")
        assert hits >= len(replays)
