"""proxy.keyset against a real fake issuer on 127.0.0.1 (http and TLS); and, behind
the real webhook, the issuer failing: the answers while it lasts, ``/readyz``,
the metrics and recovery without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxy.config import CacheSettings, IssuerConfig, KeySetSettings
from proxy.errors import DiscoveryError, KeySetError, KeysUnavailable
from proxy.jwk import parse_jwks
from proxy.keyset import IssuerKeySet, KeySets, StaticKeySet
from proxy.log import issuer_hash
from proxy.metrics import Metrics
from tests.fakes.issuer import FakeIssuer, loopback_session, serve_issuer
from tests.keygen import claims_for, jwks, new_key
from tests.support.running_gate import (
    Gate,
    gate_config,
    running_gate,
    wait_until,
)

#: One key for the default fake issuer: RSA generation is the slow part of setup.
KEY = new_key("RS256")

FAST = KeySetSettings(
    unknown_kid_cooldown=30.0,
    unknown_kid_ttl=60.0,
    min_refresh_interval=60.0,
    max_refresh_interval=3600.0,
    default_refresh_interval=600.0,
    retry_min=0.01,
    retry_max=0.05,
    fetch_timeout=0.3,
    max_document_bytes=64 * 1024,
)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with loopback_session() as s:
        yield s


@pytest.fixture
async def fake() -> AsyncIterator[FakeIssuer]:
    async with serve_issuer(KEY) as issuer:
        yield issuer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def issuer_for(fake: FakeIssuer, **overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {"url": fake.url, "audiences": ("kubernetes",)}
    values.update(overrides)
    return IssuerConfig(**values)


def make_keyset(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    *,
    settings: KeySetSettings = FAST,
    clock: Callable[[], float] | None = None,
    metrics: Metrics | None = None,
    **issuer: Any,
) -> IssuerKeySet:
    return IssuerKeySet(
        issuer_for(fake, **issuer),
        settings,
        session=session,
        metrics=metrics,
        clock=clock or FakeClock(),
        wall_clock=lambda: 1_700_000_000.0,
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


def fetches(metrics: Metrics, url: str, result: str) -> float | None:
    return sample(
        metrics,
        "kube_oidc_gate_jwks_fetches_total",
        issuer_hash=issuer_hash(url),
        result=result,
    )


async def wait_for(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


def keyset_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith(("jwks-refresh", "jwks-fetch")) and not t.done()
    ]


# -- discovery -----------------------------------------------------------------


async def test_discovery_and_keys_load(
    fake: FakeIssuer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    key = fake.keys[0]
    ks = make_keyset(fake, session, metrics=metrics)
    assert (ks.ready, ks.key_count, ks.fetch_count) == (False, 0, 0)
    await ks.refresh()
    assert (ks.ready, ks.key_count, ks.fetch_count) == (True, 1, 1)
    (found,) = ks.lookup(key.kid)
    (expected,), _ = parse_jwks(jwks(key), issuer=fake.url)
    assert found.thumbprint == expected.thumbprint
    assert ks.lookup(None) == ks.keys
    assert ks.lookup("nope") == ()
    assert ks.last_error is None
    assert ks.last_success == 1_700_000_000.0
    assert fake.counts == {"discovery": 1, "jwks": 1}
    label = issuer_hash(fake.url)
    assert fetches(metrics, fake.url, "ok") == 1
    assert sample(metrics, "kube_oidc_gate_issuer_ready", issuer_hash=label) == 1
    assert sample(metrics, "kube_oidc_gate_jwks_keys", issuer_hash=label) == 1
    assert (
        sample(
            metrics,
            "kube_oidc_gate_jwks_last_success_timestamp_seconds",
            issuer_hash=label,
        )
        == 1_700_000_000.0
    )


async def test_tls_with_custom_ca(
    ca: trustme.CA, session: aiohttp.ClientSession
) -> None:
    async with serve_issuer(tls=ca, prefix="/oauth2/default") as fake:
        assert fake.url.startswith("https://127.0.0.1:")
        ks = make_keyset(fake, session, certificate_authority=fake.ca_pem)
        await ks.refresh()
        assert ks.ready
        assert ks.lookup(fake.keys[0].kid)


async def test_tls_without_the_ca_is_refused(
    ca: trustme.CA, session: aiohttp.ClientSession
) -> None:
    async with serve_issuer(tls=ca) as fake:
        ks = make_keyset(fake, session)
        with pytest.raises(DiscoveryError, match="certificate verify failed"):
            await ks.refresh()
        assert not ks.ready
        assert fake.counts["jwks"] == 0


@pytest.mark.slow
async def test_discovery_url_override_is_used_exactly(
    session: aiohttp.ClientSession,
) -> None:
    # Like Azure AD: the issuer URL is not where the discovery document lives.
    async with serve_issuer(prefix="/tenant-1/v2.0") as fake:
        fake.wrong_issuer = "https://login.example.com/tenant-1/v2.0"
        ks = make_keyset(
            fake,
            session,
            url="https://login.example.com/tenant-1/v2.0",
            discovery_url=fake.discovery_url,
        )
        await ks.refresh()
        assert ks.ready
        assert fake.counts == {"discovery": 1, "jwks": 1}


@pytest.mark.slow
async def test_issuer_url_trailing_slash_is_stripped_once(
    session: aiohttp.ClientSession,
) -> None:
    async with serve_issuer() as fake:
        fake.wrong_issuer = fake.url + "/"
        ks = make_keyset(fake, session, url=fake.url + "/")
        await ks.refresh()
        assert ks.ready


Arrange = Callable[[FakeIssuer], None]


def _wrong_issuer(value: str) -> Arrange:
    def arrange(fake: FakeIssuer) -> None:
        fake.wrong_issuer = value

    return arrange


def _set(**attrs: Any) -> Arrange:
    def arrange(fake: FakeIssuer) -> None:
        for name, value in attrs.items():
            setattr(fake, name, value)

    return arrange


def _discovery_without_jwks_uri(fake: FakeIssuer) -> None:
    fake.discovery_body = json.dumps({"issuer": fake.url}).encode()


def _trailing_slash(fake: FakeIssuer) -> None:
    fake.wrong_issuer = fake.url + "/"


DISCOVERY_REFUSALS: list[tuple[str, Arrange, list[str]]] = [
    (
        "issuer-mismatch",
        _wrong_issuer("https://other.example.com"),
        ['names issuer "https://other.example.com"', "expected", "exactly"],
    ),
    ("issuer-trailing-slash", _trailing_slash, ["differ only by a trailing slash"]),
    (
        "jwks-uri-plain-http",
        _set(jwks_uri="http://keys.example.com/keys"),
        ["jwks_uri from discovery http://keys.example.com/keys must use https"],
    ),
    ("jwks-uri-ftp", _set(jwks_uri="ftp://127.0.0.1/keys"), ["absolute https url"]),
    ("no-jwks-uri", _discovery_without_jwks_uri, ['no "jwks_uri" string']),
    ("http-404", _set(status=404), ["answered http 404, expected 200"]),
    (
        "slow",
        _set(delay=5.0),
        ["discovery document fetch from", "timed out after 0.3s"],
    ),
    ("garbage", _set(discovery_body=b"<html>login</html>"), ["is not valid JSON"]),
    ("not-an-object", _set(discovery_body=b"[1, 2]"), ["is not a JSON object"]),
    (
        "no-issuer",
        _set(discovery_body=b'{"jwks_uri": "https://x/keys"}'),
        ['no "issuer" string'],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arrange", "fragments"),
    [case[1:] for case in DISCOVERY_REFUSALS],
    ids=[case[0] for case in DISCOVERY_REFUSALS],
)
async def test_discovery_refusals(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    arrange: Arrange,
    fragments: list[str],
) -> None:
    arrange(fake)
    ks = make_keyset(fake, session, metrics=metrics)
    async with asyncio.timeout(3):
        with pytest.raises(DiscoveryError) as caught:
            await ks.refresh()
    message = str(caught.value)
    assert message.startswith("jwks: ")
    for fragment in fragments:
        assert fragment in message
    assert not ks.ready
    assert ks.last_error == message
    assert fake.counts["jwks"] == 0
    assert fetches(metrics, fake.url, "error") == 1


async def test_issuer_mismatch_names_both_urls(
    fake: FakeIssuer, session: aiohttp.ClientSession
) -> None:
    fake.wrong_issuer = "https://other.example.com/oauth2/default"
    ks = make_keyset(fake, session)
    with pytest.raises(DiscoveryError) as caught:
        await ks.refresh()
    assert '"https://other.example.com/oauth2/default"' in str(caught.value)
    assert f'expected "{fake.url}"' in str(caught.value)


URL_REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    (
        "issuer-plain-http",
        {"url": "http://issuer.example.com"},
        "jwks: issuer url http://issuer.example.com must use https",
    ),
    (
        "discovery-plain-http",
        {"discovery_url": "http://issuer.example.com/.well-known/openid-configuration"},
        "jwks: discovery url http://issuer.example.com/.well-known/",
    ),
    (
        "loopback-lookalike",
        {"url": "http://127.0.0.1.nip.io"},
        "plain http is allowed only for a loopback host",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [case[1:] for case in URL_REFUSALS],
    ids=[case[0] for case in URL_REFUSALS],
)
async def test_plain_http_to_a_non_loopback_host_is_refused(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    overrides: dict[str, Any],
    message: str,
) -> None:
    ks = make_keyset(fake, session, **overrides)
    with pytest.raises(KeySetError) as caught:
        await ks.refresh()
    assert str(caught.value).startswith("jwks: ")
    assert message in str(caught.value)
    assert not fake.counts


# -- JWKS document -------------------------------------------------------------------

TOO_BIG = b'{"keys": [], "pad": "' + b"x" * (FAST.max_document_bytes + 10) + b'"}'

JWKS_REFUSALS: list[tuple[str, Arrange, str]] = [
    ("garbage", _set(jwks_body=b"{not json"), "is not valid JSON"),
    ("html", _set(jwks_body=b"<html/>", content_type="text/html"), "text/html"),
    ("deep-nesting", _set(jwks_body=b"[" * 60_000), "is not valid JSON"),
    (
        "oversized-content-length",
        _set(jwks_body=TOO_BIG),
        f"bytes, over the limit of {FAST.max_document_bytes}",
    ),
    (
        "oversized-chunked",
        _set(jwks_body=TOO_BIG, chunked=True),
        f"is over the limit of {FAST.max_document_bytes} bytes",
    ),
    ("not-a-key-set", _set(jwks_body=b'{"kty": "RSA"}'), 'with a "keys" list'),
    (
        "only-symmetric",
        _set(jwks_body=b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
        "no usable signing key",
    ),
    ("http-500", _set(jwks_status=500), "answered http 500"),
    ("slow", _set(jwks_delay=5.0), "timed out after 0.3s"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arrange", "fragment"),
    [case[1:] for case in JWKS_REFUSALS],
    ids=[case[0] for case in JWKS_REFUSALS],
)
async def test_bad_key_sets_are_refused(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    arrange: Arrange,
    fragment: str,
) -> None:
    arrange(fake)
    ks = make_keyset(fake, session)
    async with asyncio.timeout(3):
        with pytest.raises(KeySetError) as caught:
            await ks.refresh()
    message = str(caught.value)
    assert message.startswith("jwks: key set ")
    assert fragment in message
    assert not ks.ready
    assert ks.last_error == message
    assert fake.counts == {"discovery": 1, "jwks": 1}


# -- cache lifetime -------------------------------------------------------------------

LIFETIMES: list[tuple[str, str | None, float]] = [
    ("max-age", "public, max-age=300", 300.0),
    ("clamped-low", "max-age=5", 60.0),
    ("clamped-high", "max-age=86400", 3600.0),
    ("zero", "max-age=0", 60.0),
    ("absent", None, 600.0),
    ("no-cache", "no-cache", 600.0),
    ("no-store-wins", "no-store, max-age=300", 600.0),
    ("invalid", "max-age=soon", 600.0),
    ("quoted-and-others", 'must-revalidate, max-age="120"', 120.0),
]


@pytest.mark.parametrize(
    ("header", "lifetime"),
    [case[1:] for case in LIFETIMES],
    ids=[case[0] for case in LIFETIMES],
)
async def test_cache_control_sets_the_lifetime(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    header: str | None,
    lifetime: float,
) -> None:
    fake.cache_control = header
    ks = make_keyset(fake, session, clock=clock)
    await ks.refresh()
    assert ks.expires_at == clock.now + lifetime

    await ks.refresh()  # still fresh: no fetch
    assert fake.counts["jwks"] == 1
    clock.advance(lifetime - 1)
    await ks.refresh()
    assert fake.counts["jwks"] == 1
    clock.advance(1)
    await ks.refresh()
    assert fake.counts["jwks"] == 2


async def test_background_refresh_follows_the_lifetime(
    fake: FakeIssuer, session: aiohttp.ClientSession
) -> None:
    # With a 50 ms lifetime the refresher must fetch again and again; with the
    # default 600 s (max-age ignored) it would fetch once.
    settings = KeySetSettings(
        min_refresh_interval=0.05, default_refresh_interval=600.0, fetch_timeout=1.0
    )
    fake.cache_control = "max-age=0"
    ks = IssuerKeySet(issuer_for(fake), settings, session=session)
    await ks.start()
    try:
        await wait_for(lambda: fake.counts["jwks"] >= 3)
    finally:
        await ks.close()
    assert ks.ready


# -- unknown kid -------------------------------------------------------------------


async def test_unknown_kid_flood_costs_one_fetch(
    fake: FakeIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    ks = make_keyset(fake, session, clock=clock)
    await ks.refresh()
    fake.reset_counts()

    kids = [secrets.token_hex(8) for _ in range(200)]
    results = await asyncio.gather(*(ks.refresh_unknown(kid) for kid in kids))
    assert all(list(r) == [] for r in results)
    assert fake.counts["jwks"] == 1

    # Within the cooldown: a new random kid causes no fetch.
    assert list(await ks.refresh_unknown("fresh-1")) == []
    clock.advance(FAST.unknown_kid_cooldown - 0.1)
    assert list(await ks.refresh_unknown("fresh-2")) == []
    assert fake.counts["jwks"] == 1

    # After the cooldown: a kid remembered as unknown still costs nothing...
    clock.advance(0.2)
    assert list(await ks.refresh_unknown(kids[0])) == []
    assert fake.counts["jwks"] == 1
    # ...a kid never seen refetches once.
    assert list(await ks.refresh_unknown("fresh-3")) == []
    assert fake.counts["jwks"] == 2

    # The memory expires: after the TTL the same kid may refetch again.
    clock.advance(FAST.unknown_kid_ttl + FAST.unknown_kid_cooldown)
    assert list(await ks.refresh_unknown(kids[0])) == []
    assert fake.counts["jwks"] == 3


async def test_rotation_new_kid_becomes_known(
    fake: FakeIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    old = fake.keys[0]
    ks = make_keyset(fake, session, clock=clock)
    await ks.refresh()

    new = fake.rotate("ES256")
    assert ks.lookup(new.kid) == ()
    (found,) = await ks.refresh_unknown(new.kid)
    assert (found.kid, found.kty, found.crv) == (new.kid, "EC", "P-256")
    assert ks.lookup(old.kid)  # old key still published and held

    fake.withdraw(old.kid)
    await ks.refresh(force=True)
    assert ks.lookup(old.kid) == ()
    assert ks.lookup(new.kid)


async def test_remembered_unknown_kid_is_found_after_a_later_fetch(
    fake: FakeIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    ks = make_keyset(fake, session, clock=clock)
    await ks.refresh()
    upcoming = new_key("RS256")
    assert list(await ks.refresh_unknown(upcoming.kid)) == []  # now remembered

    fake.add_key(upcoming)
    await ks.refresh(force=True)
    fake.reset_counts()
    (found,) = await ks.refresh_unknown(upcoming.kid)
    assert found.kid == upcoming.kid
    assert not fake.counts


async def test_refresh_unknown_before_any_load_raises_keys_unavailable(
    fake: FakeIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.go_down(503)
    ks = make_keyset(fake, session, clock=clock)
    with pytest.raises(KeysUnavailable) as caught:
        await ks.refresh_unknown("k1")
    err = caught.value
    assert err.temporary
    assert err.issuer == fake.url
    assert str(err).startswith(f"jwks: keys for issuer {fake.url} are not loaded yet: ")
    assert "answered http 503" in str(err)
    assert fake.counts["discovery"] == 1

    # The cooldown also protects an issuer that is down.
    with pytest.raises(KeysUnavailable):
        await ks.refresh_unknown("k2")
    assert fake.counts["discovery"] == 1

    fake.come_up()
    clock.advance(FAST.unknown_kid_cooldown)
    (found,) = await ks.refresh_unknown(fake.keys[0].kid)
    assert found.kid == fake.keys[0].kid


# -- outages ---------------------------------------------------------------------

Outage = Callable[[FakeIssuer], Awaitable[None]]


async def _answer_503(fake: FakeIssuer) -> None:
    fake.go_down(503)


async def _stop_listening(fake: FakeIssuer) -> None:
    await fake.stop()


async def _answer_slowly(fake: FakeIssuer) -> None:
    fake.delay = 5.0


OUTAGES: list[tuple[str, Outage, str, int | None]] = [
    ("http-503", _answer_503, "answered http 503", 503),
    ("not-listening", _stop_listening, "fetch from", None),
    ("slow", _answer_slowly, "timed out after 0.3s", None),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("outage", "fragment", "status"),
    [case[1:] for case in OUTAGES],
    ids=[case[0] for case in OUTAGES],
)
async def test_outage_keeps_the_last_good_keys(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
    outage: Outage,
    fragment: str,
    status: int | None,
) -> None:
    kid = fake.keys[0].kid
    ks = make_keyset(fake, session, metrics=metrics)
    await ks.refresh()
    await outage(fake)

    with caplog.at_level(logging.WARNING, logger="proxy.keyset"):
        async with asyncio.timeout(3):
            with pytest.raises(KeySetError):
                await ks.refresh(force=True)
    assert ks.ready
    assert ks.lookup(kid)
    assert ks.last_error is not None
    assert fragment in ks.last_error
    assert ks.last_success == 1_700_000_000.0
    assert fetches(metrics, fake.url, "ok") == 1
    assert fetches(metrics, fake.url, "error") == 1
    label = issuer_hash(fake.url)
    assert sample(metrics, "kube_oidc_gate_issuer_ready", issuer_hash=label) == 1
    assert sample(metrics, "kube_oidc_gate_jwks_keys", issuer_hash=label) == 1

    (record,) = [r for r in caplog.records if r.getMessage() == "jwks refresh failed"]
    assert record.issuer == fake.url  # type: ignore[attr-defined]
    assert record.status == status  # type: ignore[attr-defined]
    assert record.error == ks.last_error  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "down_how", ["http-503", "not-listening"], ids=["http-503", "not-listening"]
)
async def test_start_with_issuer_down_becomes_ready_later(
    session: aiohttp.ClientSession, metrics: Metrics, down_how: str
) -> None:
    async with serve_issuer() as fake:
        if down_how == "http-503":
            fake.go_down(503)
        else:
            await fake.stop()
        ks = IssuerKeySet(issuer_for(fake), FAST, session=session, metrics=metrics)
        try:
            await ks.start()  # must not raise nor wait for the issuer
            # A cycle is counted when it starts, its failure when it ends:
            # wait for the third failure, not only the third start.
            await wait_for(
                lambda: (
                    ks.fetch_count >= 3
                    and (fetches(metrics, fake.url, "error") or 0) >= 3
                )
            )
            assert (ks.ready, ks.last_error is None) == (False, False)
            assert (fetches(metrics, fake.url, "error") or 0) >= 3
            label = issuer_hash(fake.url)
            assert (
                sample(metrics, "kube_oidc_gate_issuer_ready", issuer_hash=label) == 0
            )

            if down_how == "http-503":
                fake.come_up()
            else:
                await fake.start()
            await wait_for(lambda: ks.ready)
            assert ks.last_error is None
            assert ks.lookup(fake.keys[0].kid)
            assert (
                sample(metrics, "kube_oidc_gate_issuer_ready", issuer_hash=label) == 1
            )
        finally:
            await ks.close()
        assert keyset_tasks() == []


# -- lifecycle ---------------------------------------------------------------------

CLOSE_CASES: list[tuple[str, float]] = [("idle", 0.0), ("mid-fetch", 5.0)]


@pytest.mark.parametrize(
    "delay", [case[1] for case in CLOSE_CASES], ids=[case[0] for case in CLOSE_CASES]
)
async def test_close_leaves_no_task_running(
    fake: FakeIssuer, session: aiohttp.ClientSession, delay: float
) -> None:
    fake.delay = delay
    ks = make_keyset(fake, session, settings=KeySetSettings(fetch_timeout=10.0))
    await ks.start()
    if delay:
        await wait_for(lambda: fake.counts["jwks"] + fake.counts["discovery"] > 0)
    else:
        await wait_for(lambda: ks.ready)
    assert keyset_tasks()
    async with asyncio.timeout(2):
        await ks.close()
    assert keyset_tasks() == []
    # A closed key set fetches no more, even for an unknown kid.
    before = fake.counts.copy()
    if ks.ready:
        assert list(await ks.refresh_unknown("after-close")) == []
    else:
        with pytest.raises(KeysUnavailable):
            await ks.refresh_unknown("after-close")
    assert fake.counts == before
    assert keyset_tasks() == []


async def test_keysets_track_readiness_per_issuer(
    session: aiohttp.ClientSession,
) -> None:
    async with serve_issuer() as up, serve_issuer() as down:
        down.go_down(503)
        sets = KeySets(
            [issuer_for(up), issuer_for(down), issuer_for(up)], FAST, session=session
        )
        assert len(sets) == 2
        assert sets.not_ready() == [up.url, down.url]
        await sets.start()
        try:
            await wait_for(lambda: sets.get(up.url).ready)
            await wait_for(lambda: sets.get(down.url).fetch_count >= 2)
            assert sets.not_ready() == [down.url]
            assert [ks.url for ks in sets] == [up.url, down.url]
            with pytest.raises(KeyError):
                sets.get("https://unknown.example.com")
        finally:
            await sets.close()
        assert keyset_tasks() == []


def test_static_keyset_answers_from_fixed_keys() -> None:
    a, b = new_key("RS256", kid="a"), new_key("ES256", kid="b")
    keys, _ = parse_jwks(jwks(a, b), issuer="file jwks.json")
    static = StaticKeySet(keys, url="https://issuer.example.com")
    assert static.ready
    assert static.key_count == 2
    assert [k.kid for k in static.lookup("a")] == ["a"]
    assert [k.kid for k in static.lookup(None)] == ["a", "b"]
    assert static.lookup("c") == ()


async def test_static_keyset_never_fetches() -> None:
    keys, _ = parse_jwks(jwks(new_key("RS256", kid="a")), issuer="file")
    static = StaticKeySet(keys)
    assert list(await static.refresh_unknown("zzz")) == []
    assert [k.kid for k in await static.refresh_unknown("a")] == ["a"]


async def test_duplicate_kids_give_several_candidates(
    fake: FakeIssuer, session: aiohttp.ClientSession
) -> None:
    fake.publish(new_key("RS256", kid="same"), new_key("ES256", kid="same"))
    ks = make_keyset(fake, session)
    await ks.refresh()
    assert [k.kty for k in ks.lookup("same")] == ["RSA", "EC"]


async def test_skipped_keys_are_logged_once_per_change(
    fake: FakeIssuer,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    doc = jwks(fake.keys[0])
    doc["keys"].append({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"})
    fake.jwks_body = json.dumps(doc).encode()
    ks = make_keyset(fake, session)
    with caplog.at_level(logging.WARNING, logger="proxy.keyset"):
        await ks.refresh(force=True)
        await ks.refresh(force=True)
    skipped = [r for r in caplog.records if r.getMessage() == "jwks key skipped"]
    assert len(skipped) == 1
    assert 'kid "hmac"' in skipped[0].reason  # type: ignore[attr-defined]
    assert ks.key_count == 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------
# Floods at the webhook


def _random_kid_token(issuer_url: str) -> str:
    header = {"alg": "RS256", "kid": secrets.token_urlsafe(12)}
    claims = claims_for(issuer_url, groups=["devs"])
    return ".".join(
        [
            _b64(json.dumps(header).encode()),
            _b64(json.dumps(claims).encode()),
            _b64(secrets.token_bytes(256)),
        ]
    )


@pytest.mark.slow
async def test_random_kid_flood_costs_the_issuer_one_fetch(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with running_gate(tmp_path, "webhook", issuer) as gate:
        issuer.reset_counts()
        flood = [_random_kid_token(issuer.url) for _ in range(500)]
        valid = [gate.token(jti=f"j{i}") for i in range(20)]
        requests = [(t, False) for t in flood] + [(t, True) for t in valid]
        random.shuffle(requests)

        async def one(token: str, ok: bool) -> None:
            status, answer = await gate.review(token)
            assert status == 200
            assert answer["status"]["authenticated"] is ok
            if not ok:
                assert answer["status"]["error"].startswith("unknown_kid:")

        await asyncio.wait_for(asyncio.gather(*(one(t, ok) for t, ok in requests)), 30)
        assert issuer.counts["jwks"] <= 1
        assert issuer.counts["discovery"] <= 1
        assert (
            gate.value(
                "kube_oidc_gate_authentications_total",
                result="rejected",
                reason="unknown_kid",
            )
            == 500
        )
        assert (
            gate.value("kube_oidc_gate_authentications_total", result="ok", reason="ok")
            == 20
        )


#: Short lifetimes so an outage shows up, and ends, within a few fetch cycles.
KEYSET = KeySetSettings(
    retry_min=0.05,
    retry_max=0.1,
    fetch_timeout=0.3,
    min_refresh_interval=0.1,
    default_refresh_interval=0.2,
    max_refresh_interval=0.2,
    unknown_kid_cooldown=0.1,
    unknown_kid_ttl=0.1,
)
CACHE = CacheSettings(failure_ttl=0.1)


# --------------------------------------------------------------------------
# The issuer

Action = Callable[[FakeIssuer], Awaitable[None]]


async def _stop(i: FakeIssuer) -> None:
    await i.stop()


async def _start(i: FakeIssuer) -> None:
    await i.start()


def _issuer_set(**attrs: Any) -> Action:
    async def apply(i: FakeIssuer) -> None:
        for name, value in attrs.items():
            setattr(i, name, value)

    return apply


#: (name, break, fix, what /readyz says while broken)
ISSUER_FAILURES: list[tuple[str, Action, Action, str]] = [
    ("down", _stop, _start, "failed"),
    (
        "answers-503",
        _issuer_set(status=503),
        _issuer_set(status=200),
        "answered http 503",
    ),
    (
        "slow-beyond-timeout",
        _issuer_set(delay=1.0),
        _issuer_set(delay=0.0),
        "timed out",
    ),
    (
        "garbage-jwks",
        _issuer_set(jwks_body=b"<html>oops"),
        _issuer_set(jwks_body=None),
        "not valid JSON",
    ),
    (
        "oversized-jwks",
        _issuer_set(jwks_body=b" " * (600 * 1024)),
        _issuer_set(jwks_body=None),
        "over the limit",
    ),
    (
        "issuer-value-changed",
        _issuer_set(wrong_issuer="https://127.0.0.1/another"),
        _issuer_set(wrong_issuer=None),
        "names issuer",
    ),
]


def _fetch_errors(gate: Gate) -> float:
    return gate.value(
        "kube_oidc_gate_jwks_fetches_total",
        issuer_hash=issuer_hash(gate.issuer.url),
        result="error",
    )


def _ready_gauge(gate: Gate) -> float:
    return gate.value(
        "kube_oidc_gate_issuer_ready", issuer_hash=issuer_hash(gate.issuer.url)
    )


async def _accepted(gate: Gate, token: str) -> bool:
    status, answer = await gate.review(token)
    assert status == 200, answer
    return bool(answer["status"]["authenticated"])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["at-start", "later"])
@pytest.mark.parametrize(
    ("breaks", "fixes", "says"),
    [f[1:] for f in ISSUER_FAILURES],
    ids=[f[0] for f in ISSUER_FAILURES],
)
async def test_issuer_failure_answer_readiness_metrics_and_recovery(
    issuer: FakeIssuer,
    tmp_path: Path,
    breaks: Action,
    fixes: Action,
    says: str,
    when: str,
) -> None:
    config = gate_config(issuer.url, keyset=KEYSET, cache=CACHE)
    if when == "at-start":
        await breaks(issuer)
    async with running_gate(
        tmp_path, "webhook", issuer, config=config, ready=when == "later"
    ) as gate:
        if when == "later":
            await breaks(issuer)
        await wait_until(lambda: _fetch_errors(gate) >= 2, what="failed fetches")
        status, text = await gate.probe()
        if when == "at-start":
            # Never loaded: "try again", never a refusal the API server caches.
            async with gate.client.post(
                gate.url + "/authenticate",
                json={
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": gate.token()},
                },
            ) as r:
                assert r.status == 503
                assert r.headers["Retry-After"]
                assert (await r.json())["kind"] == "Status"
            assert status == 503
            assert "keys not loaded" in text
            assert _ready_gauge(gate) == 0
        else:
            # Loaded once: the last good keys keep verifying fresh tokens.
            assert await _accepted(gate, gate.token(jti="during-the-outage"))
            assert status == 200
            assert "warning" in text
            assert _ready_gauge(gate) == 1
        assert says in text, text

        await fixes(issuer)
        await wait_until(
            lambda: _probe_clean(gate), timeout=5, what="/readyz clean again"
        )
        assert _ready_gauge(gate) == 1
        assert await _accepted(gate, gate.token(jti="after-recovery"))


async def _probe_clean(gate: Gate) -> bool:
    status, text = await gate.probe()
    return status == 200 and "warning" not in text


@pytest.mark.slow
async def test_key_set_without_the_needed_key(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    config = gate_config(issuer.url, keyset=KEYSET, cache=CACHE)
    old = issuer.keys[0]
    async with running_gate(tmp_path, "webhook", issuer, config=config) as gate:
        token = gate.token(old)
        assert await _accepted(gate, token)
        issuer.publish(new_key("RS256"))  # the key that signed it is withdrawn
        await gate.engine.keysets.get(issuer.url).refresh(force=True)
        status, answer = await gate.review(token)
        assert status == 200
        assert answer["status"]["authenticated"] is False
        assert answer["status"]["error"].startswith("unknown_kid:")
        assert (await gate.probe())[0] == 200, "the issuer is healthy"
        assert (
            gate.value(
                "kube_oidc_gate_authentications_total",
                result="rejected",
                reason="unknown_kid",
            )
            >= 1
        )
        issuer.add_key(old)  # published again: accepted again, no restart
        await wait_until(
            lambda: _accepted(gate, token), timeout=5, what="accepted again"
        )
