"""A log pipe nobody reads never stalls the event loop (issue 19).

Real parts: an OS pipe whose buffer is full, and the real command with its
log stream (stderr) on such a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.log import JSONFormatter, LoopBatchingHandler
from tests.proc import ROOT

FILLER = b"filler\n"


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: the next blocking write blocks."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    chunk = FILLER * (4096 // len(FILLER))  # under PIPE_BUF: all or nothing
    for piece in (chunk, FILLER):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write, piece)
    os.set_blocking(write, True)
    return read, write


class _Drain:
    """Reads a pipe to its end on a thread, once asked to start."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while chunk := os.read(self.fd, 1 << 16):
            self.chunks.append(chunk)

    def lines(self, timeout: float) -> list[bytes]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the pipe did not end within {timeout}s"
        return [x for x in b"".join(self.chunks).splitlines() if x + b"\n" != FILLER]


async def _max_lag(stop: asyncio.Event, period: float = 0.01) -> float:
    """The worst lateness of a ``period`` sleep until ``stop`` is set."""
    worst = 0.0
    while not stop.is_set():
        started = time.monotonic()
        await asyncio.sleep(period)
        worst = max(worst, time.monotonic() - started - period)
    return worst


@pytest.fixture
def stuck_pipe() -> Iterator[tuple[int, int]]:
    read, write = _full_pipe()
    try:
        yield read, write
    finally:
        for fd in (read, write):
            with contextlib.suppress(OSError):
                os.close(fd)


LINES = 50_000
LIMIT = 1 << 20


@pytest.mark.slow
async def test_a_full_pipe_never_stalls_the_loop_and_drops_are_reported(
    stuck_pipe: tuple[int, int],
) -> None:
    read, write = stuck_pipe
    stream = os.fdopen(write, "w", encoding="utf-8", closefd=False)
    handler = LoopBatchingHandler(stream, backlog_limit=LIMIT, flush_timeout=10)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("test.blocking")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    drain = _Drain(read)
    try:
        stop = asyncio.Event()
        lag = asyncio.create_task(_max_lag(stop))
        async with asyncio.timeout(60):
            for i in range(LINES):
                logger.info("line", extra={"n": i, "pad": "x" * 64})
                if i % 100 == 99:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.05)  # the lag timer runs a few more times
            stop.set()
            worst = await lag
        assert worst < 0.2, f"the loop lagged {worst * 1000:.0f} ms"
        assert 0 < handler._dropped < LINES, "the lines past the limit are counted"
        drain.thread.start()
        handler.flush()  # now that the pipe is read: within flush_timeout
        logger.info("line", extra={"n": -1, "pad": ""})
        handler.close()  # written, and the writer thread gone
        stream.close()
        os.close(write)
        lines = [json.loads(x) for x in drain.lines(timeout=10)]
    finally:
        logger.removeHandler(handler)
        handler.close()
    *kept, notice, last = lines
    assert [x["n"] for x in kept] == list(range(len(kept))), "in order, none lost"
    assert LIMIT // 2 < sum(len(x) for x in drain.chunks) < LIMIT + (1 << 17)
    assert (notice["event"], notice["level"]) == ("log lines dropped", "warning")
    assert notice["dropped"] == LINES - len(kept)
    assert last["n"] == -1


def _dev_webhook(port: int, cert_dir: Path, *, log_fd: int) -> subprocess.Popen[str]:
    """``kube-oidc-gate webhook --dev`` with its log stream (stderr) on ``log_fd``."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "proxy", "webhook", "--dev"),
            *("--secure-port", str(port), "--cert-dir", str(cert_dir)),
        ],
        stdout=subprocess.PIPE,
        stderr=log_fd,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        # Own process group: a failed test kills all of it.
        start_new_session=True,
    )


def _dev_banner(proc: subprocess.Popen[str], timeout: float) -> str:
    """What ``webhook --dev`` prints on stdout up to its probes line."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    text = ""
    deadline = time.monotonic() + timeout
    while "probes:" not in text and time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError, TypeError):
            text += os.read(fd, 65536).decode()
        time.sleep(0.02)
    assert "probes:" in text, f"no banner within {timeout}s: {text!r}"
    return text


REQUESTS = 3000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_the_webhook_answers_every_review_while_its_log_pipe_is_full(
    tmp_path: Path, stuck_pipe: tuple[int, int]
) -> None:
    read, write = stuck_pipe
    port = _free_port()
    proc = _dev_webhook(port, tmp_path / "c", log_fd=write)
    os.close(write)
    drain = _Drain(read)
    try:
        argv = shlex.split(
            next(
                line.strip()
                for line in _dev_banner(proc, timeout=30).splitlines()
                if line.strip().startswith("curl") and "--cacert" in line
            )
        )
        body = argv[argv.index("-d") + 1]
        url = next(a for a in argv if a.startswith("https://"))
        ctx = ssl.create_default_context(cafile=argv[argv.index("--cacert") + 1])
        answered = 0
        async with (
            asyncio.timeout(120),
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
                timeout=aiohttp.ClientTimeout(total=10),
            ) as session,
        ):

            async def review() -> None:
                nonlocal answered
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    assert r.status == 200
                    await r.read()
                    answered += 1

            for _ in range(REQUESTS // 100):
                await asyncio.gather(*(review() for _ in range(100)))
        assert answered == REQUESTS
        drain.thread.start()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        events = [
            json.loads(x).get("event") for x in drain.lines(timeout=10) if x[:1] == b"{"
        ]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    # Far more than a pipe holds (and the command used to stall on its first
    # line), all written once the pipe was read.
    assert events.count("token review") == REQUESTS
    assert "log lines dropped" not in events
    assert events[-1] == "stopped"
