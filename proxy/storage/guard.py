"""guarded: one Volume call behind its circuit breaker and within a bound; overrunning it fails."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.storage.breaker import CircuitBreaker
from proxy.storage.tiers import CorruptEntry, VolumeUnavailable

T = TypeVar("T")


async def guarded(breaker: CircuitBreaker, seconds: float, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` behind `breaker`, abandoned after `seconds`.

    VolumeUnavailable at once while the breaker is open, or once `seconds` ran out (a hung
    disk's thread is left to finish on its own). A call that raised or ran out of time is a
    failure on the breaker; one that found a corrupt entry (CorruptEntry) answered: a success.
    """
    if not breaker.allow():
        raise VolumeUnavailable("the Volume circuit breaker is open")
    try:
        async with asyncio.timeout(seconds):
            result = await call()
    except asyncio.CancelledError:
        breaker.release()
        raise
    except CorruptEntry:
        breaker.record_success()
        raise
    except TimeoutError:
        breaker.record_failure()
        raise VolumeUnavailable(f"the Volume did not answer within {seconds:g}s") from None
    except Exception:
        breaker.record_failure()
        raise
    breaker.record_success()
    return result
