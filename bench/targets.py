"""The issue's targets, each a ratio within one run, judged PASS or MISS from the rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from bench.production import PRODUCTION
from bench.replay import REPLAY
from bench.results import Row
from bench.scenarios import (
    BURST,
    MEMORY_HIT,
    MISS,
    VOLUME_HIT,
    size_label,
)

MIB: Final = 1024 * 1024
# What an operator plans resident memory with: the process's growth under the replay stays
# within RSS_PER_CACHED_BYTE x cache.memory.max_bytes plus RSS_FIXED_BYTES. The factor covers
# what each cached entry costs beside its body (its key, metadata and maps: bench.footprint
# measures it); the fixed part covers the rest the replay makes grow, at most (bench/README.md):
# the write-behind's pending entries (TieredCache.max_pending_bytes, 32 MiB, held beside the
# memory tier until written), the bounded per-key maps, and 32 connections.
RSS_PER_CACHED_BYTE: Final = 1.15
RSS_FIXED_BYTES: Final = 48 * MIB
# A miss's first byte within this of going direct, at the median: level with nginx within noise.
MISS_ALLOWANCE_MS: Final = 2.0
PASS: Final = "PASS"
MISSED: Final = "MISS"
NOT_MEASURED: Final = "N/A"


@dataclass(frozen=True)
class Verdict:
    """One target: what was measured, what was required, and the outcome."""

    target: str
    measured: str
    required: str
    result: str
    why: str = ""


class Rows:
    """Look-ups over the rows of a run."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def get(self, scenario: str, peer_key: str, size: int | None = None) -> Row | None:
        """The row for (scenario, peer, body size), usable or not."""
        for row in self.rows:
            if row.scenario == scenario and row.peer_key == peer_key:
                if size is None or row.body_bytes == size:
                    return row
        return None


def evaluate(rows: list[Row], sizes: tuple[int, ...]) -> list[Verdict]:
    """Every target the rows allow judging; each verdict is also noted on the row it is about."""
    found = Rows(rows)
    verdicts: list[Verdict] = []
    for size in sizes:
        verdicts += _memory_hit(found, size)
        verdicts.append(_volume_hit(found, size))
    verdicts += [_miss(found), *_burst(found), _seed_style(found, min(sizes))]
    verdicts += [*_replay(found), _rss(found), *_production(found)]
    _annotate_peers(found)
    return verdicts


def _ratio_verdict(
    target: str,
    row: Row | None,
    base: Row | None,
    value: Callable[[Row], float | None],
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    unit: str = "x",
) -> Verdict:
    required = f">= {at_least:g}{unit}" if at_least is not None else f"<= {at_most:g}{unit}"
    missing = _missing(row) or _missing(base)
    if missing or row is None or base is None:
        return Verdict(target, "-", required, NOT_MEASURED, missing)
    mine, theirs = value(row), value(base)
    if mine is None or theirs is None or theirs == 0:
        return Verdict(target, "-", required, NOT_MEASURED, "no number to compare")
    ratio = mine / theirs
    ok = ratio >= at_least if at_least is not None else ratio <= (at_most or 0)
    verdict = Verdict(target, f"{ratio:.2f}{unit}", required, PASS if ok else MISSED)
    row.verdicts.append(f"{target}: {verdict.measured} {verdict.result}")
    return verdict


def _missing(row: Row | None) -> str:
    if row is None:
        return "not run"
    if not row.usable:
        return f"{row.peer} {row.scenario}: {row.status}"
    return ""


def _memory_hit(found: Rows, size: int) -> list[Verdict]:
    # Judged on the default configuration: the access log on.
    ours = found.get(MEMORY_HIT, "ours-1w-log", size)
    ceiling = found.get(MEMORY_HIT, "ceiling", size)
    label = f"{size_label(size)}, access log on"
    return [
        _ratio_verdict(
            f"memory hit req/s vs ceiling ({label})",
            ours,
            ceiling,
            lambda r: r.rps,
            at_least=0.9,
        ),
        _ratio_verdict(
            f"memory hit p99 vs ceiling ({label})",
            ours,
            ceiling,
            lambda r: r.p99_ms,
            at_most=1.5,
        ),
    ]


def _volume_hit(found: Rows, size: int) -> Verdict:
    return _ratio_verdict(
        f"Volume hit req/s vs memory hit ({size_label(size)})",
        found.get(VOLUME_HIT, "ours-volume", size),
        found.get(MEMORY_HIT, "ours-1w", size),
        lambda r: r.rps,
        at_least=0.5,
    )


def _miss(found: Rows) -> Verdict:
    target, required = "miss TTFB p50 above direct", f"<= {MISS_ALLOWANCE_MS:g} ms"
    ours, direct = found.get(MISS, "ours-1w"), found.get(MISS, "direct")
    missing = _missing(ours) or _missing(direct)
    if missing or ours is None or direct is None:
        return Verdict(target, "-", required, NOT_MEASURED, missing)
    extra = (ours.ttfb_p50_ms or 0) - (direct.ttfb_p50_ms or 0)
    ok = extra <= MISS_ALLOWANCE_MS
    verdict = Verdict(target, f"{extra:+.2f} ms", required, PASS if ok else MISSED)
    nginx = found.get(MISS, "nginx")
    beside = ""
    if nginx is not None and nginx.usable and nginx.ttfb_p50_ms is not None:
        beside = f" (nginx {nginx.ttfb_p50_ms - (direct.ttfb_p50_ms or 0):+.2f} ms)"
    ours.verdicts.append(f"TTFB p50 vs direct: {verdict.measured}{beside} {verdict.result}")
    return verdict


def _burst(found: Rows) -> list[Verdict]:
    row = found.get(BURST, "ours-1w")
    calls_target, lag_target = (
        "burst: upstream calls per 100 misses",
        "burst: joined first byte lag",
    )
    missing = _missing(row)
    if missing or row is None:
        return [
            Verdict(calls_target, "-", "exactly 1", NOT_MEASURED, missing),
            Verdict(lag_target, "-", "p99 <= 5 ms", NOT_MEASURED, missing),
        ]
    rounds = list(row.extra["upstream_calls_per_round"])
    calls = Verdict(
        calls_target,
        ", ".join(str(c) for c in rounds),
        "exactly 1",
        PASS if rounds and all(c == 1 for c in rounds) else MISSED,
    )
    lag_p99, lag_max = row.extra["joined_lag_p99_ms"], row.extra["joined_lag_max_ms"]
    lag = Verdict(
        lag_target,
        f"p99 {lag_p99:.2f} ms (max {lag_max:.2f})",
        "p99 <= 5 ms",
        PASS if lag_p99 <= 5.0 else MISSED,
    )
    row.verdicts += [f"upstream calls {calls.result}", f"joined lag {lag.result}"]
    return [calls, lag]


def _seed_style(found: Rows, size: int) -> Verdict:
    return _ratio_verdict(
        "memory hit req/s vs seed-style replay req/s",
        found.get(MEMORY_HIT, "ours-1w", size),
        found.get(REPLAY, "seed-style"),
        lambda r: r.rps,
        at_least=20,
    )


def _replay(found: Rows) -> list[Verdict]:
    ours, nginx = found.get(REPLAY, "ours-replay"), found.get(REPLAY, "nginx")
    verdicts = [
        _ratio_verdict("replay req/s vs nginx", ours, nginx, lambda r: r.rps, at_least=0.8),
        _ratio_verdict("replay p99 vs nginx", ours, nginx, lambda r: r.p99_ms, at_most=2.0),
    ]
    target, required = "replay: syntheses per distinct key, hit ratio as nginx's", "1.00, same"
    missing = _missing(ours) or _missing(nginx)
    if missing or ours is None or nginx is None:
        return [*verdicts, Verdict(target, "-", required, NOT_MEASURED, missing)]
    per_key = ours.extra["syntheses_per_key"]
    ratios = (ours.extra["hit_ratio"], nginx.extra["hit_ratio"])
    ok = per_key == 1 and ratios[0] >= ratios[1]
    measured = f"{per_key:.3f}, hit ratio {ratios[0]:.3f} (nginx {ratios[1]:.3f})"
    verdict = Verdict(target, measured, required, PASS if ok else MISSED)
    ours.verdicts.append(f"syntheses per key {per_key:.3f} {verdict.result}")
    return [*verdicts, verdict]


def _rss(found: Rows) -> Verdict:
    target = "resident memory growth during the replay"
    required = f"<= {RSS_PER_CACHED_BYTE:g} x cache.memory.max_bytes + {RSS_FIXED_BYTES // MIB} MiB"
    row = found.get(REPLAY, "ours-replay")
    missing = _missing(row)
    if missing or row is None:
        return Verdict(target, "-", required, NOT_MEASURED, missing)
    limit = (RSS_PER_CACHED_BYTE * row.extra["memory_max_bytes"] + RSS_FIXED_BYTES) / MIB
    growth = float(row.extra["rss_mib"]) - float(row.extra["rss_before_mib"])
    verdict = Verdict(
        target,
        f"{growth:.0f} MiB",
        f"{required} = {limit:.0f} MiB",
        PASS if growth <= limit else MISSED,
    )
    row.verdicts.append(f"RSS growth {verdict.measured} (limit {limit:.0f}) {verdict.result}")
    return verdict


def _production(found: Rows) -> list[Verdict]:
    """Every response the Files API replay stored was written, skipped or failed, and counted."""
    verdicts = []
    for key in ("ours-files", "ours-files-index"):
        row = found.get(PRODUCTION, key)
        target = f"production replay ({key}): every stored response written or counted"
        missing = _missing(row)
        if row is None or (missing and row.status != "invalid"):
            verdicts.append(Verdict(target, "-", "none lost", NOT_MEASURED, missing))
            continue
        extra = row.extra
        if "stored" not in extra:
            verdicts.append(Verdict(target, "-", "none lost", NOT_MEASURED, missing))
            continue
        measured = (
            f"{extra['stored']:.0f} stored: {extra['writes_done']:.0f} written, "
            f"{extra['writes_skipped']:.0f} skipped, {extra['volume_errors']:.0f} Volume errors, "
            f"{extra.get('volume_busy', 0):.0f} busy"
        )
        verdicts.append(
            Verdict(target, measured, "none lost", PASS if row.usable else MISSED, missing)
        )
    return verdicts


def _annotate_peers(found: Rows) -> None:
    """Ratios for the memory-hit rows not judged: to the ceiling and, for ours, to nginx."""
    for row in found.rows:
        if row.scenario != MEMORY_HIT or row.peer_key == "ceiling" or not row.usable:
            continue
        notes = []
        ceiling = found.get(MEMORY_HIT, "ceiling", row.body_bytes)
        if row.peer_key != "ours-1w-log" and ceiling is not None and ceiling.usable:
            if ceiling.rps and row.rps:
                notes.append(f"{row.rps / ceiling.rps:.2f}x ceiling req/s")
        nginx = found.get(MEMORY_HIT, "nginx", row.body_bytes)
        if row.peer_key.startswith("ours") and nginx is not None and nginx.usable:
            if nginx.rps and row.rps:
                notes.append(f"{row.rps / nginx.rps:.2f}x nginx req/s")
        if notes:
            row.verdicts.append(", ".join(notes) + " (for reference)")
