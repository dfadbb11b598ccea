"""Fixtures of the end-to-end tests: the Okta stand-in, started by the tests.

``okta`` is one provider for the whole session, for tests that only read from
it (log in, validate). Tests that change the provider (rotate its keys, stop
it, disable a user) take ``fresh_okta`` instead: a provider of their own, not
yet started, stopped by its PID afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.harness import OktaProvider
from tests.keygen import new_key


@pytest.fixture(scope="session")
def okta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OktaProvider]:
    provider = OktaProvider(workdir=tmp_path_factory.mktemp("okta"))
    provider.start([new_key("RS256", kid="okta-session-key")])
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def fresh_okta(tmp_path: Path) -> Iterator[OktaProvider]:
    provider = OktaProvider(workdir=tmp_path / "okta")
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s
