"""Header hygiene as tables (``proxy.headers``): no sockets.

tests/test_impersonate.py checks the same rules end to end (what the fake API
server receives); these name each rule on its own.
"""

from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict

from proxy.headers import IPNetwork, forward_headers, response_headers, trusted

NETS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
)


@pytest.mark.parametrize(
    ("peer", "networks", "expected"),
    [
        ("10.1.2.3", NETS, True),
        ("11.1.2.3", NETS, False),
        ("fd00::1", NETS, True),
        ("fd00::1%eth0", NETS, True),
        ("::ffff:10.0.0.1", NETS, True),
        ("10.1.2.3", (), False),
        (None, NETS, False),
        ("not-an-address", NETS, False),
        ("/run/proxy.sock", NETS, False),
    ],
    ids=[
        "inside",
        "outside",
        "v6",
        "v6-zone",
        "v4-mapped",
        "no-networks",
        "no-peer",
        "garbage",
        "unix-socket",
    ],
)
def test_trusted(
    peer: str | None, networks: tuple[IPNetwork, ...], expected: bool
) -> None:
    assert trusted(peer, networks) is expected


CLIENT = [
    ("Host", "proxy"),
    ("Authorization", "Bearer t"),
    ("Accept", "application/json"),
    ("Connection", "keep-alive, X-Drop, Content-Length, Impersonate-User"),
    ("Keep-Alive", "5"),
    ("X-Drop", "1"),
    ("Content-Length", "3"),
    ("Transfer-Encoding", "chunked"),
    ("Expect", "100-continue"),
    ("Audit-ID", "mine"),
    ("X-Remote-User", "root"),
    ("X-Remote-Extra-Scopes", "all"),
    ("Impersonate-User", "bob"),
    ("Sec-WebSocket-Protocol", "v5"),
    ("X-Forwarded-For", "1.2.3.4"),
    ("User-Agent", "kubectl"),
]


@pytest.mark.parametrize(
    ("passthrough", "protocols", "peer", "expected"),
    [
        (
            False,
            None,
            "192.0.2.1",
            [
                ("Accept", "application/json"),
                ("Sec-WebSocket-Protocol", "v5"),
                ("User-Agent", "kubectl"),
                ("X-Forwarded-For", "192.0.2.1"),
            ],
        ),
        (
            True,
            None,
            "192.0.2.1",
            [
                ("Authorization", "Bearer t"),
                ("Accept", "application/json"),
                ("Impersonate-User", "bob"),
                ("Sec-WebSocket-Protocol", "v5"),
                ("User-Agent", "kubectl"),
                ("X-Forwarded-For", "192.0.2.1"),
            ],
        ),
        (
            False,
            ["v5.channel.k8s.io"],
            "10.0.0.9",
            [
                ("Accept", "application/json"),
                ("User-Agent", "kubectl"),
                ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
                ("X-Forwarded-For", "1.2.3.4, 10.0.0.9"),
            ],
        ),
        (
            False,
            [],
            None,
            [("Accept", "application/json"), ("User-Agent", "kubectl")],
        ),
    ],
    ids=["impersonate", "passthrough", "token-subprotocol-trusted-peer", "no-peer"],
)
def test_forward_headers(
    passthrough: bool,
    protocols: list[str] | None,
    peer: str | None,
    expected: list[tuple[str, str]],
) -> None:
    """Hop-by-hop names (and what ``Connection`` names, never a framing or
    identity field), framing, ``Host``, ``Expect``, ``Audit-ID``, request-header
    authentication names and an untrusted ``X-Forwarded-For`` never go on;
    ``Authorization`` and ``Impersonate-*`` only under passthrough.
    """
    got = forward_headers(
        CIMultiDict(CLIENT),
        peer,
        NETS,
        passthrough=passthrough,
        protocols=protocols,
    )
    assert got == expected


def test_response_headers() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "10"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Upgrade", "websocket"),
            ("Audit-Id", "theirs"),
            ("Warning", "a"),
            ("Warning", "b"),
        ]
    )
    assert list(response_headers(upstream).items()) == [
        ("Content-Type", "application/json"),
        ("Audit-Id", "theirs"),
        ("Warning", "a"),
        ("Warning", "b"),
    ]
    relayed = response_headers(upstream, upgrade=True, length=7, audit_id="ours")
    assert relayed.getall("Audit-Id") == ["ours"]
    assert relayed["Content-Length"] == "7"
    assert relayed["Connection"] == "Upgrade"
    assert relayed["Upgrade"] == "websocket"
    assert "Transfer-Encoding" not in relayed
    assert "X-Hop" not in relayed
