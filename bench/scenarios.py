"""The scenarios: what is sent to which peer, and what is checked before a number is believed."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

from bench.files_peers import seed_style
from bench.loadgen import (
    LoadRun,
    cache_outcome,
    closed_loop,
    curve,
    percentile,
)
from bench.peers import Backend, CpuPlan, Lab, Peer, Unavailable
from bench.procs import StartFailed
from bench.results import OK, Row, failed, unavailable
from bench.workload import SpeakCall, speak_call
from bench.wrk import WrkResult, lua_script, run_wrk

log = logging.getLogger("bench")

KIB: Final = 1024
MIB: Final = 1024 * 1024
MEMORY_HIT: Final = "memory hit"
VOLUME_HIT: Final = "volume hit"
MISS: Final = "miss"
BURST: Final = "burst"
REPLAY: Final = "replay"
MISS_BEHAVIOUR: Final = {"size": 64 * KIB, "chunks": 20, "chunk_delay": 0.010}
FAST_BEHAVIOUR: Final = {"size": 64 * KIB, "chunks": 8, "chunk_delay": 0.0}
REPLAY_MEMORY_BYTES: Final = 64 * MIB


@dataclass(frozen=True)
class Options:
    """How long and how hard each scenario runs."""

    sizes: tuple[int, ...] = (64 * KIB, MIB)
    connections: int = 32
    warmup_seconds: float = 2.0
    seconds: float = 8.0
    miss_concurrency: int = 6
    miss_seconds: float = 10.0
    burst_size: int = 100
    burst_rounds: int = 3
    replay_requests: int = 20_000
    replay_concurrency: int = 32
    seed_replay_seconds: float = 12.0
    production_requests: int = 8_000
    production_seconds: float = 30.0
    footprint_entries: int = 10_000
    footprint_connections: int = 1_000

    @classmethod
    def quick(cls) -> Options:
        """A smoke run of about a minute: the same shape, shorter."""
        return cls(
            sizes=(64 * KIB,),
            warmup_seconds=1.0,
            seconds=2.0,
            miss_seconds=2.0,
            burst_rounds=1,
            replay_requests=3_000,
            seed_replay_seconds=4.0,
            production_requests=1_500,
            production_seconds=8.0,
            footprint_entries=2_000,
            footprint_connections=200,
        )


PeerSpec = Callable[["Bench"], Awaitable[Peer | Unavailable]]


@dataclass
class Bench:
    """What the scenarios share: the peers (started on first use), the backend, the options."""

    lab: Lab
    backend: Backend
    options: Options
    folder: Path
    cpus: CpuPlan
    rows: list[Row] = field(default_factory=list)
    # Run when the whole run ends, whatever happened (a PostgreSQL cluster's removal).
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    _peers: dict[str, Peer | Unavailable] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    async def peer(self, key: str, spec: PeerSpec | None = None) -> Peer | Unavailable:
        """The peer named `key` (from PEERS unless `spec` is given), started on first use."""
        if key not in self._peers:
            log.info("starting %s", key)
            try:
                self._peers[key] = await (spec or PEERS[key])(self)
            except StartFailed as exc:
                self._peers[key] = Unavailable(key, key, f"did not start: {exc}", broken=True)
        return self._peers[key]

    async def release(self, *keys: str) -> None:
        """Stop peers no later scenario needs (they would hold memory and CPU)."""
        for key in keys:
            peer = self._peers.pop(key, None)
            if isinstance(peer, Peer) and peer.kind != "direct":
                await self.lab.stop(peer)

    def unique(self, prefix: str) -> str:
        """A message id never sent before in this run."""
        return f"m-{prefix}-{next(self._ids):06d}"

    def add(self, row: Row) -> Row:
        """Keep `row` and log it in one line."""
        self.rows.append(row)
        log.info(
            "%-12s %-34s %8s  %s",
            row.scenario,
            row.peer,
            size_label(row.body_bytes),
            _brief(row),
        )
        return row


def size_label(size: int) -> str:
    """64 KiB, 1 MiB."""
    return f"{size // MIB} MiB" if size >= MIB and size % MIB == 0 else f"{size // KIB} KiB"


def _brief(row: Row) -> str:
    if row.status != OK or row.p50_ms is None:
        return f"{row.status}: {'; '.join(row.problems or row.notes)}"
    rate = f"{row.rps:9.0f} req/s" if row.rps is not None else " " * 15
    text = f"{rate}  p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms"
    if row.ttfb_p50_ms is not None:
        text += f"  ttfb p50 {row.ttfb_p50_ms:.2f} p99 {row.ttfb_p99_ms:.2f} ms"
    return text


PEERS: Final[dict[str, PeerSpec]] = {
    "nginx": lambda b: b.lab.nginx(b.backend),
    "direct": lambda b: _ready(b.lab.direct(b.backend)),
    "ours-1w": lambda b: b.lab.ours("ours-1w", "ours (1 worker)", b.backend),
    "ours-2w": lambda b: b.lab.ours("ours-2w", "ours (2 workers)", b.backend, workers=2),
    "ours-1w-log": lambda b: b.lab.ours(
        "ours-1w-log",
        "ours (1 worker, access log on: the default)",
        b.backend,
        settings={"server.access_log": True},
    ),
    "ours-volume": lambda b: b.lab.ours(
        "ours-volume",
        "ours (memory off, local Volume)",
        b.backend,
        settings={"cache.memory.max_bytes": 0},
    ),
    "seed-style": lambda b: seed_style(b.lab, b.backend),
    # The default configuration (access log on), its memory tier smaller than the working set.
    "ours-replay": lambda b: b.lab.ours(
        "ours-replay",
        f"ours (memory {REPLAY_MEMORY_BYTES // MIB} MiB, access log on)",
        b.backend,
        settings={"cache.memory.max_bytes": REPLAY_MEMORY_BYTES, "server.access_log": True},
    ),
}


async def _ready(peer: Peer) -> Peer:
    return peer


# Throughput: wrk, the same body on every request, so every request after the first is a hit.


async def memory_hit(bench: Bench) -> None:
    """The hot path: the same cached message again and again, against the ceiling and nginx."""
    for size in bench.options.sizes:
        await bench.backend.behave(**{**FAST_BEHAVIOUR, "size": size})
        ceiling = await bench.lab.ceiling(size)
        try:
            await _throughput(bench, MEMORY_HIT, ceiling, size, expect=None)
        finally:
            await bench.lab.stop(ceiling)
        for key in ("nginx", "ours-1w-log", "ours-1w", "ours-2w"):
            peer = await bench.peer(key)
            await _throughput(bench, MEMORY_HIT, peer, size, expect="memory")
    await bench.release("ours-2w", "ours-1w-log")


async def volume_hit(bench: Bench) -> None:
    """Memory off: every hit reads the Volume (a local folder; the emulator for seed-style)."""
    for size in bench.options.sizes:
        await bench.backend.behave(**{**FAST_BEHAVIOUR, "size": size})
        for key in ("ours-volume", "seed-style"):
            peer = await bench.peer(key)
            await _throughput(bench, VOLUME_HIT, peer, size, expect="volume")
    await bench.release("ours-volume")


async def _throughput(
    bench: Bench, scenario: str, peer: Peer | Unavailable, size: int, *, expect: str | None
) -> None:
    if isinstance(peer, Unavailable):
        bench.add(absent(scenario, peer, size))
        return
    options = bench.options
    row = Row(scenario, peer.key, peer.label, size)
    try:
        call = speak_call(bench.unique(f"hit-{peer.key}"))
        await _warm_hit(peer, call, size, expect, row)
        script = bench.folder / f"wrk-{peer.key}-{size}.lua"
        script.write_text(lua_script(call.body, call.headers()))

        async def wrk(seconds: float) -> WrkResult:
            return await run_wrk(
                peer.speak_url,
                script,
                seconds=seconds,
                connections=options.connections,
                cpus=bench.cpus.loadgen,
                pin=bench.cpus.pinned,
            )

        await wrk(options.warmup_seconds)
        before = await bench.backend.calls()
        result = await wrk(options.seconds)
        upstream = await bench.backend.calls() - before
    except Exception as exc:
        bench.add(failed(scenario, peer.key, peer.label, size, exc))
        return
    row.rps, row.requests = result.rps, result.requests
    row.p50_ms, row.p99_ms = result.percentiles_ms[50.0], result.percentiles_ms[99.0]
    row.curves["latency"] = result.curve()
    row.extra.update(
        errors=result.errors,
        bytes_per_request=round(result.bytes_per_request),
        upstream_calls=upstream,
        mean_ms=result.mean_ms,
        max_ms=result.max_ms,
        wrk=" ".join(result.command),
    )
    if result.error_count:
        row.problem(f"wrk counted errors: {result.errors}")
    if peer.kind != "ceiling" and upstream:
        row.problem(f"{upstream} upstream calls during the run: not every request was a hit")
    if result.bytes_per_request < size:
        row.problem(f"{result.bytes_per_request:.0f} bytes per answer, under the {size} body")
    if not peer.child.running:
        row.problem("the server exited during the run")
    bench.add(row)


async def _warm_hit(peer: Peer, call: SpeakCall, size: int, expect: str | None, row: Row) -> None:
    """Store the entry, then check that fresh connections get full hits from the expected tier."""
    seen: list[str] = []
    for _ in range(100):
        answers = [await _probe(peer, call) for _ in range(4 * peer.workers)]
        seen = [a for a in answers if not _is_hit(peer, a, size, expect)]
        if not seen:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no {expect or ''} hit after warming: {seen[0]}")


async def _probe(peer: Peer, call: SpeakCall) -> str:
    # A new session per probe: with several workers, a new connection may reach another worker.
    async with (
        aiohttp.ClientSession() as session,
        session.post(peer.speak_url, data=call.body, headers=call.headers()) as response,
    ):
        body = await response.read()
        parts = [
            str(response.status),
            str(len(body)),
            cache_outcome(response) or "-",
            response.headers.get("X-TTS-Cache-Tier") or "-",
        ]
        return " ".join(parts)


def _is_hit(peer: Peer, answer: str, size: int, expect: str | None) -> bool:
    status, length, cache, tier = answer.split(" ")
    if status != "200" or int(length) != size:
        return False
    if peer.kind == "ceiling":
        return True
    if peer.kind == "nginx":
        return cache == "HIT"
    if cache != "hit":
        return False
    # With several workers, each warms its own memory from the shared Volume first.
    return tier == expect or (peer.workers > 1 and tier == "volume")


# Misses: every request a new message, the upstream streaming 20 chunks over 200 ms.


async def miss(bench: Bench) -> None:
    """Time to first byte and total through a miss, against the backend reached directly.

    The peers are driven at the same time, each by its own clients, so the load generator's own
    delays (one Python process reading every stream) fall on all of them alike.
    """
    await bench.backend.behave(**MISS_BEHAVIOUR)
    options = bench.options
    size = int(MISS_BEHAVIOUR["size"])
    peers: list[Peer] = []
    for key in ("direct", "ours-1w", "nginx"):
        peer = await bench.peer(key)
        if isinstance(peer, Unavailable):
            bench.add(absent(MISS, peer, size))
        else:
            peers.append(peer)

    async def drive(peer: Peer, seconds: float) -> LoadRun:
        calls = (speak_call(bench.unique(f"miss-{peer.key}")) for _ in itertools.count())
        return await closed_loop(
            peer.speak_url, calls, concurrency=options.miss_concurrency, max_seconds=seconds
        )

    try:
        await asyncio.gather(*(drive(peer, 1.0) for peer in peers))
        before = await bench.backend.calls()
        runs = await asyncio.gather(*(drive(peer, options.miss_seconds) for peer in peers))
        upstream = await bench.backend.calls() - before
    except Exception as exc:
        for peer in peers:
            bench.add(failed(MISS, peer.key, peer.label, size, exc))
        return
    sent = sum(len(run.samples) + run.failures for run in runs)
    for peer, run in zip(peers, runs, strict=True):
        row = row_from_run(MISS, peer, size, run)
        row.extra["upstream_calls_all_peers"] = upstream
        row.extra["requests_all_peers"] = sent
        if upstream != sent:
            row.problem(f"{upstream} upstream calls for {sent} requests: not all were misses")
        if peer.kind == "ours":
            expect_header(row, run, "miss")
        bench.add(row)


def absent(scenario: str, peer: Unavailable, size: int) -> Row:
    """The row of a peer that did not run: unavailable here, or invalid when it broke."""
    row = unavailable(scenario, peer.key, peer.label, size, peer.reason)
    if peer.broken:
        row.status = OK
        row.notes.clear()
        row.problem(peer.reason)
    return row


def row_from_run(scenario: str, peer: Peer, size: int, run: LoadRun) -> Row:
    row = Row(scenario, peer.key, peer.label, size)
    totals, ttfbs = run.totals_ms(), run.ttfbs_ms()
    row.rps, row.requests = run.rps, len(run.samples)
    row.p50_ms, row.p99_ms = percentile(totals, 50), percentile(totals, 99)
    row.ttfb_p50_ms, row.ttfb_p99_ms = percentile(ttfbs, 50), percentile(ttfbs, 99)
    row.curves["latency"] = curve(totals)
    row.curves["ttfb"] = curve(ttfbs)
    check_run(row, run, size)
    if not peer.child.running:
        row.problem("the server exited during the run")
    return row


def check_run(row: Row, run: LoadRun, size: int) -> None:
    if run.failures:
        row.problem(f"{run.failures} requests failed, e.g. {run.failure_examples[0]}")
    bad = [s for s in run.samples if s.status != 200 or s.size != size]
    if bad:
        row.problem(f"{len(bad)} answers were not 200 with {size} bytes (e.g. {bad[0].status})")
    if not run.samples:
        row.problem("no request completed")


def expect_header(row: Row, run: LoadRun, value: str) -> None:
    other = [s.cache for s in run.samples if s.cache != value]
    if other:
        row.problem(f"{len(other)} answers said X-TTS-Cache: {other[0]}, not {value}")


Runner = Callable[[Bench], Awaitable[None]]
