"""Shared fixtures: the fake issuer (``issuer``, ``tls_issuer``, ``issuer_ca``)."""

pytest_plugins = ["tests.fakes.fixtures"]
