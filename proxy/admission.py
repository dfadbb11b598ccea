"""Turns for new tokens: remembered users first while junk tokens flood in.

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
turn of the event loop. A client with a remembered token gets one answer per
turn (it waits for its answer before it sends again), so new tokens together
are served like ``per_turn`` more clients, however many connections send
them. The rule holds only while both of these are true:

- accepted tokens were answered from the cache in the last ``window`` seconds
  (there are users to protect; cached refusals do not count: a replayed bad
  token must not earn the right to hold back a real user's first request);
- most new tokens of the last one to two windows were refused or not ours
  (the new tokens are a flood, not logins). A wave of real logins is accepted
  and keeps its per-connection share, as without the rule: measured with 63
  connections of new valid tokens beside one of a remembered token, the rule
  alone would have halved their throughput to give that one client as much
  as all 63. Junk cannot pass for logins: only the issuer mints tokens that
  are accepted.

Bounds. New tokens wait in order (FIFO), at most ``max_waiting`` of them; one
more is refused at once with a temporary error (``Overloaded``: 503 with
``Retry-After``, which kube-apiserver and client-go retry), so the delay stays
bounded and nothing grows with the attack. With nothing to protect, nothing
waits: a restart, when every token is new, runs at full speed.

What it costs. During a flood, a real user's first token waits its turn in the
same queue as the junk (they cannot be told apart before the signature): with
48 busy clients of remembered tokens a turn takes about 1 ms, and one new
token per turn still admits 830-976 a second per worker (measured).
``per_turn = 0`` turns the rule off.

How. The loop runs in turns: it reads every ready socket (a remembered token
is answered there and then), then runs the ready tasks, where new tokens are
validated. ``ready`` counts the starts of this turn; ``_turn``, scheduled with
``call_soon`` and so run once at the start of the next turn's tasks, resets
the count and releases the next waiters. A waiter whose client leaves is
cancelled, and its place is skipped. ``outcome`` counts what became of each
new token, in the current and the previous window.
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
        self._window = settings.window
        self._monotonic = monotonic
        self._warm_until = float("-inf")
        # New tokens accepted and not (refused, not ours): this window's and
        # the one before's, so the verdict never rests on a few requests.
        self._window_end = float("-inf")
        self._accepted = self._others = 0
        self._accepted_before = self._others_before = 0
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

    def outcome(self, *, accepted: bool) -> None:
        """Count what became of a new token: accepted, or refused / not ours."""
        self._roll(self._monotonic())
        if accepted:
            self._accepted += 1
        else:
            self._others += 1

    def _roll(self, now: float) -> None:
        if now < self._window_end:
            return
        if now < self._window_end + self._window:
            self._accepted_before, self._others_before = self._accepted, self._others
        else:
            self._accepted_before = self._others_before = 0
        self._accepted = self._others = 0
        self._window_end = now + self._window

    def _holds(self) -> bool:
        """Whether the rule applies now: users to protect, and a flood of junk."""
        now = self._monotonic()
        if now >= self._warm_until:
            return False
        self._roll(now)
        junk = self._others + self._others_before
        return junk > self._accepted + self._accepted_before

    def ready(self) -> bool:
        """Whether a new token may start now; if not, ``wait`` for its turn."""
        if self._per_turn <= 0:
            return True
        if not self._waiters:
            if not self._holds():
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
        budget = self._per_turn if self._holds() else len(waiters)
        while waiters and self._started < budget:
            future = waiters.popleft()
            if future.done():
                continue
            future.set_result(None)
            self._started += 1
        if waiters or self._started:
            self._schedule()
