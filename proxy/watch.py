"""Notice changed files: poll their (inode, size, mtime) and call back on a change.

Live reload (issue 21) needs one thing from the file system: "this file is not
what it was". A poll of ``os.stat`` every second answers it everywhere, for
every way a file gets replaced: an editor's write in place (size or mtime
change), ``mv`` over it (a new inode), and a Kubernetes ``Secret`` or
``ConfigMap`` volume, whose files are symlinks through ``..data`` that kubelet
swaps to a new directory (``os.stat`` follows the link: a new inode). inotify
would save at most a second and misses the last case unless the directory is
watched; a handful of ``stat`` calls a second costs nothing.

``SIGHUP`` (wired by the CLI) calls ``poke``: every callback runs at once, as
if every file had changed, for an operator who does not want to wait or whose
file system keeps mtimes too coarse to notice a quick rewrite.

A callback decides for itself what a change means (load the new pair, or keep
the last good one and log why); the watcher only notices and never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = ["POLL_INTERVAL", "FileWatcher"]

log = logging.getLogger(__name__)

#: Seconds between two looks at the watched files.
POLL_INTERVAL: Final = 1.0

_Signature = tuple[tuple[int, int, int, int] | None, ...]


def _signature(paths: Sequence[str]) -> _Signature:
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)  # missing for now: a later write is a change
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(slots=True)
class _Watch:
    name: str
    paths: tuple[str, ...]
    on_change: Callable[[], object]
    seen: _Signature = field(default=())


async def _call(name: str, callback: Callable[[], object]) -> None:
    try:
        result = callback()
        if inspect.isawaitable(result):
            await result
    except Exception:  # a callback's own bug must not stop the watching
        log.exception("reload callback failed", extra={"watch": name})


class FileWatcher:
    """Groups of files, each with the callback to run when any of them changes.

    A group (a certificate and its key) is one callback: a pair half written is
    seen again on the next poll, when the other half lands.
    """

    __slots__ = ("_interval", "_periodic", "_poked", "_watches")

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self._interval = interval
        self._watches: list[_Watch] = []
        self._periodic: list[tuple[str, Callable[[], object]]] = []
        self._poked = asyncio.Event()

    def add(
        self, name: str, paths: Sequence[str], on_change: Callable[[], object]
    ) -> None:
        """Watch ``paths`` (as they are now) and call ``on_change()`` when they change."""
        files = tuple(p for p in paths if p)
        if files:
            self._watches.append(_Watch(name, files, on_change, _signature(files)))

    def add_periodic(self, name: str, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on every turn, before the files are looked at.

        For what time, not a file, makes due (a generated pair to renew): a
        file it writes is then noticed in the same turn, like any change.
        """
        self._periodic.append((name, callback))

    def poke(self) -> None:
        """Run every callback on the next turn (``SIGHUP``)."""
        self._poked.set()

    async def check(self, *, force: bool = False) -> list[str]:
        """Call back for each changed group (all with ``force``); return their names.

        A callback may return an awaitable (a reload that fetches keys): it is
        awaited before the next group, so reloads never overlap.
        """
        for name, callback in self._periodic:
            await _call(name, callback)
        changed: list[str] = []
        for watch in self._watches:
            # stat in a thread: no blocking I/O on the loop (house rule 7).
            now = await asyncio.to_thread(_signature, watch.paths)
            if not force and now == watch.seen:
                continue
            watch.seen = now
            changed.append(watch.name)
            await _call(watch.name, watch.on_change)
        return changed

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._poked.wait()
            force = self._poked.is_set()
            self._poked.clear()
            if force:
                log.info("reloading on SIGHUP")
            await self.check(force=force)
