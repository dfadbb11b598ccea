"""Process life: SIGTERM drains within the grace period, the configuration is
read once, and nothing blocks the event loop.

The first two run the real ``kube-oidc-gate`` command as a subprocess (stopped
by PID); the last runs the webhook and the proxy in-process under asyncio's
debug mode, which logs every callback that holds the loop too long.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import signal
import ssl
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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


async def test_sigterm_drains_the_proxy_within_the_grace_period(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
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
                    <= {r.path for r in apiserver.requests}
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


async def test_a_broken_config_file_changes_nothing_and_fails_the_next_start(
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
            # The live reload (issue 21) refuses the whole file, never half.
            path.write_text(auth_file(issuer.url, "changed:", broken_second=True))
            await proc.await_log(
                "authentication config not reloaded, the last good one serves",
                timeout=5,
            )
            for _ in range(5):
                assert await _username(s, url, token) == "loaded:00u1alice"
        assert not any(
            e.get("event") == "authentication config reloaded" for e in proc.logs()
        )
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


def _cpu_wait() -> float:
    """Seconds this thread has waited for a CPU since it started (Linux
    ``schedstat``'s run_delay; 0 where the kernel does not say)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class _SlowCallbacks(logging.Handler):
    """asyncio's slow-callback reports, less the time the loop waited for a CPU.

    Debug mode times each callback on the wall clock, which on a loaded
    machine also counts the time the loop's thread sat in the run queue while
    other processes ran: a callback that holds the loop for 5 ms can be
    reported at 150 ms. The kernel counts that wait per thread. ``sample``
    notes it every 10 ms; when a slow callback is reported (at once, on the
    loop's thread), the wait since the last note is subtracted, and the
    callback counts as blocking only if what is left (the time it held the
    loop: CPU, or a blocking call) still reaches the threshold. On an idle
    machine nothing is subtracted and the check is debug mode's own; under
    load the window is at most the callback plus 10 ms.
    """

    def __init__(self, *, threshold: float) -> None:
        super().__init__(logging.WARNING)
        self.threshold = threshold
        self.blocking: list[str] = []
        self._noted = _cpu_wait()

    async def sample(self) -> None:
        while True:
            self._noted = _cpu_wait()
            await asyncio.sleep(0.01)

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("Executing"):
            return
        took = record.args[-1] if isinstance(record.args, tuple) else None
        waited = _cpu_wait() - self._noted
        if not isinstance(took, float) or took - waited >= self.threshold:
            self.blocking.append(
                f"{record.getMessage()} (of which {waited:.3f} s waiting for a CPU)"
            )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("kind", ["sleeps", "computes"])
async def test_the_slow_callback_check_still_sees_a_blocking_callback(
    kind: str,
) -> None:
    """The check below subtracts CPU waits; what holds the loop still counts."""

    def block() -> None:
        if kind == "sleeps":
            time.sleep(0.2)  # a blocking call: the thread waits, but not for a CPU
            return
        spent = time.thread_time() + 0.2
        while time.thread_time() < spent:
            pass

    loop = asyncio.get_running_loop()
    slow = _SlowCallbacks(threshold=0.1)
    sampler = asyncio.create_task(slow.sample())
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(logging.WARNING)
    asyncio_log.addHandler(slow)
    loop.set_debug(True)
    loop.slow_callback_duration = slow.threshold
    try:
        await asyncio.sleep(0.05)
        loop.call_soon(block)
        await asyncio.sleep(0.05)
    finally:
        loop.set_debug(False)
        asyncio_log.removeHandler(slow)
        asyncio_log.setLevel(level)
        sampler.cancel()
    assert len(slow.blocking) == 1, slow.blocking
    assert "block" in slow.blocking[0]


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
        slow = _SlowCallbacks(threshold=0.1)
        sampler = asyncio.create_task(slow.sample())
        logging.getLogger("asyncio").addHandler(slow)
        loop.set_debug(True)
        loop.slow_callback_duration = slow.threshold
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
            logging.getLogger("asyncio").removeHandler(slow)
            sampler.cancel()
            gc.unfreeze()
    assert slow.blocking == []
