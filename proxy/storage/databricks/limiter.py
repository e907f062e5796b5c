"""CallLimiter: one process's Files API calls within a concurrency and a rate, reads first.

The Files API allows a workspace about 10 concurrent requests and 100 per second; every replica
takes a share (`cache.volume.max_concurrent_calls`, `max_calls_per_second`). A call waits for a
slot (reads, which a client waits for, before writes, which nobody waits for), and a 429 pauses
every call of the process for its Retry-After, not only the one that was refused.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.storage.tiers import VolumeBusy

READ, WRITE = 0, 1


class CallLimiter:
    """At most `concurrency` calls at once, started at most `rate` per second (a token bucket
    as deep as the concurrency), in priority order; `pause()` holds every start back."""

    def __init__(self, concurrency: int, rate: float) -> None:
        if concurrency < 1 or rate <= 0:
            raise ValueError("the Files API limits must be at least 1 call and above 0 per second")
        self.concurrency = concurrency
        self.rate = rate
        self.wait_seconds = 0.0  # time calls spent waiting for a slot, in all
        self.waited = 0  # calls that had to wait
        self.refused = 0  # calls given up for want of a slot in their time (VolumeBusy)
        self._in_flight = 0
        self._tokens = float(concurrency)
        self._refilled_at: float | None = None
        self._paused_until = 0.0
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._in_flight

    @asynccontextmanager
    async def slot(self, priority: int, until: float | None = None) -> AsyncIterator[None]:
        """Hold a slot for one call (READ before WRITE); released on exit, whatever happens.

        VolumeBusy when no slot was free by `until` (the loop's clock): a lookup waits for a
        slot only within its budget. When the calls queued ahead cannot all start by then even
        at the full rate, it is raised at once: a miss goes upstream without waiting in vain.
        """
        if until is None:
            await self._acquire(priority)
        else:
            if self._earliest_start(priority) > until:
                self.refused += 1
                raise VolumeBusy("the Files API call budget is taken until past this call's time")
            try:
                async with asyncio.timeout_at(until):
                    await self._acquire(priority)
            except TimeoutError:
                self.refused += 1
                raise VolumeBusy("no Files API call slot came free in this call's time") from None
        try:
            yield
        finally:
            self._release()

    def _earliest_start(self, priority: int) -> float:
        """The soonest a call queued now at `priority` could start (a lower bound: the rate's
        and any pause's, not the concurrency's, which depends on how long calls take)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        ahead = sum(1 for p, _, waiter in self._queue if p <= priority and not waiter.done())
        tokens = self._tokens
        if self._refilled_at is not None:
            tokens = min(float(self.concurrency), tokens + (now - self._refilled_at) * self.rate)
        by_rate = now + max(0.0, ahead + 1 - tokens) / self.rate
        return max(by_rate, self._paused_until)

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds` (a 429's Retry-After): the whole process slows down."""
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + max(0.0, seconds))
        self._schedule(loop)

    async def _acquire(self, priority: int) -> None:
        loop = asyncio.get_running_loop()
        if not self._queue and self._take(loop.time()):
            return
        started = loop.time()
        waiter: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._queue, (priority, next(self._order), waiter))
        self._dispatch()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted as the caller was cancelled: give it back
            raise
        finally:
            self.waited += 1
            self.wait_seconds += loop.time() - started

    def _take(self, now: float) -> bool:
        if now < self._paused_until or self._in_flight >= self.concurrency:
            return False
        if self._refilled_at is not None:
            elapsed = now - self._refilled_at
            self._tokens = min(float(self.concurrency), self._tokens + elapsed * self.rate)
        self._refilled_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self._in_flight += 1
        return True

    def _release(self) -> None:
        self._in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while queue:
            waiter = queue[0][2]
            if waiter.done():  # its caller gave up
                heapq.heappop(queue)
                continue
            if not self._take(loop.time()):
                break
            heapq.heappop(queue)
            waiter.set_result(None)
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the queue when time, not a release, is what it waits for."""
        if not self._queue or self._timer is not None:
            return
        now = loop.time()
        if now < self._paused_until:
            delay = self._paused_until - now
        elif self._in_flight < self.concurrency and self._tokens < 1.0:
            delay = (1.0 - self._tokens) / self.rate
        else:
            return  # a release will dispatch
        self._timer = loop.call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._dispatch()
