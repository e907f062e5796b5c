"""Admission: which cacheable requests may store what they fetch."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from proxy.speak import CacheKey

# How long a request counts towards cache.min_uses, and how many keys are counted at once.
USE_WINDOW_SECONDS = 86_400.0
MAX_COUNTED_KEYS = 100_000


class Admission:
    """Counts requests per key and text; stores on the Nth (`cache.min_uses`)."""

    def __init__(
        self,
        *,
        min_uses: int,
        max_text_chars: int,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_uses = min_uses
        self.max_text_chars = max_text_chars
        self._uses: TTLCache[tuple[CacheKey, str], int] | None = (
            TTLCache(maxsize=MAX_COUNTED_KEYS, ttl=USE_WINDOW_SECONDS, timer=timer)
            if min_uses > 1
            else None
        )

    def text_allowed(self, text: str) -> bool:
        """False for texts too long to be worth caching (they bypass the cache entirely)."""
        return self.max_text_chars <= 0 or len(text) <= self.max_text_chars

    def count_use(self, key: CacheKey, text_sha256: str) -> bool:
        """Count one more request; True once it has been asked for `min_uses` times."""
        if self._uses is None:
            return True
        pair = (key, text_sha256)
        uses = self._uses.get(pair, 0) + 1
        self._uses[pair] = uses
        return uses >= self.min_uses
