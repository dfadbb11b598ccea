"""docs/THREAT_MODEL.md stays true: the tests it cites exist, its defaults are ours.

A changed default or a renamed test fails here, so the threat model is revised
in the same change (the aiohttp THREAT_MODEL habit).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.app import ServeSettings
from proxy.cli import build_parser
from proxy.config import AuthConfig, CacheSettings, KeySetSettings
from proxy.impersonate import ProxySettings
from proxy.webhook import WebhookSettings

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "THREAT_MODEL.md").read_text()
CITED = sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", DOC)))


def test_the_threat_model_cites_tests() -> None:
    assert len(CITED) >= 40


@pytest.mark.parametrize(
    ("path", "name"), CITED, ids=[f"{p.removeprefix('tests/')}::{n}" for p, n in CITED]
)
def test_every_cited_test_exists(path: str, name: str) -> None:
    source = (ROOT / path).read_text()
    assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), (path, name)


def _kib(n: int) -> str:
    return f"{n // 1024} KiB"


def _s(seconds: float) -> str:
    return f"{seconds:g} s"


def _cli_default(*argv: str, dest: str) -> object:
    return getattr(build_parser().parse_args(list(argv)), dest)


_AUTH = AuthConfig(authenticators=())
_KEYS = KeySetSettings()
_CACHE = CacheSettings()
_SERVE = ServeSettings()
_PROXY = ProxySettings()
_HOOK = WebhookSettings()
_PROXY_ARGS = ("proxy", "--oidc-issuer-url", "https://x.test", "--oidc-client-id", "k")

#: (row of the defaults table, what it must say, from the code)
DEFAULTS: list[tuple[str, list[str]]] = [
    ("token size cap", [_kib(_AUTH.max_token_bytes)]),
    ("clock leeway", [_s(_AUTH.leeway)]),
    (
        "refusal cache / acceptance cache",
        [
            _s(_CACHE.failure_ttl),
            _s(_CACHE.success_ttl),
            f"{_CACHE.max_entries:,}".replace(",", " "),
        ],
    ),
    (
        "unknown-`kid` refetch cooldown / memory",
        [_s(_KEYS.unknown_kid_cooldown), _s(_KEYS.unknown_kid_ttl)],
    ),
    (
        "issuer fetch timeout / document cap",
        [_s(_KEYS.fetch_timeout), _kib(_KEYS.max_document_bytes)],
    ),
    (
        "key refresh",
        [
            _s(_KEYS.min_refresh_interval),
            f"{_KEYS.max_refresh_interval / 3600:g} h",
            f"{_KEYS.default_refresh_interval / 60:g} min",
            _s(_KEYS.retry_min),
            _s(_KEYS.retry_max),
        ],
    ),
    ("first-request deadline (TLS handshake and headers)", [_s(_SERVE.idle_timeout)]),
    ("header limits", [_kib(_SERVE.max_field_bytes), _kib(_PROXY.max_header_bytes)]),
    (
        "TokenReview body",
        [f"{_HOOK.max_body_bytes // 2**20} MiB", _s(_HOOK.body_timeout)],
    ),
    (
        "proxy timeouts",
        [
            _s(_PROXY.connect_timeout),
            _s(_PROXY.request_timeout),
            f"{_PROXY.stream_idle_timeout / 3600:g} h",
        ],
    ),
    (
        "shutdown grace period",
        [_s(float(str(_cli_default(*_PROXY_ARGS, dest="shutdown_grace_period"))))],
    ),
]


@pytest.mark.parametrize(
    ("row", "says"), DEFAULTS, ids=[d[0].split(" /")[0] for d in DEFAULTS]
)
def test_defaults_table_matches_the_code(row: str, says: list[str]) -> None:
    (line,) = [x for x in DOC.splitlines() if x.startswith(f"| {row} |")]
    for value in says:
        assert value in line, (row, value, line)


def test_fail_closed_defaults_are_the_documented_ones() -> None:
    assert _PROXY.allow_client_impersonation is False
    assert _PROXY.allow_reserved_groups == ()
    assert _PROXY.token_passthrough is False
    (line,) = [x for x in DOC.splitlines() if x.startswith("| client impersonation")]
    assert "refused / refused / off" in line
