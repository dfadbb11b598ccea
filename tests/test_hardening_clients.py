"""Hostile clients against the real listeners (``serve()``), webhook and proxy.

Many idle connections, slowloris, oversized headers, clients that vanish in the
middle of a stream, floods of random ``kid``s and of replayed invalid tokens,
and headers that must never reach the API server. Everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import secrets
import ssl
from pathlib import Path
from typing import Any

import pytest

from proxy.impersonate import ProxySettings
from tests.fakes.issuer import FakeIssuer
from tests.hardening_harness import PODS, Gate, running_gate, wait_until
from tests.keygen import claims_for, new_key, sign


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def normal_request(gate: Gate) -> None:
    """One ordinary review or proxied GET, answered correctly within 10 s."""
    async with asyncio.timeout(10):
        if gate.mode == "webhook":
            status, answer = await gate.review(gate.token())
            assert status == 200
            assert answer["status"]["authenticated"] is True
        else:
            status, _ = await gate.get(
                headers={"Authorization": f"Bearer {gate.token()}"}
            )
            assert status == 200


async def closed_without_answer(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (bounded: 5 s)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, ssl.SSLError):
        return b""


# --------------------------------------------------------------------------
# Many connections, slow clients


@pytest.mark.parametrize("mode", ["webhook", "proxy"])
async def test_hundreds_of_idle_tls_connections_do_not_starve_a_request(
    issuer: FakeIssuer, tmp_path: Path, mode: Any
) -> None:
    async with running_gate(
        tmp_path, mode, issuer, serve_settings={"idle_timeout": 30.0}
    ) as gate:
        opened = await asyncio.wait_for(
            asyncio.gather(*(gate.open_tls() for _ in range(300))), 30
        )
        try:
            await normal_request(gate)
            # Still held open by the server (no request yet, deadline far away).
            reader, _ = opened[0]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.2)
        finally:
            for _, writer in opened:
                writer.transport.abort()


SLOW_CLIENTS = [
    ("tcp-without-tls-handshake", False, []),
    ("tls-without-request", True, []),
    ("partial-request-line", True, [b"GET /api/v1/na"]),
    (
        "header-trickle",
        True,
        [b"GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n"]
        + [b"X-Slow: 1\r\n"] * 25,
    ),
]


@pytest.mark.parametrize(
    ("tls", "chunks"),
    [c[1:] for c in SLOW_CLIENTS],
    ids=[c[0] for c in SLOW_CLIENTS],
)
async def test_slowloris_on_the_proxy_is_cut_off(
    issuer: FakeIssuer, tmp_path: Path, tls: bool, chunks: list[bytes]
) -> None:
    async with running_gate(
        tmp_path, "proxy", issuer, serve_settings={"idle_timeout": 0.5}
    ) as gate:
        assert gate.fake is not None
        host, port = gate.host_port
        if tls:
            reader, writer = await gate.open_tls()
        else:
            reader, writer = await asyncio.open_connection(host, port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for chunk in chunks:
            if reader.at_eof():
                break
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(chunk)
                await writer.drain()
            await asyncio.sleep(0.1)
        assert await closed_without_answer(reader) == b""
        assert loop.time() - started < 4.0, "closed by the first-request deadline"
        writer.transport.abort()
        assert gate.fake.requests == []
        await normal_request(gate)


# --------------------------------------------------------------------------
# Oversized headers


def _oversized_jwt(marker: str) -> str:
    header = _b64(json.dumps({"alg": "RS256", "kid": marker}).encode())
    return f"{header}.{_b64(b'x' * 30_000)}.{_b64(b'sig')}"


#: (name, headers made from a unique marker, status). A valid bearer token is
#: added unless the case brings its own ``Authorization``. Every one is the
#: listener's 431 (RFC 6585): a field over ``max_field_bytes`` (20 KiB), more
#: fields than it takes, or a head over its total.
OVERSIZED: list[tuple[str, Any, int]] = [
    ("one-huge-value", lambda m: [("X-Big", m + "v" * 30_000)], 431),
    ("one-huge-name", lambda m: [("X-" + m + "n" * 30_000, "v")], 431),
    ("too-many-headers", lambda m: [(f"X-{m}-{i}", "v") for i in range(5000)], 431),
    (
        "many-large-headers-over-the-total",
        lambda m: [(f"X-{m}-{i}", "v" * 7000) for i in range(40)],
        431,
    ),
    (
        "authorization-over-the-field-limit",
        lambda m: [("Authorization", f"Bearer {_oversized_jwt(m)}")],
        431,
    ),
]


@pytest.mark.parametrize(
    ("make", "code"),
    [c[1:] for c in OVERSIZED],
    ids=[c[0] for c in OVERSIZED],
)
async def test_oversized_headers_are_refused_before_anything_goes_upstream(
    issuer: FakeIssuer,
    tmp_path: Path,
    make: Any,
    code: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "m" + secrets.token_hex(12)
    async with running_gate(tmp_path, "proxy", issuer) as gate:
        assert gate.fake is not None
        headers = make(marker)
        if all(name != "Authorization" for name, _ in headers):
            headers.append(("Authorization", f"Bearer {gate.token()}"))
        async with gate.client.get(gate.url + PODS, headers=headers) as r:
            assert r.status == code
            body = await r.text()
            assert marker not in body, "the answer quotes the refused header"
            assert (await r.json())["kind"] == "Status"
        assert gate.fake.requests == []
        await normal_request(gate)
    trace = "\n".join(
        f"{rec.getMessage()} {vars(rec)} {rec.exc_text or ''}" for rec in caplog.records
    )
    assert marker not in trace, "the refused header's bytes reached a log line"
    if code == 431:
        refused = [
            r
            for r in caplog.records
            if r.getMessage() == "request refused by the http parser"
        ]
        assert refused
        assert all(r.levelno == logging.INFO for r in refused)
        assert all(r.exc_info is None for r in refused)


# --------------------------------------------------------------------------
# Clients that vanish mid-stream


STREAMS = {
    "watch": f"GET {PODS}?watch=1 HTTP/1.1\r\n",
    "log": f"GET {PODS}/p/log?follow=true HTTP/1.1\r\n",
    "exec": f"GET {PODS}/p/exec?command=cat&stdin=true&stdout=true HTTP/1.1\r\n"
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}\r\n"
    "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n",
}


@pytest.mark.parametrize("kind", list(STREAMS), ids=["watch", "log-follow", "exec"])
async def test_client_vanishing_mid_stream_leaves_nothing_behind(
    issuer: FakeIssuer, tmp_path: Path, kind: str
) -> None:
    async with running_gate(tmp_path, "proxy", issuer) as gate:
        assert gate.fake is not None
        token = gate.token()
        await normal_request(gate)  # warm the pool, the cache and the metrics
        gauge = "kube_oidc_gate_inflight_streams"
        baseline = len(asyncio.all_tasks())
        reader, writer = await gate.open_tls()
        head = (
            STREAMS[kind] + f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        writer.write(head.encode())
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(
            b"HTTP/1.1 101 " if kind == "exec" else b"HTTP/1.1 200 "
        )
        if kind != "exec":
            await asyncio.wait_for(reader.readuntil(b"\n"), 5)  # a chunk has arrived
        await wait_until(lambda: gate.value(gauge, kind=kind) == 1, what="stream open")
        assert len(asyncio.all_tasks()) > baseline
        writer.transport.abort()
        await wait_until(lambda: gate.value(gauge, kind=kind) == 0, what="gauge at 0")
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= baseline,
            what="proxy and upstream handlers finished",
        )
        await normal_request(gate)


# --------------------------------------------------------------------------
# Floods at the webhook


def _random_kid_token(issuer_url: str) -> str:
    header = {"alg": "RS256", "kid": secrets.token_urlsafe(12)}
    claims = claims_for(issuer_url, groups=["devs"])
    return ".".join(
        [
            _b64(json.dumps(header).encode()),
            _b64(json.dumps(claims).encode()),
            _b64(secrets.token_bytes(256)),
        ]
    )


async def test_random_kid_flood_costs_the_issuer_one_fetch(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with running_gate(tmp_path, "webhook", issuer) as gate:
        issuer.reset_counts()
        flood = [_random_kid_token(issuer.url) for _ in range(500)]
        valid = [gate.token(jti=f"j{i}") for i in range(20)]
        requests = [(t, False) for t in flood] + [(t, True) for t in valid]
        random.shuffle(requests)

        async def one(token: str, ok: bool) -> None:
            status, answer = await gate.review(token)
            assert status == 200
            assert answer["status"]["authenticated"] is ok
            if not ok:
                assert answer["status"]["error"].startswith("unknown_kid:")

        await asyncio.wait_for(asyncio.gather(*(one(t, ok) for t, ok in requests)), 30)
        assert issuer.counts["jwks"] <= 1
        assert issuer.counts["discovery"] <= 1
        assert (
            gate.value(
                "kube_oidc_gate_authentications_total",
                result="rejected",
                reason="unknown_kid",
            )
            == 500
        )
        assert (
            gate.value("kube_oidc_gate_authentications_total", result="ok", reason="ok")
            == 20
        )


async def test_replayed_invalid_tokens_are_validated_once_each(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    attacker = new_key("RS256", kid=issuer.keys[0].kid)
    distinct = [
        sign(attacker, claims_for(issuer.url, groups=["devs"], jti=f"forged-{i}"))
        for i in range(20)
    ]
    async with running_gate(tmp_path, "webhook", issuer) as gate:
        count = "kube_oidc_gate_validation_duration_seconds_count"
        before = gate.value(count, result="rejected")

        async def one(token: str) -> None:
            status, answer = await gate.review(token)
            assert status == 200
            assert answer["status"]["authenticated"] is False
            assert answer["status"]["error"].startswith("bad_signature:")

        await asyncio.gather(*(one(t) for t in distinct))
        replays = distinct * 9
        random.shuffle(replays)
        await asyncio.wait_for(asyncio.gather(*(one(t) for t in replays)), 30)
        assert gate.value(count, result="rejected") - before == len(distinct)
        hits = gate.value("kube_oidc_gate_token_cache_requests_total", outcome="hit")
        assert hits >= len(replays)


# --------------------------------------------------------------------------
# Headers that must not reach the API server (the GET path in impersonation
# mode is covered by test_impersonate; these are the other paths)

SMUGGLED = {
    "X-Remote-User": "admin",
    "X-Remote-Group": "system:masters",
    "X-Remote-Extra-Scopes": "all",
    "Proxy-Authorization": "Basic YWRtaW46YWRtaW4=",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Trailer": "X-Late",
    "Proxy-Connection": "keep-alive",
}


async def _smuggle_exec(gate: Gate, token: str) -> None:
    ws = await gate.client.ws_connect(
        gate.url + PODS + "/p/exec?command=cat&stdin=true",
        protocols=["v5.channel.k8s.io"],
        headers={**SMUGGLED, "Authorization": f"Bearer {token}"},
    )
    await ws.close()


async def _smuggle_h2c(gate: Gate, token: str) -> None:
    headers = {
        **SMUGGLED,
        "Authorization": f"Bearer {token}",
        "X-Nominated": "dropped because Connection names it",
        "Connection": "Upgrade, HTTP2-Settings, X-Nominated",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
    }
    async with gate.client.get(gate.url + PODS, headers=headers) as r:
        assert r.status == 200


async def _smuggle_passthrough(gate: Gate, token: str) -> None:
    foreign = sign(new_key(), claims_for("https://other.test"))
    assert gate.fake is not None
    gate.fake.user_tokens[foreign] = {"username": "carol", "groups": []}
    headers = {
        **SMUGGLED,
        "Authorization": f"Bearer {foreign}",
        "X-Nominated": "dropped because Connection names it",
        "Connection": "X-Nominated",
    }
    async with gate.client.get(gate.url + PODS, headers=headers) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "send",
    [_smuggle_exec, _smuggle_h2c, _smuggle_passthrough],
    ids=["websocket-exec", "h2c-upgrade-attempt", "token-passthrough"],
)
async def test_spoofable_and_hop_by_hop_headers_never_reach_upstream(
    issuer: FakeIssuer, tmp_path: Path, send: Any
) -> None:
    async with running_gate(
        tmp_path, "proxy", issuer, proxy_settings=ProxySettings(token_passthrough=True)
    ) as gate:
        assert gate.fake is not None
        await send(gate, gate.token())
        (seen,) = gate.fake.requests
        for name in (*SMUGGLED, "X-Nominated", "HTTP2-Settings"):
            assert name not in seen.headers, name
        if send is _smuggle_h2c:
            assert "Upgrade" not in seen.headers
            assert "upgrade" not in seen.headers.get("Connection", "").lower()
        if send is _smuggle_passthrough:
            assert "Impersonate-User" not in seen.headers
        else:
            assert seen.headers["Impersonate-User"] == "oidc:00u1alice"
            assert seen.headers.getall("Authorization") == ["Bearer proxy-sa-token-1"]
