"""CircuitBreaker: opens on consecutive failures, fails fast, probes once after the cooldown."""

from __future__ import annotations

import asyncio

import pytest

from proxy.storage.breaker import CircuitBreaker
from proxy.storage.guard import guarded
from proxy.storage.tiers import CorruptEntry, VolumeUnavailable


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_starts_closed_and_lets_calls_through(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30.0, clock=clock)
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(10))


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()


def test_a_success_resets_the_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(2, 30.0, clock=clock)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 1


def test_fails_fast_during_the_cooldown(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    breaker.record_failure()
    clock.now += 29.9
    assert not breaker.allow()
    assert breaker.state == "open"


def test_one_trial_after_cooldown_then_closes_on_success(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    breaker.record_failure()
    clock.now += 30.0
    assert breaker.allow()
    assert breaker.state == "half-open"
    # Only the trial call goes through while it runs.
    assert not breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow()


def test_failed_trial_reopens_for_a_fresh_cooldown(clock: FakeClock) -> None:
    breaker = CircuitBreaker(5, 30.0, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 31.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 29.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
    assert breaker.state == "half-open"


def test_release_frees_the_trial_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    breaker.record_failure()
    clock.now += 10.0
    assert breaker.allow()
    breaker.release()
    assert breaker.state == "half-open"
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"


def test_zero_cooldown_probes_at_once(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 0.0, clock=clock)
    breaker.record_failure()
    assert breaker.allow()
    assert breaker.state == "half-open"


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_rejects_bad_settings(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, cooldown)


# guarded: one bounded call behind the breaker


async def test_a_call_past_its_bound_is_a_failure_like_an_error(clock: FakeClock) -> None:
    breaker = CircuitBreaker(2, 30.0, clock=clock)

    async def hang() -> None:
        await asyncio.sleep(3600)

    async def fail() -> None:
        raise OSError("disk gone")

    with pytest.raises(VolumeUnavailable):
        await guarded(breaker, 0.01, hang)
    assert breaker.consecutive_failures == 1
    with pytest.raises(OSError):
        await guarded(breaker, 0.01, fail)
    assert breaker.state == "open"

    async def answer() -> int:
        return 1

    with pytest.raises(VolumeUnavailable, match="circuit breaker"):
        await guarded(breaker, 1.0, answer)  # not even called while open
    clock.now += 30.0
    assert await guarded(breaker, 1.0, answer) == 1
    assert breaker.state == "closed"


async def test_a_corrupt_entry_is_an_answer_and_a_cancelled_call_no_verdict(
    clock: FakeClock,
) -> None:
    breaker = CircuitBreaker(1, 30.0, clock=clock)

    async def corrupt() -> None:
        raise CorruptEntry("bad object")

    with pytest.raises(CorruptEntry):
        await guarded(breaker, 1.0, corrupt)
    assert breaker.state == "closed"

    task = asyncio.create_task(guarded(breaker, 10.0, lambda: asyncio.sleep(3600)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
