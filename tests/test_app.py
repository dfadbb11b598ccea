"""The service as ``proxy.app`` assembles it (engine, front ends, ``serve()``):
nothing blocks the event loop.

The webhook and the proxy run in-process under asyncio's debug mode, which
logs every callback that holds the loop too long; the first test shows that
check still sees a blocking callback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.fakes.issuer import FakeIssuer
from tests.hostile import corpus
from tests.keygen import new_key
from tests.support.running_gate import PODS, running_gate


def client_ssl(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(tmp_path / "certs" / "kube-oidc-gate.crt")
    )


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


@pytest.mark.slow
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


@pytest.mark.slow
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
