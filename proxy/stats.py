"""Counters since start: what the cache did with each speak request."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class CacheStats:
    """Outcomes counted by the cache plugin; read by the admin API and metrics."""

    hits: Counter[str] = field(default_factory=Counter)
    misses: int = 0
    coalesced: int = 0
    disabled: int = 0
    stored: int = 0
    upstream_calls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
