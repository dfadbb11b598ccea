"""The proxy on its one listener (``proxy.http1``, llhttp): requests of every
kind pipelined on one connection, streamed answers broken off on either side,
remembered refusals, and answers without a body.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from proxy.impersonate import ProxySettings
from proxy.metrics import Metrics
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver_harness import (
    PODS,
    Stack,
    client_ssl,
    run_proxy,
    upstream_kubeconfig,
)

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _sample(metrics: Metrics, name: str, result: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("outcome") == result:
                return sample.value
    return 0.0


def _sample_labels(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


_ACCESS_FIELDS = frozenset(
    {
        "user",
        "groups_count",
        "verb",
        "method",
        "path",
        "status",
        "mode",
        "reason",
        "detail",
    }
)


# --------------------------------------------------------------------------
# One connection, every kind of request


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response off a raw stream: status and body (length or chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        return status, await asyncio.wait_for(
            reader.readexactly(int(headers["content-length"])), 5
        )
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    for _ in range(10_000):
        size = int((await asyncio.wait_for(reader.readline(), 5)).strip(), 16)
        if size == 0:
            await asyncio.wait_for(reader.readline(), 5)
            return status, body
        body += await asyncio.wait_for(reader.readexactly(size), 5)
        await asyncio.wait_for(reader.readline(), 5)
    raise AssertionError("unbounded chunked body")


@pytest.mark.slow
async def test_pipelined_requests_of_every_kind_are_answered_in_order(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca) as stack:
        host = "127.0.0.1"
        port = int(stack.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=client_ssl(ca), server_hostname=host
            ),
            5,
        )
        auth = f"Authorization: Bearer {stack.token()}\r\n"
        get = f"GET {PODS} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()
        # A chunked body, streamed through to the API server.
        post = (
            f"POST {CONFIGMAPS} HTTP/1.1\r\nHost: {host}\r\n{auth}"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ).encode()
        # All three in one write: pipelined.
        writer.write(get + post + get)
        statuses = []
        bodies = []
        for _ in range(3):
            status, body = await _read_response(reader)
            statuses.append(status)
            bodies.append(body)
        writer.close()
        assert statuses == [200, 201, 200]
        assert b'"PodList"' in bodies[0]
        assert bodies[0] == bodies[2]
        assert b'"bytes": 11' in bodies[1] or b'"bytes":11' in bodies[1]
        assert [r.method for r in stack.fake.requests] == ["GET", "POST", "GET"]


# --------------------------------------------------------------------------
# Streamed answers broken off


@pytest.fixture
async def small_big(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Stack]:
    async with run_proxy(tmp_path, ca) as stack:
        stack.fake.big_size = 8 * 1024 * 1024
        yield stack


@pytest.mark.slow
async def test_upstream_dying_mid_list_cuts_the_client(
    small_big: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    small_big.fake.big_abort_after = 1024 * 1024
    async with small_big.client.get(
        small_big.url + CONFIGMAPS, headers=small_big.bearer()
    ) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 10)
    lines = [vars(rec) for rec in caplog.records if rec.name == "proxy.access"]
    assert [(x["status"], x.get("outcome")) for x in lines] == [(200, "upstream_error")]


@pytest.mark.slow
async def test_client_leaving_mid_list_is_logged_and_the_proxy_goes_on(
    small_big: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    ctx: ssl.SSLContext = client_ssl(small_big.ca)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as client,
        client.get(small_big.url + CONFIGMAPS, headers=small_big.bearer()) as r,
    ):
        assert r.status == 200
        await asyncio.wait_for(r.content.readexactly(64 * 1024), 5)
        r.close()
    for _ in range(100):
        lines = [vars(rec) for rec in caplog.records if rec.name == "proxy.access"]
        if lines:
            break
        await asyncio.sleep(0.05)
    assert [(x["status"], x.get("outcome")) for x in lines] == [(200, "client_closed")]
    # The proxy still serves.
    async with small_big.client.get(
        small_big.url + PODS, headers=small_big.bearer()
    ) as r:
        assert r.status == 200


# --------------------------------------------------------------------------
# Remembered refusals are answered at once, the same way each time


@pytest.mark.slow
@pytest.mark.parametrize(
    "claims",
    [{"exp": 1_000_000}, {"aud": "someone-else"}],
    ids=["expired", "wrong-audience"],
)
async def test_a_replayed_refusal_is_answered_alike_from_the_cache(
    tmp_path: Path,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    claims: dict[str, Any],
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with run_proxy(tmp_path, ca) as stack:
        bad = {"Authorization": f"Bearer {stack.token(**claims)}"}
        answers = []
        for _ in range(3):
            async with stack.client.get(stack.url + PODS, headers=bad) as r:
                answers.append((r.status, await r.read()))
        hits = {
            result: _sample(
                stack.metrics, "kube_oidc_gate_token_cache_requests_total", result
            )
            for result in ("miss", "hit")
        }
    assert answers[0][0] == 401
    assert answers == [answers[0]] * 3
    lines = [vars(rec) for rec in caplog.records if rec.name == "proxy.access"]
    assert len(lines) == 3
    assert {(x["status"], x["detail"]) for x in lines} == {(401, lines[0]["detail"])}
    assert lines[0]["detail"]
    assert hits == {"miss": 1, "hit": 2}
    assert stack.fake.requests == []


async def test_replayed_refusals_are_logged_up_to_the_limit_then_counted(
    tmp_path: Path,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    settings = ProxySettings(refusal_log_limit=2)
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        bad = {"Authorization": f"Bearer {stack.token(exp=1_000_000)}"}
        good = {"Authorization": f"Bearer {stack.token()}"}
        statuses = []
        for headers in [bad] * 8 + [good] * 3 + [{}] * 3:
            async with stack.client.get(stack.url + PODS, headers=headers) as r:
                statuses.append(r.status)
                await r.read()
        counted = {
            code: _sample_labels(
                stack.metrics, "kube_oidc_gate_http_requests_total", code=code
            )
            for code in ("200", "401")
        }
    # Every request is answered and counted; only the log lines are limited.
    assert statuses == [401] * 8 + [200] * 3 + [401] * 3
    assert counted == {"200": 3, "401": 11}
    lines = [vars(rec) for rec in caplog.records if rec.name == "proxy.access"]
    requests = [x for x in lines if x["msg"] == "request"]
    summaries = [x for x in lines if x["msg"] == "refusals not logged"]
    by_cause: dict[str, int] = {}
    for x in requests:
        if x["status"] == 401:
            # A refused token's cause is its reason code; others, the detail.
            cause = x.get("reason") or x["detail"]
            by_cause[cause] = by_cause.get(cause, 0) + 1
    for x in summaries:
        assert x["status"] == 401
        assert x["period_s"] == 1.0
        by_cause[x["cause"]] = by_cause.get(x["cause"], 0) + x["not_logged"]
    # Each refusal is either in the log or in a count, per cause; accepted
    # requests are all there.
    assert by_cause == {"expired": 8, "no bearer token": 3}
    assert [x["status"] for x in requests].count(200) == 3
    # Two full lines per cause and period: the 8 replays took under 4 periods.
    expired_lines = [x for x in requests if x.get("reason") == "expired"]
    assert 2 <= len(expired_lines) < 8
    assert any(x["cause"] == "expired" for x in summaries)


# --------------------------------------------------------------------------
# Answers without a body


@pytest.mark.slow
@pytest.mark.parametrize(
    ("answer", "status", "length"),
    [
        (b"HTTP/1.1 204 No Content\r\nAudit-Id: a1\r\n\r\n", 204, None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nAudit-Id: a1\r\n\r\n", 200, "0"),
        (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nAudit-Id: a1\r\n\r\n", 304, None),
    ],
    ids=["204", "empty-200", "304"],
)
async def test_bodiless_answers_are_relayed_without_a_body(
    tmp_path: Path,
    ca: trustme.CA,
    answer: bytes,
    status: int,
    length: str | None,
) -> None:
    async def scripted(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        for _ in range(10):
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except (asyncio.IncompleteReadError, TimeoutError):
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(scripted, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        for method in ("GET", "HEAD"):
            (tmp_path / method).mkdir()
            config = upstream_kubeconfig(
                tmp_path / method / "kc", f"http://127.0.0.1:{port}", b""
            )
            async with run_proxy(
                tmp_path / method,
                ca,
                upstream=Upstream(UpstreamSettings(kubeconfig=str(config))),
            ) as stack:
                host = "127.0.0.1"
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host,
                        int(stack.url.rsplit(":", 1)[1]),
                        ssl=client_ssl(ca),
                        server_hostname=host,
                    ),
                    5,
                )
                get = (
                    f"{method} {PODS}/p HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {stack.token()}\r\n\r\n"
                ).encode()
                # Twice on one connection: the first answer must end where
                # its head does, or the second is read as its body.
                writer.write(get + get)
                for _ in range(2):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    lines = head.decode("latin-1").split("\r\n")
                    assert lines[0].split(" ")[1] == str(status), method
                    fields = {
                        k.strip().lower(): v.strip()
                        for k, _, v in (x.partition(":") for x in lines[1:] if x)
                    }
                    assert "transfer-encoding" not in fields, method
                    assert fields.get("content-length") == length, method
                    assert fields["audit-id"] == "a1"
                writer.close()
    finally:
        listener.close()
        await listener.wait_closed()
