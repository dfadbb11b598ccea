"""Processes the harness starts: started, waited for, measured and stopped by PID.

Every child runs in its own session (so it does not get the terminal's Ctrl-C
twice) and is remembered in ``STARTED``; ``stop_all`` (also run at exit) sends
SIGTERM to each PID, waits a bounded time, then SIGKILLs that PID's own process
group. Nothing is ever looked up or killed by name.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["STARTED", "Proc", "free_port", "start", "stop_all", "wait_http"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{pid}/task/{task}/children") as f,
            ):
                out.extend(int(c) for c in f.read().split())
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (for ``--workers N`` and Apache's children)."""
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(_children(seen[i]))
        i += 1
    return seen


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def cpu_ticks(stat: str = "/proc/stat") -> tuple[int, int]:
    """The whole machine's (steal, total) CPU ticks so far.

    Steal is time the hypervisor gave this VM's virtual CPUs to someone else:
    on a shared VM it comes and goes within minutes, and while it is high
    every figure of a run is slower, so each run records its share.
    """
    try:
        with open(stat) as f:
            first = f.readline().split()
    except OSError:
        return 0, 0
    # cpu user nice system idle iowait irq softirq steal guest guest_nice;
    # guest time is already counted in user and nice.
    ticks = [int(v) for v in first[1:9]]
    if first[:1] != ["cpu"] or len(ticks) < 8:
        return 0, 0
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time stolen between two ``cpu_ticks``."""
    total = after[1] - before[1]
    if total <= 0:
        return None
    return round((after[0] - before[0]) / total, 3)


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident set size of these processes, summed."""
    total = 0
    for pid in pids:
        with (
            contextlib.suppress(OSError, IndexError, ValueError),
            open(f"/proc/{pid}/statm") as f,
        ):
            total += int(f.read().split()[1]) * _PAGE
    return total


@dataclass
class Proc:
    """A started child process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return tree(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children of a --workers parent share its process group (its own session).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, 0)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.killpg(self.pid, 0)
                time.sleep(0.05)
            os.killpg(self.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(ValueError):
            STARTED.remove(self)


STARTED: list[Proc] = []


def start(
    name: str, argv: Sequence[str], log_dir: Path, *, env: dict[str, str] | None = None
) -> Proc:
    """Start ``argv`` in its own session, output to ``log_dir/name.log``."""
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed in Proc.stop
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    proc = Proc(name=name, popen=popen, log_path=log_path, _log=log)
    STARTED.append(proc)
    return proc


def stop_all() -> None:
    """Stop every process still running that the harness started, newest first."""
    for proc in reversed(list(STARTED)):
        proc.stop()


atexit.register(stop_all)


def wait_http(
    url: str, proc: Proc | None = None, *, timeout: float = 30.0, status: int = 200
) -> None:
    """Poll ``url`` until it answers ``status`` (TLS not verified: loopback, self-signed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                if resp.status == status:
                    return
                last = f"status {resp.status}"
        except urllib.error.HTTPError as err:
            if err.code == status:
                return
            last = f"status {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    tail = proc.tail() if proc is not None else ""
    raise RuntimeError(f"{url} not ready after {timeout}s ({last})\n{tail}")
