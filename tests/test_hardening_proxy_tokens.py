"""The hostile token corpus, and tokens in odd places, against the real proxy.

The proxy runs exactly as ``kube-oidc-gate proxy`` serves it (``proxy_app`` on
``serve()``'s TLS listener) in front of a fake API server that records every
request. Each hostile token must be answered 401 with a Kubernetes ``Status``
body, reach nothing upstream, cost the issuer no fetch beyond one per
cooldown, and leave no trace of itself in the logs or in the answer.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.impersonate import ProxySettings
from tests.fakes.issuer import FakeIssuer
from tests.hardening_harness import PODS, Gate, running_gate, secrets_of
from tests.hostile import corpus
from tests.keygen import new_key

KEY = new_key("RS256")


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    fake = FakeIssuer(KEY)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def gate(issuer: FakeIssuer, tmp_path: Path) -> AsyncIterator[Gate]:
    # Every refusal's own access line is what these tests read: none is
    # left out for the log limit (tested in test_proxy_listener).
    settings = ProxySettings(refusal_log_limit=0)
    async with running_gate(tmp_path, "proxy", issuer, proxy_settings=settings) as g:
        issuer.reset_counts()
        yield g


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the records say: message, fields, exception text."""
    out = []
    for record in caplog.records:
        out.append(record.getMessage())
        out.append(json.dumps(vars(record), default=str))
    return "\n".join(out)


def refusal_details(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why the proxy refused: the access line of each refused request says,
    as a reason code for a refused token, else in its detail.
    """
    return [
        str(vars(r).get("reason") or vars(r).get("detail"))
        for r in caplog.records
        if r.name == "proxy.access" and "detail" in vars(r)
    ]


def assert_status_401(text: str) -> None:
    body = json.loads(text)
    assert body["kind"] == "Status"
    assert body["status"] == "Failure"
    assert body["code"] == 401
    assert body["reason"] == "Unauthorized"


async def test_corpus_is_refused_with_its_reason_and_nothing_reaches_upstream(
    gate: Gate, issuer: FakeIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert gate.fake is not None
    unknown_kids = 0
    for case in corpus(issuer.url, KEY):
        caplog.clear()
        before = len(gate.fake.requests)
        try:
            status, text = await gate.get(
                headers={"Authorization": f"Bearer {case.token}"}
            )
        except aiohttp.ClientConnectionError:
            # The server may close while a 1 MB header is still being sent.
            status, text = 0, ""
        reached = gate.fake.requests[before:]
        if case.reason == "ok":
            assert status == 200, (case.name, text)
            assert [r.path for r in reached] == [PODS], case.name
            assert reached[0].headers["Impersonate-User"].startswith("oidc:")
            continue
        assert reached == [], case.name
        if len(case.token) > 20 * 1024:
            # Beyond the listener's field limit: 431 before any handler (or
            # the connection cut while the client was still sending).
            assert status in (0, 431), case.name
        else:
            assert status == 401, (case.name, text)
            assert_status_401(text)
            expected = (
                "token of no configured issuer"
                if case.reason == "not_mine"
                else case.reason
            )
            assert refusal_details(caplog) == [expected], case.name
        pieces = secrets_of(case.token)
        trace = logged(caplog)
        for piece in pieces:
            assert piece not in text, case.name
            assert piece not in trace, case.name
        unknown_kids += case.reason == "unknown_kid"
    assert unknown_kids >= 3
    assert issuer.counts["jwks"] <= 1, "unknown kids cost one fetch per cooldown"
    assert issuer.counts["discovery"] <= 1


def _basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"alice:{token}".encode()).decode()


Placement = Callable[[str], tuple[list[tuple[str, str]], dict[str, str]]]

#: (name, headers and query made from a valid token, accepted?)
PLACEMENTS: list[tuple[str, Placement, bool]] = [
    ("bearer-lower-case", lambda t: ([("Authorization", f"bearer {t}")], {}), True),
    ("bearer-upper-case", lambda t: ([("Authorization", f"BEARER {t}")], {}), True),
    ("two-spaces", lambda t: ([("Authorization", f"Bearer  {t}")], {}), False),
    ("tab-separator", lambda t: ([("Authorization", f"Bearer\t{t}")], {}), False),
    ("space-then-tab", lambda t: ([("Authorization", f"Bearer \t{t}")], {}), False),
    ("trailing-word", lambda t: ([("Authorization", f"Bearer {t} x")], {}), False),
    ("bearer-empty", lambda t: ([("Authorization", "Bearer ")], {}), False),
    ("bearer-alone", lambda t: ([("Authorization", "Bearer")], {}), False),
    ("no-scheme", lambda t: ([("Authorization", t)], {}), False),
    (
        "two-authorization-headers",
        lambda t: ([("Authorization", f"Bearer {t}")] * 2, {}),
        False,
    ),
    (
        "valid-then-garbage-header",
        lambda t: ([("Authorization", f"Bearer {t}"), ("Authorization", "x")], {}),
        False,
    ),
    ("query-parameter", lambda t: ([], {"access_token": t}), False),
    ("basic-auth-password", lambda t: ([("Authorization", _basic(t))], {}), False),
    (
        "proxy-authorization",
        lambda t: ([("Proxy-Authorization", f"Bearer {t}")], {}),
        False,
    ),
    ("x-auth-token", lambda t: ([("X-Auth-Token", t)], {}), False),
]


@pytest.mark.parametrize(
    ("make", "accepted"),
    [p[1:] for p in PLACEMENTS],
    ids=[p[0] for p in PLACEMENTS],
)
async def test_token_placement(
    gate: Gate,
    make: Placement,
    accepted: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert gate.fake is not None
    token = gate.token()
    headers, query = make(token)
    async with gate.client.get(gate.url + PODS, headers=headers, params=query) as r:
        status, text = r.status, await r.text()
    if accepted:
        assert status == 200, text
        (seen,) = gate.fake.requests
        assert seen.headers["Impersonate-User"] == "oidc:00u1alice"
        assert seen.headers.getall("Authorization") == ["Bearer proxy-sa-token-1"]
    else:
        assert status == 401, text
        assert_status_401(text)
        assert gate.fake.requests == []
    trace = logged(caplog)
    for piece in secrets_of(token):
        assert piece not in trace
        assert piece not in text
        assert all(piece not in str(r.headers) for r in gate.fake.requests)
