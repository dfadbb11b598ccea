"""Process life: SIGTERM drains within the grace period, the configuration is
read once, and nothing blocks the event loop.

The first two run the real ``kube-oidc-gate`` command as a subprocess (stopped
by PID); the last runs the webhook and the proxy in-process under asyncio's
debug mode, which logs every callback that holds the loop too long.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import ssl
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import upstream_kubeconfig
from tests.fakes.issuer import FakeIssuer
from tests.hardening_harness import PODS, running_gate, wait_until
from tests.hostile import corpus
from tests.keygen import new_key
from tests.proc import Proc
from tests.test_cli_webhook import free_port

#: Paths the fake API server answers late: ``finishing`` within the grace
#: period, ``hanging`` never in time.
DELAYS = {PODS + "/finishing": 1.0, PODS + "/hanging": 60.0}


@web.middleware
async def _late(request: web.Request, handler: Handler) -> web.StreamResponse:
    delay = DELAYS.get(request.path, 0.0)
    if delay:
        await asyncio.sleep(delay)
    return await handler(request)


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeAPIServer]:
    fake = FakeAPIServer(trustme.CA())
    fake.app.middlewares.append(_late)  # after the fake records the request
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def serving_args(tmp_path: Path, port: int, grace: float) -> list[str]:
    return [
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--cert-dir", str(tmp_path / "certs"),
        "--shutdown-grace-period", str(grace),
    ]  # fmt: skip


def client_ssl(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(tmp_path / "certs" / "kube-oidc-gate.crt")
    )


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# --------------------------------------------------------------------------
# SIGTERM


async def test_sigterm_drains_the_proxy_within_the_grace_period(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    grace = 2.5
    port = free_port()
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", apiserver.url, apiserver.ca_pem
    )
    args = [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--oidc-username-prefix", "oidc:",
        "--oidc-groups-claim", "groups",
        "--kubeconfig", str(upstream),
        *serving_args(tmp_path, port, grace),
    ]  # fmt: skip
    with Proc(*args) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=20)
        url = f"https://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {issuer.token(groups=['devs'])}"}
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(tmp_path))
        ) as s:
            ws = await s.ws_connect(
                url + PODS + "/p/exec?command=cat&stdin=true&stdout=true",
                protocols=["v5.channel.k8s.io"],
                headers=auth,
            )
            await ws.send_bytes(b"\x00hello")
            assert (await asyncio.wait_for(ws.receive(), 5)).data == b"\x01hello"
            watch = await s.get(url + PODS, params={"watch": "1"}, headers=auth)
            await asyncio.wait_for(watch.content.readline(), 5)
            finishing = asyncio.create_task(
                s.get(url + PODS + "/finishing", headers=auth)
            )
            hanging = asyncio.create_task(s.get(url + PODS + "/hanging", headers=auth))
            await wait_until(
                lambda: (
                    {PODS + "/finishing", PODS + "/hanging"}
                    <= {r.path for r in apiserver.requests}
                ),
                what="both slow requests reached the API server",
            )
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            proc.popen.send_signal(signal.SIGTERM)

            # Streams end at the start of the drain, not at the end of it.
            msg = await asyncio.wait_for(ws.receive(), grace - 1)
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
            rest = await asyncio.wait_for(watch.content.read(), grace - 1)
            assert rest == b"", "the watch body ended properly (no payload error)"
            watch.release()

            await wait_until(lambda: _refused(port), what="new connections refused")

            answer = await asyncio.wait_for(finishing, grace + 1)
            assert answer.status == 404, "finished within the grace period"
            answer.release()
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(hanging, grace + 3)
            rc = await asyncio.to_thread(proc.popen.wait, 20)
            elapsed = loop.time() - signalled
        assert rc == 0
        assert elapsed < grace + 2.0, f"exited {elapsed:.1f}s after SIGTERM"
        events = [e.get("event") for e in proc.logs()]
        assert "grace period over: cancelling requests" in events
        assert events[-1] == "stopped"


# --------------------------------------------------------------------------
# Configuration is read once


def auth_file(issuer_url: str, prefix: str, *, broken_second: bool = False) -> str:
    text = textwrap.dedent(
        f"""\
        apiVersion: apiserver.config.k8s.io/v1
        kind: AuthenticationConfiguration
        jwt:
        - issuer:
            url: {issuer_url}
            audiences: [kubernetes]
          claimMappings:
            username: {{claim: sub, prefix: "{prefix}"}}
        """
    )
    if broken_second:
        text += textwrap.dedent(
            """\
            - issuer:
                url: http://idp.example.com
              claimMappings:
                username: {claim: sub}
            """
        )
    return text


async def _username(session: aiohttp.ClientSession, url: str, token: str) -> str:
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }
    async with session.post(url + "/authenticate", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["status"]["authenticated"] is True
    return str(answer["status"]["user"]["username"])


async def test_config_is_read_once_and_a_broken_file_fails_the_next_start(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    path = tmp_path / "authentication.yaml"
    path.write_text(auth_file(issuer.url, "loaded:"))
    port = free_port()
    args = ["webhook", "--authentication-config", str(path)]
    args += serving_args(tmp_path, port, 2)
    url = f"https://127.0.0.1:{port}"
    token = issuer.token()
    with Proc(*args) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=20)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(tmp_path))
        ) as s:
            assert await _username(s, url, token) == "loaded:00u1alice"
            # Half valid: a new prefix for the first issuer, a broken second one.
            path.write_text(auth_file(issuer.url, "changed:", broken_second=True))
            for _ in range(5):
                await asyncio.sleep(0.1)
                assert await _username(s, url, token) == "loaded:00u1alice"
        logged = json.dumps(proc.logs())
        assert "changed:" not in logged
        assert "idp.example.com" not in logged
        assert proc.stop() == 0
    with Proc(*args) as restarted:
        rc = await asyncio.to_thread(restarted.popen.wait, 20)
    err = "".join(restarted.stderr)
    assert rc == 2
    assert err.startswith("error: 3 problems:\n"), err
    for field in (
        "jwt[1].issuer.url",
        "jwt[1].issuer.audiences",
        "jwt[1].claimMappings.username.prefix",
    ):
        assert field in err, field


# --------------------------------------------------------------------------
# The event loop


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_nothing_blocks_the_event_loop(
    issuer: FakeIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every token is signed before debug mode starts watching: the test's own
    # RSA signing is not what is measured.
    rotated = new_key("RS256")
    cold = [issuer.token(groups=["devs"], jti=f"cold-{i}") for i in range(150)]
    proxied = [issuer.token(groups=["devs"], jti=f"proxied-{i}") for i in range(100)]
    rotation = [issuer.token(rotated, groups=["devs"], jti=f"r-{i}") for i in range(20)]
    hostile = [
        c.token for c in corpus(issuer.url, issuer.keys[0]) if len(c.token) < 64_000
    ]
    (tmp_path / "w").mkdir()
    (tmp_path / "p").mkdir()
    caplog.set_level(logging.WARNING, logger="asyncio")
    ca = trustme.CA()
    async with (
        running_gate(tmp_path / "w", "webhook", issuer, ca=ca) as webhook,
        running_gate(tmp_path / "p", "proxy", issuer, ca=ca) as proxy,
        # Ten connections at a time: a burst of a hundred accepts in one loop
        # iteration is slow in debug mode only, and is not what is measured.
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=webhook.client_ssl, limit=10)
        ) as client,
    ):
        webhook.client = proxy.client = client
        loop = asyncio.get_running_loop()
        # What earlier tests left on the heap is not ours to collect here: a
        # full collection of it can take longer than the threshold.
        gc.collect()
        gc.freeze()
        loop.set_debug(True)
        loop.slow_callback_duration = 0.1
        try:
            issuer.add_key(rotated)  # an unknown kid: one refetch per engine
            answers = await asyncio.gather(*(webhook.review(t) for t in rotation))
            assert all(a["status"]["authenticated"] for _, a in answers)
            statuses = await asyncio.gather(
                *(proxy.get(headers=auth(t)) for t in rotation)
            )
            assert all(status == 200 for status, _ in statuses)
            answers = await asyncio.gather(*(webhook.review(t) for t in cold + hostile))
            assert all(status == 200 for status, _ in answers)
            statuses = await asyncio.gather(
                *(proxy.get(headers=auth(t)) for t in proxied)
            )
            assert all(status == 200 for status, _ in statuses)
            for _ in range(3):
                await webhook.engine.keysets.get(issuer.url).refresh(force=True)
            ws = await client.ws_connect(
                proxy.url + PODS + "/p/exec?command=cat&stdin=true&stdout=true",
                protocols=["v5.channel.k8s.io"],
                headers=auth(proxied[0]),
            )
            await ws.send_bytes(b"\x00" + b"x" * 100_000)
            await asyncio.wait_for(ws.receive(), 5)
            await ws.close()
        finally:
            loop.set_debug(False)
            gc.unfreeze()
    slow = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing")
    ]
    assert slow == []
