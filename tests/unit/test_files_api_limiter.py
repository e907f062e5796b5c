"""CallLimiter: a concurrency, a rate, reads before writes, and a 429 pausing every call."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from proxy.storage.databricks.limiter import READ, WRITE, CallLimiter
from proxy.storage.tiers import VolumeBusy


async def test_no_more_than_the_concurrency_at_once_and_reads_go_first() -> None:
    limiter = CallLimiter(concurrency=2, rate=1000.0)
    started: list[str] = []
    release = asyncio.Event()

    async def call(name: str, priority: int) -> None:
        async with limiter.slot(priority):
            started.append(name)
            assert limiter.in_flight <= 2
            await release.wait()

    holders = [asyncio.create_task(call(f"hold{i}", WRITE)) for i in range(2)]
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(call("write", WRITE)), asyncio.create_task(call("read", READ))]
    await asyncio.sleep(0.01)
    assert started == ["hold0", "hold1"]  # the other two wait for a slot
    release.set()
    await asyncio.gather(*holders, *waiting)
    assert started[2:] == ["read", "write"]  # a read, which a client waits for, goes first
    assert limiter.waited == 2 and limiter.wait_seconds > 0


async def test_starts_are_spaced_by_the_rate() -> None:
    limiter = CallLimiter(concurrency=1, rate=20.0)  # after the first, one start per 50 ms
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def call() -> None:
        async with limiter.slot(READ):
            times.append(loop.time())

    await asyncio.gather(*(call() for _ in range(4)))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.04 for gap in gaps), gaps


async def test_a_pause_holds_every_call_back() -> None:
    limiter = CallLimiter(concurrency=8, rate=1000.0)
    loop = asyncio.get_running_loop()
    limiter.pause(0.2)
    started = loop.time()
    async with limiter.slot(READ):
        waited = loop.time() - started
    assert 0.18 <= waited < 1.0


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    limiter = CallLimiter(concurrency=1, rate=1000.0)
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot(WRITE):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    gone.cancel()
    release.set()
    await holder
    async with limiter.slot(READ):  # not kept waiting by the cancelled one
        assert limiter.in_flight == 1
    assert limiter.in_flight == 0


async def test_a_call_that_cannot_start_in_its_time_is_refused_at_once() -> None:
    limiter = CallLimiter(concurrency=2, rate=10.0)
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot(READ):
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(6)]  # 2 started, 4 queued
    await asyncio.sleep(0.01)
    # Four reads ahead at ten starts a second: nothing queued now starts within 0.2 s.
    started = loop.time()
    with pytest.raises(VolumeBusy):
        async with limiter.slot(READ, until=started + 0.2):
            pytest.fail("no slot was free")
    assert loop.time() - started < 0.05  # refused without waiting in vain
    assert limiter.refused == 1
    # A write queued behind the reads is judged by every call ahead of it too.
    with pytest.raises(VolumeBusy):
        async with limiter.slot(WRITE, until=loop.time() + 0.2):
            pytest.fail("no slot was free")
    release.set()
    await asyncio.gather(*holders)


async def test_a_call_within_reach_waits_and_is_refused_when_its_time_runs_out() -> None:
    limiter = CallLimiter(concurrency=1, rate=1000.0)
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot(READ):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    started = loop.time()
    with pytest.raises(VolumeBusy):  # the rate allows it; the one slot never comes free
        async with limiter.slot(READ, until=started + 0.1):
            pytest.fail("no slot was free")
    assert 0.09 <= loop.time() - started < 0.5
    release.set()
    await holder
    async with limiter.slot(READ, until=loop.time() + 0.1):
        assert limiter.in_flight == 1  # the refused caller left no slot taken
    assert limiter.refused == 1


async def test_a_pause_past_a_calls_time_refuses_it_at_once() -> None:
    limiter = CallLimiter(concurrency=8, rate=1000.0)
    loop = asyncio.get_running_loop()
    limiter.pause(1.0)
    started = loop.time()
    with pytest.raises(VolumeBusy):
        async with limiter.slot(READ, until=started + 0.1):
            pytest.fail("paused")
    assert loop.time() - started < 0.05
