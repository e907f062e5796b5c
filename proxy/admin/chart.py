"""The overview's chart: hit ratio by tier per minute over the last hour, as SVG geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.admin.history import Minute

WIDTH: Final = 600
HEIGHT: Final = 150


@dataclass(frozen=True, slots=True)
class Segment:
    """One coloured part of a bar: `kind` is memory, volume or miss."""

    kind: str
    y: float
    height: float


@dataclass(frozen=True, slots=True)
class Bar:
    """One minute: its position, its stacked segments and a tooltip."""

    x: float
    width: float
    segments: tuple[Segment, ...]
    title: str


def hit_ratio_bars(minutes: list[Minute], *, width: int = WIDTH, height: int = HEIGHT) -> list[Bar]:
    """Stacked bars, oldest minute on the left; minutes without cacheable requests are left out."""
    if not minutes:
        return []
    slot = width / len(minutes)
    bars: list[Bar] = []
    for index, minute in enumerate(minutes):
        total = minute.cacheable
        if total == 0:
            continue
        parts = (
            ("memory", minute.memory_hits),
            ("volume", minute.volume_hits),
            ("miss", minute.misses + minute.coalesced),
        )
        segments: list[Segment] = []
        bottom = float(height)
        for kind, count in parts:
            if count == 0:
                continue
            tall = height * count / total
            bottom -= tall
            segments.append(Segment(kind, round(bottom, 2), round(tall, 2)))
        ago = len(minutes) - 1 - index
        title = (
            f"{ago} min ago: {minute.memory_hits} memory, {minute.volume_hits} volume, "
            f"{minute.misses + minute.coalesced} miss"
        )
        bars.append(Bar(round(index * slot + 0.5, 2), round(slot - 1, 2), tuple(segments), title))
    return bars
