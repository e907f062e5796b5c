"""The overview page's numbers: outcomes, savings, tiers, latency, errors and health."""

from __future__ import annotations

from typing import Any

from proxy.admin.api import AdminApi
from proxy.admin.chart import HEIGHT, WIDTH, hit_ratio_bars
from proxy.admin.history import History, requests_per_second


def ratio(part: int, whole: int) -> float | None:
    """part / whole, None when there is nothing to divide."""
    return part / whole if whole else None


async def overview(api: AdminApi, history: History) -> dict[str, Any]:
    """Everything the overview shows, read now: with workers, the whole group's numbers."""
    history.sample()
    group = await api.group_sample(detail=True)
    sample = group.sample
    snapshot = await api.snapshot(group)
    memory_hits, volume_hits = sample.hits["memory"], sample.hits["volume"]
    hits = memory_hits + volume_hits
    misses = sample.misses + sample.coalesced
    hour = sample.minutes or history.last_hour()
    hour_hits = sum(m.memory_hits + m.volume_hits for m in hour)
    hour_cacheable = sum(m.cacheable for m in hour)
    latency = sample.upstream_seconds
    return {
        "requests": {
            "memory_hits": memory_hits,
            "volume_hits": volume_hits,
            "hits": hits,
            "misses": misses,
            "coalesced": sample.coalesced,
            "disabled": sample.disabled,
            "upstream_calls": sample.upstream_calls,
            "stored": sample.stored,
            # Every hit and every joined miss is a synthesis the upstream did not do.
            "saved": hits + sample.coalesced,
        },
        "processes": group.describe(),
        "hit_ratio": ratio(hits, hits + misses),
        "hour_hit_ratio": ratio(hour_hits, hour_cacheable),
        "rps": requests_per_second(hour, now=history.clock(), started=history.started),
        "tiers": snapshot["tiers"],
        "top_users": snapshot["top_users"][:5],
        "latency": {
            "p50": latency.percentile(0.50),
            "p99": latency.percentile(0.99),
            "count": latency.count,
        },
        "errors": dict(sorted(sample.errors.items())),
        "health": health(api),
        "janitor": snapshot["janitor"],
        "disk": snapshot["disk"],
        "evictions": dict(sample.evictions),
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
