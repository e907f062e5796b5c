"""The replay: a Zipf workload over many users, messages and voices, against ours and nginx."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Final

from bench.loadgen import LoadRun, closed_loop, percentile
from bench.peers import Peer, Unavailable
from bench.procs import rss_bytes
from bench.results import Row, failed
from bench.scenarios import FAST_BEHAVIOUR, MIB, Bench, absent, row_from_run
from bench.workload import Replay, zipf_replay

REPLAY: Final = "replay"


async def replay(bench: Bench) -> None:
    """Hit ratio, syntheses per key, throughput and resident memory under a realistic replay."""
    await bench.backend.behave(**FAST_BEHAVIOUR)
    options = bench.options
    workload = zipf_replay(requests=options.replay_requests)
    size = int(FAST_BEHAVIOUR["size"])
    for key in ("ours-replay", "nginx", "seed-style"):
        peer = await bench.peer(key)
        if isinstance(peer, Unavailable):
            bench.add(absent(REPLAY, peer, size))
            continue
        cap = options.seed_replay_seconds if key == "seed-style" else None
        try:
            rss_before = rss_bytes(peer.pid)
            before = await bench.backend.calls()
            run = await closed_loop(
                peer.speak_url,
                workload.calls,
                concurrency=options.replay_concurrency,
                max_seconds=cap,
            )
            upstream = await bench.backend.calls() - before
            await asyncio.sleep(0.5)  # write-behind settles before memory is read
            rss_after = rss_bytes(peer.pid)
        except Exception as exc:
            bench.add(failed(REPLAY, peer.key, peer.label, size, exc))
            continue
        row = replay_row(REPLAY, peer, size, run, workload, upstream)
        if peer.kind in ("ours", "seed-style"):
            row.extra["rss_before_mib"] = rss_before / MIB
            row.extra["rss_mib"] = rss_after / MIB
            row.extra["memory_max_bytes"] = int(peer.settings.get("cache.memory.max_bytes", 0))
        if cap is not None and len(run.samples) + run.failures < len(workload.calls):
            sent = len(run.samples) + run.failures
            row.notes.append(f"stopped after {cap:g} s: {sent} of {len(workload.calls)} requests")
        bench.add(row)


def replay_row(
    scenario: str, peer: Peer, size: int, run: LoadRun, workload: Replay, upstream: int
) -> Row:
    """The row of a replay: its numbers, hit ratios (whole and per tier) and syntheses per key."""
    row = row_from_run(scenario, peer, size, run)
    sent = len(run.samples) + run.failures
    distinct = len({(c.user, c.body) for c in workload.calls[:sent]})
    row.extra.update(
        upstream_calls=upstream,
        upstream_calls_saved=sent - upstream,
        hit_ratio=1 - upstream / sent if sent else math.nan,
        ideal_hit_ratio=1 - distinct / sent if sent else math.nan,
        distinct_keys=distinct,
        syntheses_per_key=upstream / distinct if distinct else math.nan,
    )
    if peer.kind != "nginx":
        tiers = Counter(s.tier or s.cache for s in run.samples)
        row.extra["answers_by_tier"] = dict(tiers)
        volume_ttfb = [s.ttfb * 1000 for s in run.samples if s.tier == "volume"]
        if volume_ttfb:
            row.extra["volume_hit_ttfb_p50_ms"] = percentile(volume_ttfb, 50)
            row.extra["volume_hit_ttfb_p99_ms"] = percentile(volume_ttfb, 99)
    return row
