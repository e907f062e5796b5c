"""The overview page's numbers: outcomes, savings, tiers, latency, errors and health."""

from __future__ import annotations

from typing import Any

from proxy.admin.api import AdminApi
from proxy.admin.chart import HEIGHT, WIDTH, hit_ratio_bars
from proxy.admin.history import History
from proxy.metrics import error_counts


def ratio(part: int, whole: int) -> float | None:
    """part / whole, None when there is nothing to divide."""
    return part / whole if whole else None


async def overview(api: AdminApi, history: History) -> dict[str, Any]:
    """Everything the overview shows, read now."""
    history.sample()
    snapshot = await api.snapshot()
    stats = api.stats
    memory_hits, volume_hits = stats.hits["memory"], stats.hits["volume"]
    hits = memory_hits + volume_hits
    misses = stats.misses + stats.coalesced
    hour = history.last_hour()
    hour_hits = sum(m.memory_hits + m.volume_hits for m in hour)
    hour_cacheable = sum(m.cacheable for m in hour)
    latency = stats.upstream_seconds
    return {
        "requests": {
            "memory_hits": memory_hits,
            "volume_hits": volume_hits,
            "hits": hits,
            "misses": misses,
            "coalesced": stats.coalesced,
            "disabled": stats.disabled,
            "upstream_calls": stats.upstream_calls,
            "stored": stats.stored,
            # Every hit and every joined miss is a synthesis the upstream did not do.
            "saved": hits + stats.coalesced,
        },
        "hit_ratio": ratio(hits, hits + misses),
        "hour_hit_ratio": ratio(hour_hits, hour_cacheable),
        "rps": history.requests_per_second(),
        "tiers": snapshot["tiers"],
        "top_users": snapshot["top_users"][:5],
        "latency": {
            "p50": latency.percentile(0.50),
            "p99": latency.percentile(0.99),
            "count": latency.count,
        },
        "errors": error_counts(stats, api.cache, api.index),
        "health": health(api),
        "janitor": snapshot["janitor"],
        "disk": snapshot["disk"],
        "evictions": dict(stats.evictions),
        "chart": {"bars": hit_ratio_bars(hour), "width": WIDTH, "height": HEIGHT},
    }


def health(api: AdminApi) -> dict[str, str]:
    """The Volume's kind and breaker state, and the index's state, in words."""
    volume = api.cache.volume
    volume_state = volume.describe() if volume is not None else "none"
    if api.index is None:
        index_state = "not configured"
    else:
        index_state = "available" if api.index.available else "unavailable"
    return {"volume": volume_state, "index": index_state}
