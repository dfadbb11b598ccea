"""Turns for new tokens: per turn while junk floods in beside remembered users; FIFO; bounded."""

from __future__ import annotations

import asyncio

import pytest

from proxy.admission import Admission
from proxy.config import AdmissionSettings
from proxy.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, **kw: int | float) -> Admission:
    return Admission(AdmissionSettings(**kw), monotonic=clock)  # type: ignore[arg-type]


def flooded(adm: Admission, junk: int = 5) -> Admission:
    """Remembered users are being served, and recent new tokens were junk."""
    adm.hit()
    for _ in range(junk):
        adm.outcome(accepted=False)
    return adm


async def start_all(
    adm: Admission, n: int, started: list[int]
) -> list[asyncio.Task[None]]:
    async def new_token(i: int) -> None:
        if not adm.ready():
            await adm.wait()
        started.append(i)

    return [asyncio.create_task(new_token(i)) for i in range(n)]


async def turns_until_done(
    tasks: list[asyncio.Task[None]], started: list[int]
) -> list[int]:
    """How many had started after each turn, until all have."""
    progress = []
    for _ in range(200):
        await asyncio.sleep(0)
        progress.append(len(started))
        if all(t.done() for t in tasks):
            return progress
    raise AssertionError(f"new tokens still waiting after 200 turns: {progress[-5:]}")


async def test_without_remembered_traffic_nothing_waits() -> None:
    clock = Clock()
    adm = admission(clock)
    assert all(adm.ready() for _ in range(1000))
    started: list[int] = []
    tasks = await start_all(adm, 50, started)
    await asyncio.sleep(0)
    assert len(started) == 50
    assert adm.waited == 0
    assert all(t.done() for t in tasks)


@pytest.mark.parametrize("per_turn", [1, 3])
async def test_while_users_are_served_new_tokens_start_per_turn_in_order(
    per_turn: int,
) -> None:
    clock = Clock()
    adm = flooded(admission(clock, per_turn=per_turn))
    started: list[int] = []
    tasks = await start_all(adm, 12, started)
    progress = await turns_until_done(tasks, started)
    steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
    assert max(steps) <= per_turn, steps
    assert len(progress) >= 12 // per_turn
    assert started == list(range(12)), "first come, first served"
    assert adm.waited == 12 - per_turn
    assert adm.waiting == 0


async def test_turn_off_with_zero() -> None:
    clock = Clock()
    adm = flooded(admission(clock, per_turn=0))
    assert all(adm.ready() for _ in range(100))


async def test_waiters_all_go_once_remembered_traffic_stops() -> None:
    clock = Clock()
    adm = flooded(admission(clock, per_turn=1, window=1.0))
    started: list[int] = []
    tasks = await start_all(adm, 10, started)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert 1 <= len(started) <= 3
    clock.now += 1.5  # no accepted cached answer for longer than the window
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(started) == 10
    assert all(t.done() for t in tasks)


async def test_a_full_queue_refuses_at_once_and_changes_nothing() -> None:
    clock = Clock()
    adm = flooded(admission(clock, per_turn=1, max_waiting=3))
    started: list[int] = []
    tasks = await start_all(adm, 4, started)
    await asyncio.sleep(0)  # one started, three wait
    assert adm.waiting == 3
    with pytest.raises(Overloaded) as caught:
        await adm.wait()
    assert caught.value.temporary
    assert caught.value.reason == "overloaded"
    assert "3 new tokens are already waiting" in str(caught.value)
    assert adm.waiting == 3
    assert adm.shed == 1
    await turns_until_done(tasks, started)
    assert started == [0, 1, 2, 3]


async def test_a_waiter_whose_client_left_gives_its_turn_to_the_next() -> None:
    clock = Clock()
    adm = flooded(admission(clock, per_turn=1))
    started: list[int] = []
    tasks = await start_all(adm, 4, started)
    await asyncio.sleep(0)
    assert started == [0]
    tasks[1].cancel()
    progress = await turns_until_done(tasks, started)
    assert started == [0, 2, 3]
    # One start per turn, and no turn lost to the cancelled place (a turn
    # that started nobody would repeat a count).
    assert progress == [1, 2, 3]
    assert tasks[1].cancelled()


async def test_a_wave_of_logins_is_not_held_back() -> None:
    """New tokens that are mostly accepted are logins, not a flood: no turns."""
    clock = Clock()
    adm = admission(clock, per_turn=1)
    adm.hit()
    for accepted in (True, True, False):
        adm.outcome(accepted=accepted)
    started: list[int] = []
    await start_all(adm, 20, started)
    await asyncio.sleep(0)
    assert len(started) == 20
    assert adm.waited == 0


async def test_the_rule_follows_what_new_tokens_turn_out_to_be() -> None:
    clock = Clock()
    adm = admission(clock, per_turn=1, window=1.0)
    adm.hit()
    adm.outcome(accepted=True)
    assert adm.ready()
    adm.outcome(accepted=False)
    assert adm.ready(), "one refusal against one acceptance is no flood"
    adm.outcome(accepted=False)
    assert adm.ready(), "the first start of this turn"
    assert not adm.ready(), "junk now outnumbers logins: one start per turn"
    # The window before still counts; two windows later it is forgotten.
    clock.now += 1.2
    adm.hit()
    await asyncio.sleep(0)  # a new turn
    assert adm.ready()
    assert not adm.ready()
    clock.now += 2.5
    adm.hit()
    await asyncio.sleep(0)
    assert all(adm.ready() for _ in range(10))
