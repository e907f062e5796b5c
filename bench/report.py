"""latest.md (the table), latest.json (everything) and latest.png (latency distributions)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.footprint import FOOTPRINT
from bench.production import PRODUCTION
from bench.replay import REPLAY
from bench.results import Row
from bench.scenarios import BURST, MISS, size_label
from bench.targets import Verdict

PLOT_NINES_CAP = 4.0  # the max is drawn at 99.99 %


def markdown(meta: dict[str, Any], rows: list[Row], verdicts: list[Verdict]) -> str:
    """The results page: how it ran, the targets, then scenario x peer."""
    passed = sum(1 for v in verdicts if v.result == "PASS")
    lines = [
        "# Benchmark results",
        "",
        f"Run {meta['started']} on {meta['machine']}; {meta['software']}.",
        f"Load: {meta['load']}. CPUs: {meta['cpus']}. Whole run: {meta['seconds']:.0f} s.",
        "",
        f"## Targets ({passed} of {len(verdicts)} pass)",
        "",
        "| target | measured | required | result |",
        "| --- | --- | --- | --- |",
    ]
    for v in verdicts:
        result = v.result + (f" ({v.why})" if v.why else "")
        lines.append(f"| {v.target} | {v.measured} | {v.required} | {result} |")
    lines += [
        "",
        "## Scenario x peer",
        "",
        "Latencies in ms. req/s, p50 and p99 are per request, end to end; TTFB is the time to the "
        "first body byte. See bench/README.md for what each scenario and peer is.",
        "",
        "| scenario | peer | body | req/s | p50 | p99 | TTFB p50 | TTFB p99 | vs target | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    row.scenario,
                    row.peer,
                    size_label(row.body_bytes),
                    _number(row.rps, 0),
                    _number(row.p50_ms, 2),
                    _number(row.p99_ms, 2),
                    _number(row.ttfb_p50_ms, 2),
                    _number(row.ttfb_p99_ms, 2),
                    "; ".join(row.verdicts),
                    _notes(row),
                ]
            )
            + " |"
        )
    lines += ["", "![latency distributions](latest.png)", ""]
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _notes(row: Row) -> str:
    notes: list[str] = []
    if row.status == "unavailable":
        return "unavailable: " + "; ".join(row.notes)
    if row.problems:
        notes.append("INVALID: " + "; ".join(row.problems))
    extra = row.extra
    if row.scenario in (REPLAY, PRODUCTION) and "hit_ratio" in extra:
        notes += _replay_notes(row)
    elif row.scenario == FOOTPRINT and "rss_growth_per_10k_entries_mib" in extra:
        notes.append(
            f"RSS growth per 10,000 entries {extra['rss_growth_per_10k_entries_mib']:.1f} MiB "
            f"(bodies {extra['bodies_per_10k_entries_mib']:.1f} MiB; beside its body an entry "
            f"costs {extra['overhead_per_entry_bytes']:,.0f} bytes, the memory tier counts "
            f"{extra['counted_by_memory_tier_per_entry_bytes']:,.0f}); "
            f"per open connection {extra['rss_per_connection_kib']:.1f} KiB "
            f"({extra['connections']:,} idle keep-alive connections)"
        )
    elif row.scenario == BURST and "upstream_calls_per_round" in extra:
        rounds = extra["upstream_calls_per_round"]
        notes.append(
            f"upstream calls per round of {row.requests // max(1, len(rounds))}: {rounds}; "
            f"joined first byte lag p50 {extra['joined_lag_p50_ms']:.2f}, "
            f"p99 {extra['joined_lag_p99_ms']:.2f}, max {extra['joined_lag_max_ms']:.2f} ms; "
            f"leader TTFB {', '.join(f'{t:.1f}' for t in extra['leader_ttfb_ms'])} ms"
        )
    elif row.scenario == MISS and "upstream_calls_all_peers" in extra:
        notes.append(
            f"{extra['upstream_calls_all_peers']} upstream calls for "
            f"{extra['requests_all_peers']} requests to all peers"
        )
    elif "upstream_calls" in extra and row.peer_key != "ceiling":
        notes.append(f"upstream calls during the run: {extra['upstream_calls']}")
    notes += row.notes
    return "; ".join(notes).replace("|", "/")


def _replay_notes(row: Row) -> list[str]:
    extra = row.extra
    notes = [
        f"hit ratio {extra['hit_ratio']:.3f} (unbounded cache: {extra['ideal_hit_ratio']:.3f}), "
        f"{extra['upstream_calls_saved']:,} of {row.requests:,} upstream calls saved, "
        f"{extra['syntheses_per_key']:.3f} syntheses per distinct key"
    ]
    tiers = extra.get("answers_by_tier")
    if tiers and row.requests:
        shares = ", ".join(f"{k} {v / row.requests:.1%}" for k, v in sorted(tiers.items()))
        notes.append(f"answers by tier: {shares}")
    if "volume_hit_ttfb_p50_ms" in extra:
        notes.append(
            f"Volume hit TTFB p50 {extra['volume_hit_ttfb_p50_ms']:.1f}, "
            f"p99 {extra['volume_hit_ttfb_p99_ms']:.1f} ms"
        )
    if "files_api_calls_per_request" in extra:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(extra["files_api_calls"].items()))
        notes.append(
            f"Files API calls per request {extra['files_api_calls_per_request']:.2f} ({kinds}; "
            f"{extra['files_api_calls_after_load']:,} after the load), "
            f"{extra['throttled_429']} answered 429, most at once {extra['most_calls_at_once']}, "
            f"calls waited {extra['limiter_wait_seconds']:.1f} s in all for the limiter; "
            f"write-behind: {extra['stored']:.0f} stored, {extra['writes_done']:.0f} written, "
            f"{extra['writes_skipped']:.0f} skipped (backlog full), "
            f"{extra['volume_errors']:.0f} Volume errors and "
            f"{extra.get('volume_busy', 0):.0f} calls refused as busy counted"
        )
    if "rss_mib" in extra:
        notes.append(
            f"RSS {extra['rss_mib']:.0f} MiB after (at start {extra['rss_before_mib']:.0f})"
        )
    return notes


def to_json(meta: dict[str, Any], rows: list[Row], verdicts: list[Verdict]) -> str:
    """Everything measured, for tools."""
    document = {
        "meta": meta,
        "targets": [dataclasses.asdict(v) for v in verdicts],
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    return json.dumps(document, indent=2, default=_jsonable, allow_nan=False) + "\n"


def _jsonable(value: Any) -> Any:
    return str(value)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_all(
    folder: Path, meta: dict[str, Any], rows: list[Row], verdicts: list[Verdict]
) -> list[Path]:
    """Write latest.md, latest.json and (when matplotlib is there) latest.png; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    md = folder / "latest.md"
    md.write_text(markdown(meta, rows, verdicts))
    written.append(md)
    data = folder / "latest.json"
    cleaned = [_clean_row(row) for row in rows]
    data.write_text(to_json(_clean(meta), cleaned, verdicts))
    written.append(data)
    png = folder / "latest.png"
    if plot(rows, png):
        written.append(png)
    return written


def _clean_row(row: Row) -> Row:
    fields = {f.name: _clean(getattr(row, f.name)) for f in dataclasses.fields(row)}
    return Row(**fields)


def plot(rows: list[Row], path: Path) -> bool:
    """Latency distributions per scenario, percentiles on a 'nines' axis; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    panels: dict[str, list[tuple[Row, str]]] = {}
    for row in rows:
        if not row.curves:
            continue
        title = f"{row.scenario}, {size_label(row.body_bytes)}"
        for name in _curves_to_plot(row):
            panels.setdefault(title, []).append((row, name))
    if not panels:
        return False
    columns = 2
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(14, 4.2 * lines), squeeze=False)
    ticks = [_nines(p) for p in (0.0, 50.0, 90.0, 99.0, 99.9, 100.0)]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    peers = list(dict.fromkeys(row.peer for row in rows))
    for axis, (title, series) in zip(axes.flat, panels.items(), strict=False):
        for row, name in series:
            points = row.curves[name]
            xs = [_nines(p) for p, _ in points]
            ys = [max(v, 1e-3) for _, v in points]
            style = "--" if name == "latency" and row.scenario == MISS else "-"
            label = row.peer if len({n for _, n in series}) == 1 else f"{row.peer} ({name})"
            if not row.usable:
                label += f" [{row.status}]"
            colour = colours[peers.index(row.peer) % len(colours)]
            axis.plot(xs, ys, style, marker=".", color=colour, label=label)
        axis.set_title(title + _what(series))
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_ms))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_ms))
        axis.set_xticks(ticks, ["0", "50", "90", "99", "99.9", "max"])
        axis.set_xlabel("percentile")
        axis.set_ylabel("ms")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _ms(value: float, position: int) -> str:
    return f"{value:g}"


def _curves_to_plot(row: Row) -> list[str]:
    if row.scenario == MISS:
        return ["ttfb", "latency"]
    if row.scenario == BURST:
        return ["ttfb"]
    return ["latency"] if "latency" in row.curves else list(row.curves)


def _what(series: list[tuple[Row, str]]) -> str:
    names = {name for _, name in series}
    if names == {"ttfb"}:
        return " (time to first byte)"
    if names == {"latency"}:
        return " (request latency)"
    return " (TTFB solid, total dashed)"


def _nines(percent: float) -> float:
    if percent >= 100:
        return PLOT_NINES_CAP
    return min(PLOT_NINES_CAP, -math.log10(1 - percent / 100))
