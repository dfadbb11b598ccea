"""Helpers of the end-to-end tests: the article's settings, logins, probes, waits."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import (
    AuthConfig,
    CacheSettings,
    add_auth_arguments,
    auth_config_from_args,
)
from tests.e2e.harness import CLIENT_ID, OktaProvider
from tests.e2e.login import login
from tests.support.running_webhook import RunningWebhook, parse_review, review_body

__all__ = [
    "Verdict",
    "article_config",
    "article_flags",
    "id_token",
    "metric",
    "probe",
    "review",
    "review_at",
    "wait_http_ok",
    "wait_until",
]

T = TypeVar("T")


def article_flags(issuer: str, client_id: str = CLIENT_ID) -> list[str]:
    """The four kube-apiserver flags of the reference article, for our issuer."""
    return [
        f"--oidc-issuer-url={issuer}",
        f"--oidc-client-id={client_id}",
        "--oidc-username-claim=sub",
        "--oidc-groups-claim=groups",
    ]


def article_config(
    issuer: str,
    *,
    keyset: dict[str, Any] | None = None,
    cache: CacheSettings | None = None,
    leeway: float | None = None,
) -> AuthConfig:
    """``article_flags`` parsed by the real flag code, with test-sized bounds.

    The CLI keeps production bounds (a key set is refreshed at most once a
    minute), which a test of seconds cannot wait for; the in-process webhook
    takes the same configuration with shorter ones.
    """
    parser = argparse.ArgumentParser()
    add_auth_arguments(parser)
    config = auth_config_from_args(parser.parse_args(article_flags(issuer)))
    assert config is not None
    if keyset:
        config = replace(config, keyset=replace(config.keyset, **keyset))
    if cache is not None:
        config = replace(config, cache=cache)
    if leeway is not None:
        config = replace(config, leeway=leeway)
    return config


async def id_token(
    provider: OktaProvider, username: str, *, client_id: str = CLIENT_ID
) -> str:
    """Log ``username`` in through the browser steps and return the ID token."""
    user = provider.users[username]
    tokens = await login(
        provider.issuer, client_id=client_id, username=username, password=user.password
    )
    return tokens.id_token


async def probe(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


async def wait_until(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str,
) -> T:
    """Await ``check()`` until it returns a truthy value, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_http_ok(url: str, timeout: float = 15.0) -> None:
    """Block until ``url`` answers 200 (loopback probes only), within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = f"http {err.code}: {err.read().decode(errors='replace')}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready within {timeout}s: {last}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A TokenReview answer's status, parsed by the ``kubernetes`` models."""

    authenticated: bool
    username: str | None = None
    groups: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def parse(cls, text: str) -> Verdict:
        answer = parse_review(text)
        assert answer.api_version == "authentication.k8s.io/v1"
        status = answer.status
        assert status is not None, text
        user = status.user
        return cls(
            authenticated=bool(status.authenticated),
            username=None if user is None else user.username,
            groups=tuple(() if user is None else user.groups or ()),
            error=status.error,
        )


async def review_at(session: aiohttp.ClientSession, url: str, token: str) -> Verdict:
    """POST a v1 TokenReview for ``token`` to ``url``/authenticate, as kube-apiserver."""
    async with session.post(
        f"{url}/authenticate",
        data=json.dumps(review_body(token)),
        headers={"Content-Type": "application/json"},
    ) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        return Verdict.parse(text)


async def review(webhook: RunningWebhook, token: str) -> Verdict:
    """``review_at`` for an in-process webhook."""
    return await review_at(webhook.session, webhook.url, token)
