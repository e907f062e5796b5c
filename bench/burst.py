"""The burst: 100 identical misses at once; one upstream call, the others join it."""

from __future__ import annotations

import asyncio
import math

from bench.loadgen import Sample, burst, curve, percentile
from bench.peers import Peer, Unavailable
from bench.results import Row, failed
from bench.scenarios import BURST, MISS_BEHAVIOUR, Bench, absent, check_run
from bench.workload import speak_call


async def burst_of_misses(bench: Bench) -> None:
    """Upstream calls and first-byte lag of requests that joined a fill already in flight."""
    await bench.backend.behave(**MISS_BEHAVIOUR)
    options = bench.options
    size = int(MISS_BEHAVIOUR["size"])
    for key in ("ours-1w", "nginx"):
        peer = await bench.peer(key)
        if isinstance(peer, Unavailable):
            bench.add(absent(BURST, peer, size))
            continue
        samples: list[Sample] = []
        lags: list[float] = []
        leaders: list[float] = []
        calls_per_round: list[int] = []
        row = Row(BURST, peer.key, peer.label, size)
        try:
            for _ in range(options.burst_rounds):
                call = speak_call(bench.unique(f"burst-{key}"))
                before = await bench.backend.calls()
                run = await burst(
                    peer.speak_url, peer.url + peer.ping_path, call, options.burst_size
                )
                calls_per_round.append(await bench.backend.calls() - before)
                check_run(row, run, size)
                leader, joined = _split_leader(peer, run.samples, row)
                leaders.append(leader.ttfb * 1000)
                lags += [(s.first_byte_at - leader.first_byte_at) * 1000 for s in joined]
                samples += run.samples
                await asyncio.sleep(0.3)  # let write-behind finish before the next round
        except Exception as exc:
            bench.add(failed(BURST, peer.key, peer.label, size, exc))
            continue
        totals = [s.total * 1000 for s in samples]
        joined_ttfb = [s.ttfb * 1000 for s in samples]
        row.requests = len(samples)
        row.p50_ms, row.p99_ms = percentile(totals, 50), percentile(totals, 99)
        row.ttfb_p50_ms, row.ttfb_p99_ms = percentile(joined_ttfb, 50), percentile(joined_ttfb, 99)
        row.curves["ttfb"] = curve(joined_ttfb)
        row.curves["lag"] = curve(lags)
        row.extra.update(
            upstream_calls_per_round=calls_per_round,
            leader_ttfb_ms=leaders,
            joined_lag_p50_ms=percentile(lags, 50),
            joined_lag_p99_ms=percentile(lags, 99),
            joined_lag_max_ms=max(lags) if lags else math.nan,
        )
        bench.add(row)


def _split_leader(peer: Peer, samples: list[Sample], row: Row) -> tuple[Sample, list[Sample]]:
    """The request that started the upstream call, and those that joined it."""
    if peer.kind == "ours":
        leaders = [s for s in samples if "collapsed" not in s.cache_status]
        if len(leaders) != 1:
            row.problem(f"{len(leaders)} requests were not collapsed into one fill")
        if leaders:
            leader = leaders[0]
            return leader, [s for s in samples if s is not leader]
    # nginx says nothing about collapsing: the first to get a byte is taken as the leader.
    ordered = sorted(samples, key=lambda s: s.first_byte_at)
    return ordered[0], ordered[1:]
