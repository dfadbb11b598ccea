"""``--workers N``: run the serving process N times, forked, as one command.

The parent forks the workers, forwards SIGTERM, SIGINT and SIGHUP to them,
and waits; a worker that cannot start reports its problems through a pipe
of its own, so ``--workers N`` fails as one process does (``error: ...``,
exit code 2) rather than with a worker's silent ``os._exit``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from collections.abc import Callable
from typing import Final, NoReturn

from proxy.errors import ConfigError, ProxyError
from proxy.log import flush_logs

__all__ = ["run_processes"]


#: Most bytes of problems a worker reports to the parent: far below a pipe's
#: capacity, so the write never waits for a reader (the parent reads after the
#: worker has exited).
_REPORT_LIMIT: Final = 16 * 1024


def run_processes(workers: int, run_one: Callable[[], int]) -> int:
    """Run ``run_one`` in ``workers`` forked processes; forward signals; return the worst code.

    A worker that cannot start (a ``ProxyError``: a port taken after all, an
    API server credential that does not load) reports its problems through a
    pipe of its own and exits 2; the parent stops the other workers and raises
    the problems, each once, as one ``ConfigError``. ``--workers N`` then fails
    as one process does: ``error: ...`` and exit code 2, where a worker's
    ``os._exit`` used to swallow the message.
    """
    if workers == 1:
        return run_one()
    reports: dict[int, int] = {}  # worker pid -> read end of its report pipe
    for _ in range(workers):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_end)
            for other in reports.values():
                os.close(other)
            _worker(run_one, write_end)
        os.close(write_end)
        reports[pid] = read_end

    def forward(signum: int, _frame: object) -> None:
        for pid in reports:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # SIGHUP reloads every worker's files now (issue 21); the parent's default
    # for it would end the parent and leave the workers orphaned.
    signal.signal(signal.SIGHUP, forward)
    worst = 0
    problems: list[str] = []
    running = set(reports)
    while running:
        pid, status = os.wait()
        if pid not in running:
            continue
        running.discard(pid)
        worst = max(worst, os.waitstatus_to_exitcode(status))
        report = _read_report(reports[pid])
        if report:
            problems += [p for p in report if p not in problems]
            # The others must not serve on as if the start had worked.
            for other in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
    if problems:
        raise ConfigError(problems)
    return worst


def _worker(run_one: Callable[[], int], report_fd: int) -> NoReturn:
    """A forked worker's whole life: run, report a ``ProxyError``, exit."""
    code = 1
    try:
        code = run_one()
    except ProxyError as err:
        problems = err.problems if isinstance(err, ConfigError) else (str(err),)
        data = "\n".join(problems).encode()[:_REPORT_LIMIT]
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(report_fd, data) :]
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - the worker's last word, then exit
        traceback.print_exc()
        code = 1
    finally:
        # os._exit skips logging.shutdown: write the queued lines first.
        flush_logs()
        os._exit(code)


def _read_report(fd: int) -> list[str]:
    """The problems a worker wrote before it exited (none: it did not fail so)."""
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    return [line for line in text.splitlines() if line]
