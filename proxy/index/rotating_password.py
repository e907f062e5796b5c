"""RotatingPassword: a short-lived database password (an OAuth token) kept fresh ahead of expiry.

Lakebase checks the token only at login, so an open connection outlives its token; only a new
connection needs a valid one. A background task fetches a new token when part of the current
one's life has gone (`refresh_fraction`), so opening a connection reads a string and never waits
on a fetch. A failed refresh is counted, logged (rate-limited) and retried with backoff while
the last good token stays in use; once that has expired too, `__call__` raises
PasswordUnavailable, which the pool treats as an outage (the index is skipped, the proxy serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

# Refresh when this share of a token's life has gone: half a one-hour token is left to retry in.
DEFAULT_REFRESH_FRACTION: Final = 0.5
# A source that gives no expiry (a personal access token) is re-read this often.
UNKNOWN_EXPIRY_REFRESH_SECONDS: Final = 600.0
# A token is not offered for a login this close to its expiry (or a tenth of a short life).
EXPIRY_MARGIN_SECONDS: Final = 30.0
# The token endpoint call has no timeout of its own in the SDK: past this it counts as failed.
FETCH_TIMEOUT_SECONDS: Final = 30.0
RETRY_INITIAL_SECONDS: Final = 1.0
RETRY_MAX_SECONDS: Final = 60.0
# While refreshes keep failing, one warning per this many seconds (the rest at debug).
FAILURE_LOG_SECONDS: Final = 60.0
# Never refresh more often than this, whatever the token's life (an expired one is a failure).
MIN_REFRESH_SECONDS: Final = 0.1
_MAX_REASON_CHARS: Final = 160


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token and when it expires (epoch seconds), None when the source does not say."""

    value: str
    expires_at: float | None = None

    def __repr__(self) -> str:
        return f"IssuedToken(value=***, expires_at={self.expires_at!r})"


class PasswordUnavailable(Exception):
    """No valid password now: the refreshes failed and the last token has expired."""


TokenSource = Callable[[], IssuedToken]


class RotatingPassword:
    """The current token of a TokenSource (a blocking call, run in a thread), refreshed early.

    Callable with no argument, as asyncpg calls a password for every new connection.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        refresh_fraction: float = DEFAULT_REFRESH_FRACTION,
        unknown_expiry_refresh_seconds: float = UNKNOWN_EXPIRY_REFRESH_SECONDS,
        fetch_timeout_seconds: float = FETCH_TIMEOUT_SECONDS,
        retry_initial_seconds: float = RETRY_INITIAL_SECONDS,
        retry_max_seconds: float = RETRY_MAX_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be between 0 and 1")
        self._source = source
        self._fraction = refresh_fraction
        self._unknown_refresh = unknown_expiry_refresh_seconds
        self._fetch_timeout = fetch_timeout_seconds
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._clock = clock
        self.refreshes = 0
        self.failures = 0
        self._token: IssuedToken | None = None
        self._usable_until: float | None = None
        self._failing = 0
        self._logged_at = -FAILURE_LOG_SECONDS
        self._expiry_logged = False
        self._settled = asyncio.Event()
        self._refreshed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # A fetch still running in its thread after its timeout: awaited again, never doubled.
        self._fetch: asyncio.Future[IssuedToken] | None = None

    def __call__(self) -> str:
        """The current token; PasswordUnavailable when there is none still valid. Never waits."""
        token = self._token
        if token is None or not self.valid:
            raise PasswordUnavailable("no valid database token: none fetched, or it expired")
        return token.value

    @property
    def valid(self) -> bool:
        """True while the current token may be offered for a login."""
        if self._token is None:
            return False
        return self._usable_until is None or self._clock() < self._usable_until

    @property
    def seconds_left(self) -> float | None:
        """Seconds the current token may still be offered (0 when none); None: no expiry known."""
        if self._token is None:
            return 0.0
        if self._usable_until is None:
            return None
        return max(0.0, self._usable_until - self._clock())

    async def start(self, wait_seconds: float) -> None:
        """Start refreshing; wait up to `wait_seconds` for the first token (never raises)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name="database-token"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), wait_seconds)

    async def aclose(self) -> None:
        """Stop refreshing (a fetch still in its thread is left to finish on its own)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_refreshed(self, seconds: float) -> bool:
        """Wait up to `seconds` for the next successful refresh; True if one came."""
        self._refreshed.clear()
        try:
            await asyncio.wait_for(self._refreshed.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _refresh_forever(self) -> None:
        backoff = self._retry_initial
        while True:
            if await self._refresh_once():
                backoff = self._retry_initial
                delay = self._next_refresh_in()
            else:
                delay, backoff = backoff, min(backoff * 2, self._retry_max)
            self._settled.set()
            await asyncio.sleep(delay)

    async def _refresh_once(self) -> bool:
        try:
            token = await self._fetch_token()
            if not token.value:
                raise ValueError("the token source gave an empty token")
            if token.expires_at is not None and token.expires_at <= self._clock():
                raise ValueError("the token source gave an expired token")
        except Exception as exc:
            self._failed(exc)
            return False
        self._accept(token)
        return True

    async def _fetch_token(self) -> IssuedToken:
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(asyncio.to_thread(self._source))
            self._fetch.add_done_callback(_retrieve)
        fetch = self._fetch
        try:
            token = await asyncio.wait_for(asyncio.shield(fetch), self._fetch_timeout)
        except TimeoutError:
            # Kept: the next attempt takes its answer rather than starting a second call.
            raise TimeoutError(f"no token within {self._fetch_timeout:g}s") from None
        except BaseException:
            self._fetch = None
            raise
        self._fetch = None
        return token

    def _accept(self, token: IssuedToken) -> None:
        now = self._clock()
        self._token = token
        if token.expires_at is None:
            self._usable_until = None
        else:
            life = max(0.0, token.expires_at - now)
            self._usable_until = token.expires_at - min(EXPIRY_MARGIN_SECONDS, life / 10)
        self.refreshes += 1
        if self._failing:
            log.info("database token refreshed again after %d failed attempts", self._failing)
        else:
            log.debug("database token refreshed (%s)", _lifetime(token, now))
        self._failing = 0
        self._expiry_logged = False
        self._refreshed.set()

    def _next_refresh_in(self) -> float:
        token = self._token
        if token is None or token.expires_at is None:
            return self._unknown_refresh
        life = token.expires_at - self._clock()
        return max(MIN_REFRESH_SECONDS, life * self._fraction)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._failing += 1
        reason = self._reason(exc)
        left = self.seconds_left
        if left is None or left > 0:
            still = "the current token stays in use" + (f" for {left:.0f}s" if left else "")
        else:
            still = "no valid token: the index is skipped until a refresh succeeds"
        now = time.monotonic()
        expired_now = left == 0 and not self._expiry_logged
        if self._failing == 1 or expired_now or now - self._logged_at >= FAILURE_LOG_SECONDS:
            self._logged_at = now
            self._expiry_logged = self._expiry_logged or left == 0
            log.warning(
                "database token refresh failed (%s, %d in a row); %s; retrying",
                reason,
                self._failing,
                still,
            )
        else:
            log.debug("database token refresh failed again (%s)", reason)

    def _reason(self, exc: BaseException) -> str:
        # The type and the first line of the message, which the SDK builds from the token
        # endpoint's error code and summary; never the token itself.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if self._token is not None and self._token.value:
            first = first.replace(self._token.value, "***")
        first = first[:_MAX_REASON_CHARS]
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _retrieve(fetch: asyncio.Future[IssuedToken]) -> None:
    # A fetch nobody awaits any more (closed, or timed out) must not be reported as unretrieved.
    if not fetch.cancelled():
        fetch.exception()


def _lifetime(token: IssuedToken, now: float) -> str:
    if token.expires_at is None:
        return "no expiry given"
    return f"valid for {token.expires_at - now:.0f}s"
