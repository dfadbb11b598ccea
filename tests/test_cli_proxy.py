"""The real command: ``kube-oidc-gate proxy`` as a subprocess, kubectl through it,
and SIGTERM draining it within the grace period (stopped by PID)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import (
    run_kubectl,
    start_kubectl,
    upstream_kubeconfig,
    write_kubectl_config,
)
from tests.fakes.issuer import FakeIssuer
from tests.proc import Proc
from tests.support.running_gate import PODS, wait_until
from tests.test_cli_webhook import free_port


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeAPIServer]:
    fake = FakeAPIServer(trustme.CA())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def proxy_args(
    issuer: FakeIssuer, upstream: Path, tmp_path: Path, port: int, *extra: str
) -> list[str]:
    return [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--oidc-username-claim", "email",
        "--oidc-groups-claim", "groups",
        "--kubeconfig", str(upstream),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--cert-dir", str(tmp_path / "certs"),
        "--shutdown-grace-period", "5",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.kubectl
async def test_kubectl_through_the_real_proxy_command(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", apiserver.url, apiserver.ca_pem
    )
    port = free_port()
    with Proc(*proxy_args(issuer, upstream, tmp_path, port)) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=20)
        ca = (tmp_path / "certs" / "kube-oidc-gate.crt").read_bytes()
        token = issuer.token(
            email="alice@example.com", email_verified=True, groups=["naxslabs-admins"]
        )
        kubeconfig = write_kubectl_config(
            tmp_path / "user.yaml", f"https://127.0.0.1:{port}", ca, token
        )
        code, out, err = await run_kubectl(
            ["auth", "whoami", "-o", "json"], home=tmp_path, kubeconfig=kubeconfig
        )
        assert code == 0, err
        info = json.loads(out)["status"]["userInfo"]
        assert info["username"] == "alice@example.com"
        assert "naxslabs-admins" in info["groups"]
        code, out, err = await run_kubectl(
            ["get", "pods"], home=tmp_path, kubeconfig=kubeconfig
        )
        assert code == 0, err
        code, _, err = await run_kubectl(
            ["get", "pods", "--as", "bob"], home=tmp_path, kubeconfig=kubeconfig
        )
        assert code != 0
        assert "Forbidden" in err or "forbidden" in err

        # A watch is open when SIGTERM arrives: it is ended cleanly, and the
        # process exits 0 within the grace period.
        watch = await start_kubectl(
            ["get", "pods", "-w"], home=tmp_path, kubeconfig=kubeconfig
        )
        await asyncio.sleep(1.0)
        proc.popen.terminate()
        rc = await asyncio.wait_for(watch.wait(), 15)
        assert rc is not None
        assert await asyncio.to_thread(proc.popen.wait, 15) == 0
    for seen in apiserver.requests:
        assert seen.headers.get("Authorization") == "Bearer proxy-sa-token-1"
        assert token not in json.dumps(dict(seen.headers))
    assert all(token not in line for line in proc.stderr)


@pytest.mark.slow
@pytest.mark.kubectl
async def test_proxy_refuses_a_bad_upstream_config(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    bad = tmp_path / "upstream.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with Proc(*proxy_args(issuer, bad, tmp_path, free_port())) as proc:
        rc = await asyncio.to_thread(proc.popen.wait, 20)
    assert rc == 2
    assert "".join(proc.stderr).startswith("error: ") or "error:" in "".join(
        proc.stderr
    )


@pytest.mark.slow
@pytest.mark.kubectl
async def test_passthrough_with_a_client_certificate_upstream_refuses_to_start(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    import base64

    import yaml

    client = trustme.CA().issue_cert("kube-oidc-gate")
    doc = yaml.safe_load(
        upstream_kubeconfig(
            tmp_path / "u.yaml", apiserver.url, apiserver.ca_pem, token=None
        ).read_text()
    )
    doc["users"][0]["user"] = {
        "client-certificate-data": base64.b64encode(
            client.cert_chain_pems[0].bytes()
        ).decode(),
        "client-key-data": base64.b64encode(client.private_key_pem.bytes()).decode(),
    }
    upstream = tmp_path / "cert-upstream.yaml"
    upstream.write_text(yaml.safe_dump(doc))
    with Proc(
        *proxy_args(issuer, upstream, tmp_path, free_port(), "--token-passthrough")
    ) as proc:
        rc = await asyncio.to_thread(proc.popen.wait, 20)
    assert rc == 2
    assert "--token-passthrough cannot be used" in "".join(proc.stderr)


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
async def late_apiserver() -> AsyncIterator[FakeAPIServer]:
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


def _logged_at(events: list[dict[str, Any]], event: str) -> float:
    """When the process first logged ``event`` (its own clock, in seconds)."""
    stamp = next(e["time"] for e in events if e.get("event") == event)
    return dt.datetime.fromisoformat(stamp).timestamp()


async def _failed_at(
    request: asyncio.Task[Any], loop: asyncio.AbstractEventLoop
) -> float:
    """The loop time at which ``request`` failed; fails if it was answered."""
    with pytest.raises(aiohttp.ClientError):
        await request
    return loop.time()


@pytest.mark.slow
async def test_sigterm_drains_the_proxy_within_the_grace_period(
    issuer: FakeIssuer, late_apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    """What happens in which order after SIGTERM, with bounds that hold on a
    loaded machine: the grace period is long beside the 1 s request that must
    finish in it, and every "how soon" is checked as an order against the
    hanging request's cut (which the process makes at the end of the grace
    period whatever the load) or on the process's own log clock.
    """
    grace = 8.0
    port = free_port()
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", late_apiserver.url, late_apiserver.ca_pem
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
        await proc.await_log("jwks keys loaded", timeout=30)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=30)
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
            assert (await asyncio.wait_for(ws.receive(), 10)).data == b"\x01hello"
            watch = await s.get(url + PODS, params={"watch": "1"}, headers=auth)
            await asyncio.wait_for(watch.content.readline(), 10)
            finishing = asyncio.create_task(
                s.get(url + PODS + "/finishing", headers=auth)
            )
            hanging = asyncio.create_task(s.get(url + PODS + "/hanging", headers=auth))
            await wait_until(
                lambda: (
                    {PODS + "/finishing", PODS + "/hanging"}
                    <= {r.path for r in late_apiserver.requests}
                ),
                timeout=20,
                what="both slow requests reached the API server",
            )
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            proc.popen.send_signal(signal.SIGTERM)
            cut = asyncio.create_task(_failed_at(hanging, loop))

            # Streams end at the start of the drain, not at the end of it.
            msg = await asyncio.wait_for(ws.receive(), grace)
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
            rest = await asyncio.wait_for(watch.content.read(), grace)
            assert rest == b"", "the watch body ended properly (no payload error)"
            watch.release()
            streams_ended = loop.time()

            await wait_until(
                lambda: _refused(port), timeout=grace, what="new connections refused"
            )
            refused = loop.time()

            answer = await asyncio.wait_for(finishing, grace + 10)
            assert answer.status == 404, "finished within the grace period"
            answer.release()
            answered = loop.time()

            cut_at = await asyncio.wait_for(cut, grace + 10)
            rc = await asyncio.to_thread(proc.popen.wait, 30)
            elapsed = loop.time() - signalled
        assert rc == 0
        assert streams_ended < cut_at, "streams ended before the grace period did"
        assert refused < cut_at, "the listener closed when the drain began"
        assert answered < cut_at, "the 1 s request was answered, not cut"
        assert streams_ended - signalled < grace / 2, (
            f"streams ended {streams_ended - signalled:.1f}s after SIGTERM"
        )
        # Exited once the grace period was over: not at twice the grace
        # period, and not when the hanging request would have finished (60 s).
        assert elapsed < grace + 6.0, f"exited {elapsed:.1f}s after SIGTERM"
        events = proc.logs()
        names = [e.get("event") for e in events]
        assert names[-1] == "stopped"
        # On the process's own clock: the drain gave the hanging request the
        # whole grace period, once, and then stopped promptly.
        began = _logged_at(events, "shutting down")
        over = _logged_at(events, "grace period over: cancelling requests")
        stopped = _logged_at(events, "stopped")
        assert grace - 0.1 <= over - began < grace + 3.0, over - began
        assert stopped - over < 5.0, stopped - over


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
