"""RotatingPassword with a token source whose tokens expire: early refresh, failures, recovery."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.index.rotating_password import IssuedToken, PasswordUnavailable, RotatingPassword


class Issuer:
    """Numbered tokens living `life` seconds (or without expiry); fails or hangs on demand."""

    def __init__(self, life: float | None) -> None:
        self.life = life
        self.calls = 0
        self.failing = False
        self.hanging = threading.Event()
        self.released = threading.Event()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self) -> IssuedToken:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if self.hanging.is_set():
                self.released.wait(10)
            self.calls += 1
            if self.failing:
                raise ValueError("invalid_client: Client authentication failed.")
            expires = None if self.life is None else time.time() + self.life
            return IssuedToken(f"token-{self.calls}", expires)
        finally:
            with self._lock:
                self.active -= 1


Make = Callable[..., RotatingPassword]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[RotatingPassword] = []

    def build(issuer: Issuer, **options: float) -> RotatingPassword:
        options.setdefault("retry_initial_seconds", 0.05)
        options.setdefault("retry_max_seconds", 0.1)
        password = RotatingPassword(issuer, **options)
        made.append(password)
        return password

    yield build
    for password in made:
        await password.aclose()


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.02)


async def test_refreshed_at_half_life_and_always_valid(make: Make) -> None:
    issuer = Issuer(life=1.0)
    password = make(issuer)
    await password.start(5.0)
    seen = set()
    deadline = time.monotonic() + 2.2  # past two lives: four halves
    while time.monotonic() < deadline:
        seen.add(password())  # never raises: a new token comes before the last one expires
        await asyncio.sleep(0.02)
    assert issuer.calls >= 4
    assert len(seen) >= 4
    assert password.failures == 0


async def test_a_failing_refresh_keeps_the_last_token_then_skips_then_recovers(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.index")
    issuer = Issuer(life=1.0)
    password = make(issuer)
    await password.start(5.0)
    assert password() == "token-1"

    issuer.failing = True
    await until(lambda: password.failures >= 2)
    assert password() == "token-1"  # still valid: the last good token stays in use
    await until(lambda: not password.valid)
    with pytest.raises(PasswordUnavailable):
        password()
    assert password.seconds_left == 0
    await until(lambda: password.failures >= 8)

    issuer.failing = False
    await until(lambda: password.valid)
    assert password() not in ("token-1", "")
    failures = password.failures
    await asyncio.sleep(0.2)
    assert password.failures == failures

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One line as it starts failing, one as the token runs out: not one per attempt.
    assert len(warnings) == 2
    assert "invalid_client" in warnings[0] and "stays in use" in warnings[0]
    assert "index is skipped" in warnings[1]
    recovered = [r.getMessage() for r in caplog.records if "refreshed again" in r.getMessage()]
    assert len(recovered) == 1
    assert "token-" not in caplog.text


async def test_a_hung_source_is_a_failure_and_never_called_twice_at_once(make: Make) -> None:
    issuer = Issuer(life=60.0)
    issuer.hanging.set()
    password = make(issuer, fetch_timeout_seconds=0.1)
    started = time.monotonic()
    await password.start(0.5)  # bounded, and never raises
    assert time.monotonic() - started < 2.0
    with pytest.raises(PasswordUnavailable):
        password()
    await until(lambda: password.failures >= 3)
    issuer.released.set()
    await until(lambda: password.valid)
    assert issuer.most_active == 1
    assert password() == "token-1"  # the hung call's own answer, not a second call's


async def test_a_token_without_expiry_is_read_again_on_a_timer(make: Make) -> None:
    issuer = Issuer(life=None)
    password = make(issuer, unknown_expiry_refresh_seconds=0.1)
    await password.start(5.0)
    assert password.seconds_left is None
    await until(lambda: issuer.calls >= 3)
    issuer.failing = True
    await until(lambda: password.failures >= 2)
    assert password.valid  # nothing says it expired: the last one stays in use
    assert password().startswith("token-")


def test_the_token_never_shows_in_its_repr() -> None:
    assert "secret" not in repr(IssuedToken("secret-token", 1.0))
