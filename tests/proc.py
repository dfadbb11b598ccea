"""Run ``kube-oidc-gate`` as a real subprocess: read its JSON logs, stop it by PID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A started ``python -m proxy ...`` with its stdout and stderr collected."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=full_env,
            cwd=cwd or ROOT,
            # Own process group, so a failed test can kill forked workers too.
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(
                target=self._pump, args=(self.popen.stdout, self.stdout), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.popen.stderr, self.stderr), daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.stderr):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for_log(
        self, event: str, timeout: float = 15.0, *, count: int = 1
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [entry for entry in self.logs() if entry.get("event") == event]
            if len(found) >= count:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"no {count}x {event!r} log within {timeout}s; rc={self.popen.poll()}\n"
            + "".join(self.stderr[-30:])
        )

    async def await_log(
        self, event: str, timeout: float = 15.0, *, count: int = 1
    ) -> list[dict[str, Any]]:
        """``wait_for_log`` that keeps the event loop (and in-process fakes) running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [entry for entry in self.logs() if entry.get("event") == event]
            if len(found) >= count:
                return found
            if self.popen.poll() is not None:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"no {count}x {event!r} log within {timeout}s; rc={self.popen.poll()}\n"
            + "".join(self.stderr[-30:])
        )

    def wait_for_stdout(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            joined = "".join(self.stdout)
            if text in joined:
                return joined
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"{text!r} not printed within {timeout}s\n" + "".join(self.stderr[-30:])
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            raise

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self._kill_group()
        for t in self._threads:
            t.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
