"""Helpers that run the real service in process for the tests (not fakes)."""
