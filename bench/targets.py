"""The issue's targets, each a ratio within one run, judged PASS or MISS from the rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from bench.results import Row
from bench.scenarios import (
    BURST,
    MEMORY_HIT,
    MISS,
    REPLAY,
    RSS_ALLOWANCE_BYTES,
    VOLUME_HIT,
    size_label,
)

MIB: Final = 1024 * 1024
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
    verdicts += [_miss(found), *_burst(found), _seed_style(found, min(sizes)), _rss(found)]
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
    ours, ceiling = found.get(MEMORY_HIT, "ours-1w", size), found.get(MEMORY_HIT, "ceiling", size)
    label = size_label(size)
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
    target, required = "miss TTFB p50 above direct", "<= 1 ms"
    ours, direct = found.get(MISS, "ours-1w"), found.get(MISS, "direct")
    missing = _missing(ours) or _missing(direct)
    if missing or ours is None or direct is None:
        return Verdict(target, "-", required, NOT_MEASURED, missing)
    extra = (ours.ttfb_p50_ms or 0) - (direct.ttfb_p50_ms or 0)
    verdict = Verdict(target, f"{extra:+.2f} ms", required, PASS if extra <= 1.0 else MISSED)
    ours.verdicts.append(f"TTFB p50 vs direct: {verdict.measured} {verdict.result}")
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


def _rss(found: Rows) -> Verdict:
    target = "resident memory after the replay"
    row = found.get(REPLAY, "ours-replay")
    missing = _missing(row)
    if missing or row is None:
        return Verdict(target, "-", "<= max_bytes + 40 MiB", NOT_MEASURED, missing)
    limit = (row.extra["memory_max_bytes"] + RSS_ALLOWANCE_BYTES) / MIB
    rss = float(row.extra["rss_mib"])
    verdict = Verdict(
        target, f"{rss:.0f} MiB", f"<= {limit:.0f} MiB", PASS if rss <= limit else MISSED
    )
    row.verdicts.append(f"RSS {verdict.measured} (limit {limit:.0f}) {verdict.result}")
    return verdict


def _annotate_peers(found: Rows) -> None:
    """Ratios for the other peers of the memory-hit scenario, for reading beside ours."""
    for row in found.rows:
        if row.scenario != MEMORY_HIT or row.peer_key in ("ceiling", "ours-1w"):
            continue
        ceiling = found.get(MEMORY_HIT, "ceiling", row.body_bytes)
        if row.usable and ceiling is not None and ceiling.usable and ceiling.rps and row.rps:
            row.verdicts.append(f"{row.rps / ceiling.rps:.2f}x ceiling req/s (for reference)")
