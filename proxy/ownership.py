"""Ownership checks against the legacy messages table: fail closed, remember positives briefly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cachetools import TTLCache

from proxy.index.legacy import LegacyMessages
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey

log = logging.getLogger(__name__)


class OwnershipCheck:
    """Whether a user owns a message; unknown counts as no (fail closed)."""

    def __init__(
        self,
        legacy: LegacyMessages | None,
        *,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self._legacy = legacy
        # Only positive answers are remembered: a message may gain an owner, not change one.
        self._owned: TTLCache[tuple[str, str], bool] | None = (
            TTLCache(maxsize=max_entries, ttl=cache_seconds, timer=clock)
            if cache_seconds > 0
            else None
        )
        self.failures = 0
        self.denied = 0

    async def allows(self, key: CacheKey) -> bool:
        """True only when the legacy table says `key.user` owns `key.message_id`."""
        pair = (key.user, key.message_id)
        if self._owned is not None and self._owned.get(pair):
            return True
        if self._legacy is None:
            self.failures += 1
            return False
        try:
            owned = await self._legacy.owns(key.user, key.message_id)
        except IndexUnavailable:
            self.failures += 1
            log.debug("ownership of %s unknown: index unavailable", key.digest())
            return False
        if not owned:
            self.denied += 1
            return False
        if self._owned is not None:
            self._owned[pair] = True
        return True

    def forget(self, user: str) -> None:
        """Drop remembered answers for `user` (after a purge)."""
        if self._owned is not None:
            for pair in [p for p in self._owned if p[0] == user]:
                self._owned.pop(pair, None)
