"""CircuitBreaker: stop calling a failing dependency for a while, then probe it with one call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Consecutive failures open it; after a cooldown one trial call decides whether it closes.

    Every caller asks `allow()` before a call and reports exactly one of `record_success()`,
    `record_failure()` or `release()` (no verdict, e.g. the caller was cancelled) afterwards.
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown_seconds < 0:
            raise ValueError("cooldown_seconds must be 0 or more")
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        """closed (calls flow), open (calls fail fast) or half-open (one trial call is running)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    def allow(self) -> bool:
        """True when a call may go ahead now; after the cooldown, only the first caller may."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._clock() - self._opened_at < self.cooldown_seconds:
                return False
            self._state = "half-open"
            self._trial_running = True
            return True
        # Half-open: the trial call decides; everyone else keeps failing fast meanwhile.
        if self._trial_running:
            return False
        self._trial_running = True
        return True

    def record_success(self) -> None:
        """A call succeeded: close the breaker and forget earlier failures."""
        self._state = "closed"
        self._failures = 0
        self._trial_running = False

    def record_failure(self) -> None:
        """A call failed: open at the threshold, or reopen when the trial call failed."""
        self._failures += 1
        if self._state == "half-open" or self._failures >= self.failure_threshold:
            self._state = "open"
            self._opened_at = self._clock()
        self._trial_running = False

    def release(self) -> None:
        """A call ended without a verdict: free the trial slot so the next caller may probe."""
        self._trial_running = False
