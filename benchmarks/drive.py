"""Drive load with ``wrk`` and the Lua script beside this file; parse its JSON line.

``wrk`` (C, epoll) saturates two cores from one process where a Python load
generator would itself be the bottleneck. Its ``done()`` hook in
``load.lua`` prints the summary, the latency percentiles and the script's own
counters as one ``WRKJSON`` line, so nothing is scraped from prose.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import cpu_seconds, cpu_ticks, steal_share

__all__ = ["LUA", "Load", "run_wrk", "wrk_path"]

LUA = Path(__file__).with_name("load.lua")


def wrk_path() -> str | None:
    """The ``wrk`` binary (Debian package ``wrk``), if installed."""
    return shutil.which("wrk")


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """One wrk run: where, how long, how wide, what to send."""

    url: str
    duration: float
    connections: int = 64
    threads: int = 2
    mode: str = "review"
    tokens: Path
    next_tokens: Path | None = None
    switch_at: int | None = None
    check: str | None = None
    timeout_s: int = 5

    def argv(self, wrk: str) -> list[str]:
        base, _, path = self.url.partition("://")[2].partition("/")
        scheme = self.url.split("://", 1)[0]
        args = [
            wrk,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{max(1, round(self.duration))}s",
            f"--timeout={self.timeout_s}s",
            "--latency",
            "-s",
            str(LUA),
            f"{scheme}://{base}",
            "--",
            f"mode={self.mode}",
            f"path=/{path}",
            f"tokens={self.tokens}",
            f"threads={self.threads}",
        ]
        if self.next_tokens is not None and self.switch_at is not None:
            args += [f"next={self.next_tokens}", f"at={self.switch_at}"]
        if self.check:
            args.append(f"check={self.check}")
        return args


def start_wrk(load: Load) -> subprocess.Popen[str]:
    """Start wrk (for runs that overlap, e.g. a flood beside valid traffic)."""
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian package: wrk)")
    return subprocess.Popen(
        load.argv(wrk),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_wrk(popen: subprocess.Popen[str], load: Load) -> dict[str, Any]:
    """Wait (bounded) for a wrk started by ``start_wrk`` and parse its result."""
    try:
        out, _ = popen.communicate(timeout=load.duration + 30)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, _ = popen.communicate(timeout=5)
        raise RuntimeError(f"wrk did not finish:\n{out[-2000:]}") from None
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            seconds = data["duration_us"] / 1e6
            data["rps"] = data["requests"] / seconds if seconds else 0.0
            errs = data["errors"]
            data["socket_errors"] = (
                errs["connect"] + errs["read"] + errs["write"] + errs["timeout"]
            )
            data["non2xx"] = errs["status"]
            return data
    raise RuntimeError(
        f"wrk printed no result (exit {popen.returncode}):\n{out[-2000:]}"
    )


def run_wrk(load: Load, measured_pids: Sequence[int] = ()) -> dict[str, Any]:
    """Run wrk once; with ``measured_pids``, also report their CPU per request."""
    before = cpu_seconds(measured_pids)
    machine = cpu_ticks()
    result = finish_wrk(start_wrk(load), load)
    result["cpu_steal_share"] = steal_share(machine, cpu_ticks())
    if measured_pids and result["requests"]:
        used = cpu_seconds(measured_pids) - before
        result["server_cpu_s"] = round(used, 3)
        result["server_cpu_us_per_request"] = round(used * 1e6 / result["requests"], 1)
    return result
