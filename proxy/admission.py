"""Turns for new tokens: remembered users first, new tokens a bounded share.

Why. A token whose acceptance is remembered costs a hash and a lookup; a token
never seen costs its parse, its signature and the mapping, about 50 µs more on
a core. Without a rule, each open connection gets one answer per turn of the
event loop whatever its token costs, so a flood of distinct junk tokens (a
random ``kid`` each, or a fresh bad signature) takes the process's time in
proportion to its connections, and the cluster's real users, whose tokens are
remembered, slow down with it (issue #7, target 6, measured 0.66-0.71 x of
their undisturbed throughput with 16 flooding connections beside 48).

What. kube-apiserver's API Priority and Fairness keeps one flow from crowding
out another by giving each priority level its own seats and queueing what
exceeds them. We keep the one idea that fits a single-threaded worker: new
tokens, all of them together, form one class that gets ``per_turn`` starts per
turn of the event loop while tokens of accepted users are being answered from
the cache. A client with a remembered token gets one answer per turn (it
waits for its answer before it sends again), so new tokens together are served
like ``per_turn`` more clients, however many connections send them:

- new tokens wait in order (FIFO), at most ``max_waiting`` of them; one more
  is refused at once with a temporary error (``Overloaded``: 503 with
  ``Retry-After``, which kube-apiserver and client-go retry), so the queue's
  delay stays bounded and nothing grows with the attack;
- with no accepted token answered from the cache in the last ``warm_window``
  seconds there is nothing to protect and nothing waits: a restart, when every
  token is new, runs at full speed;
- cached refusals are not "remembered users": a replayed bad token must not
  earn the right to hold back a real user's first request.

What it costs. A real user's first request waits its turn while the worker is
saturated: with 48 busy clients of remembered tokens a turn takes about 1 ms,
so one new token per turn still admits 830-976 new tokens a second per worker
(measured), well above any login wave (a token lasts an hour). When the
worker is not saturated, turns are short and a new token hardly waits.
``per_turn = 0`` turns the rule off.

How. The loop runs in turns: it reads every ready socket (a remembered token
is answered there and then), then runs the ready tasks, where new tokens are
validated. ``ready`` counts the starts of this turn; ``_turn``, scheduled with
``call_soon`` and so run once at the start of the next turn's tasks, resets
the count and releases the next waiters. A waiter whose client leaves is
cancelled, and its place is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from proxy.config import AdmissionSettings
from proxy.errors import Overloaded

__all__ = ["Admission"]


class Admission:
    """The turns of one worker's new tokens (see the module docstring)."""

    def __init__(
        self,
        settings: AdmissionSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_turn = settings.per_turn
        self._max_waiting = settings.max_waiting
        self._window = settings.warm_window
        self._monotonic = monotonic
        self._warm_until = float("-inf")
        self._started = 0
        self._scheduled = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: New tokens that waited for a turn, and those refused as overloaded.
        self.waited = 0
        self.shed = 0

    @property
    def waiting(self) -> int:
        """New tokens waiting for their turn now."""
        return len(self._waiters)

    def hit(self) -> None:
        """An accepted user was answered from the cache: protect that traffic."""
        self._warm_until = self._monotonic() + self._window

    def ready(self) -> bool:
        """Whether a new token may start now; if not, ``wait`` for its turn."""
        if self._per_turn <= 0:
            return True
        if not self._waiters:
            if self._monotonic() >= self._warm_until:
                return True
            if self._started < self._per_turn:
                self._started += 1
                self._schedule()
                return True
        return False

    async def wait(self) -> None:
        """Wait for a turn; raise ``Overloaded`` when too many already wait."""
        if len(self._waiters) >= self._max_waiting:
            self.shed += 1
            raise Overloaded(
                f"authn: {len(self._waiters)} new tokens are already waiting for "
                "their turn; retry"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self.waited += 1
        self._schedule()
        await future

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        self._started = 0
        waiters = self._waiters
        if self._monotonic() < self._warm_until:
            budget = self._per_turn
        else:
            budget = len(waiters)
        while waiters and self._started < budget:
            future = waiters.popleft()
            if future.done():
                continue
            future.set_result(None)
            self._started += 1
        if waiters or self._started:
            self._schedule()
