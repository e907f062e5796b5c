"""CallLimiter: a concurrency, a rate, reads before writes, and a 429 pausing every call."""

from __future__ import annotations

import asyncio
import itertools

from proxy.storage.databricks.limiter import READ, WRITE, CallLimiter


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
