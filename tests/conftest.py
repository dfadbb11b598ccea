"""Shared fixtures: the fake issuer (``issuer``, ``tls_issuer``, ``issuer_ca``);
and the ``slow`` tier: ``make test-fast`` runs what is not marked ``slow``.

A test that drives the real kubectl (``kubectl``) or the npm OpenID provider
(``e2e``) is slow by nature and is marked here; any other test that starts a
subprocess, builds an image, or takes over about a second carries
``@pytest.mark.slow`` itself.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fakes.fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("kubectl"):
            item.add_marker(pytest.mark.slow)
