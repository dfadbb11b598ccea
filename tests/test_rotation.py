"""Key rotation and outages through the whole engine (key sets + authenticator + cache)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from proxy import errors
from proxy.app import Engine, probe_app, start_engine
from proxy.config import KeySetSettings
from proxy.metrics import Metrics
from tests.fakes.issuer import FakeIssuer
from tests.support.running_webhook import issuer_auth_config, wait_ready


async def engine_for(issuer: FakeIssuer, **keyset: float) -> Engine:
    settings = {
        "retry_min": 0.05,
        "retry_max": 0.2,
        "fetch_timeout": 2.0,
        "min_refresh_interval": 0.2,
    }
    settings.update(keyset)
    cfg = issuer_auth_config(issuer.url, None)
    cfg = type(cfg)(
        authenticators=cfg.authenticators,
        keyset=KeySetSettings(**settings),  # type: ignore[arg-type]
    )
    engine = await start_engine(cfg, metrics=Metrics())
    await wait_ready(engine)
    return engine


async def test_withdrawn_key_purges_cached_acceptances(issuer: FakeIssuer) -> None:
    engine = await engine_for(issuer)
    try:
        old = issuer.keys[0]
        token = issuer.token(old)
        assert await engine.authenticator.authenticate(token) is not None  # now cached
        issuer.rotate()
        issuer.withdraw(old.kid)
        await engine.keysets.get(issuer.url).refresh(force=True)
        with pytest.raises(errors.UnknownKeyId):
            await engine.authenticator.authenticate(token)
    finally:
        await engine.close()


@pytest.mark.slow
async def test_unknown_kid_refetch_replans_the_background_refresh(
    issuer: FakeIssuer,
) -> None:
    issuer.cache_control = "max-age=3600"
    engine = await engine_for(issuer, max_refresh_interval=3600)
    try:
        key_set = engine.keysets.get(issuer.url)
        new = issuer.rotate()
        issuer.cache_control = (
            "max-age=1"  # the IdP shortens the lifetime around a rotation
        )
        assert await engine.authenticator.authenticate(issuer.token(new)) is not None
        fetched = issuer.counts["jwks"]
        # Without re-planning the next background fetch would be ~50 minutes away.
        async with asyncio.timeout(5):
            while issuer.counts["jwks"] == fetched:
                await asyncio.sleep(0.05)
        assert key_set.ready
    finally:
        await engine.close()


@pytest.mark.slow
async def test_outage_keeps_keys_and_readyz_says_so(issuer: FakeIssuer) -> None:
    engine = await engine_for(
        issuer, max_refresh_interval=0.3, default_refresh_interval=0.3
    )
    try:
        token = issuer.token()
        engine.authenticator.cache.clear()
        issuer.go_down(503)
        with pytest.raises(errors.KeySetError):
            await engine.keysets.get(issuer.url).refresh(force=True)
        engine.authenticator.cache.clear()
        assert await engine.authenticator.authenticate(token) is not None, (
            "cached keys still verify"
        )
        app = probe_app(engine)
        handler = next(
            r.handler
            for r in app.router.routes()
            if r.resource and r.resource.canonical == "/readyz"
        )
        resp = await handler(None)  # type: ignore[arg-type]
        assert isinstance(resp, web.Response)
        assert resp.status == 200
        assert resp.text is not None
        assert "serving cached keys" in resp.text
        assert "503" in resp.text
        issuer.come_up()
        await engine.keysets.get(issuer.url).refresh(force=True)
        resp = await handler(None)  # type: ignore[arg-type]
        assert isinstance(resp, web.Response)
        assert "warning" not in (resp.text or "")
    finally:
        await engine.close()


async def test_unknown_kid_during_an_outage_is_temporary_not_a_refusal(
    issuer: FakeIssuer,
) -> None:
    engine = await engine_for(issuer)
    try:
        issuer.go_down(503)
        new = issuer.rotate()  # published at the IdP, but we cannot fetch it now
        token = issuer.token(new)
        with pytest.raises(errors.KeysUnavailable) as info:
            await engine.authenticator.authenticate(token)
        assert info.value.temporary
        assert "refreshing them fails" in str(info.value)
        # Not remembered as a refusal: once the issuer is back, the same token passes.
        issuer.come_up()
        await engine.keysets.get(issuer.url).refresh(force=True)
        assert await engine.authenticator.authenticate(token) is not None
    finally:
        await engine.close()
