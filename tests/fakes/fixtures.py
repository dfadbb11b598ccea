"""Pytest fixtures for the fake issuer; wire in with ``pytest_plugins`` in conftest.

``issuer`` is a plain-http fake issuer on 127.0.0.1 with one RS256 key;
``tls_issuer`` is the same over https with a certificate from ``issuer_ca``
(pass ``tls_issuer.ca_pem`` as the issuer's ``certificate_authority``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trustme

from tests.fakes.issuer import FakeIssuer, serve_issuer

__all__ = ["issuer", "issuer_ca", "tls_issuer"]


@pytest.fixture(scope="session")
def issuer_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    async with serve_issuer() as fake:
        yield fake


@pytest.fixture
async def tls_issuer(issuer_ca: trustme.CA) -> AsyncIterator[FakeIssuer]:
    async with serve_issuer(tls=issuer_ca) as fake:
        yield fake
