"""Latency histograms, the per-minute history and the chart geometry: pure, with a fake clock."""

from __future__ import annotations

import pytest

from proxy.admin.chart import hit_ratio_bars
from proxy.admin.history import History, Minute
from proxy.latency import BUCKETS, Latency
from proxy.stats import CacheStats


class Clock:
    def __init__(self, now: float = 6_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_latency_buckets_are_cumulative_and_end_with_inf() -> None:
    latency = Latency()
    for seconds in (0.0004, 0.003, 0.003, 0.2, 100.0):
        latency.observe(seconds)
    buckets = dict(latency.buckets())
    assert len(buckets) == len(BUCKETS) + 1
    assert buckets["0.0005"] == 1
    assert buckets["0.005"] == 3
    assert buckets["0.25"] == 4
    assert buckets["60.0"] == 4
    assert buckets["+Inf"] == 5
    assert latency.count == 5
    assert latency.sum == pytest.approx(100.2064)


def test_latency_percentiles_use_the_nearest_rank() -> None:
    latency = Latency()
    assert latency.percentile(0.5) is None
    for ms in range(1, 101):
        latency.observe(ms / 1000)
    assert latency.percentile(0.5) == pytest.approx(0.050)
    assert latency.percentile(0.99) == pytest.approx(0.099)
    assert latency.percentile(1.0) == pytest.approx(0.100)


def test_history_moves_deltas_into_the_minute_they_happened() -> None:
    stats = CacheStats()
    clock = Clock()
    history = History(stats, clock=clock)
    stats.hits["memory"] += 3
    stats.misses += 1
    history.sample()
    clock.now += 120
    stats.hits["volume"] += 2
    stats.coalesced += 1
    stats.disabled += 4
    history.sample()

    hour = history.last_hour()
    assert len(hour) == 60
    assert hour[-1].volume_hits == 2 and hour[-1].coalesced == 1 and hour[-1].disabled == 4
    assert hour[-3].memory_hits == 3 and hour[-3].misses == 1
    assert hour[-2].requests == 0  # the quiet minute between
    assert sum(m.requests for m in hour) == 11


def test_history_forgets_what_is_older_than_an_hour() -> None:
    stats = CacheStats()
    clock = Clock()
    history = History(stats, clock=clock)
    stats.misses += 5
    history.sample()
    clock.now += 61 * 60
    history.sample()
    assert sum(m.misses for m in history.last_hour()) == 0


def test_the_chart_stacks_memory_volume_and_misses_to_the_full_height() -> None:
    minutes = [Minute(1), Minute(2, memory_hits=2, volume_hits=1, misses=1)]
    bars = hit_ratio_bars(minutes, width=100, height=100)
    assert len(bars) == 1  # the empty minute has no bar
    kinds = {s.kind: s for s in bars[0].segments}
    assert kinds["memory"].height == 50 and kinds["memory"].y == 50
    assert kinds["volume"].height == 25 and kinds["volume"].y == 25
    assert kinds["miss"].height == 25 and kinds["miss"].y == 0
    assert bars[0].x == pytest.approx(50.5)
