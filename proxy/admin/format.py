"""Jinja filters for the dashboard: sizes, ages, durations, ratios."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def size(value: int | float | None) -> str:
    """1536 -> "1.5 KiB"; None -> "—"."""
    if value is None:
        return "—"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"  # pragma: no cover


def age(created_at: float | None) -> str:
    """Seconds since the epoch -> "4 min", "3 h", "2 d"."""
    if not created_at:
        return "—"
    seconds = max(0.0, time.time() - created_at)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def millis(seconds: float | None) -> str:
    """0.0123 -> "12.3 ms"; None -> "—"."""
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"


def percent(ratio: float | None) -> str:
    """0.5 -> "50.0 %"; None -> "—"."""
    return "—" if ratio is None else f"{ratio * 100:.1f} %"


def dash(value: Any) -> Any:
    """None -> "—", anything else unchanged."""
    return "—" if value is None else value


FILTERS: dict[str, Callable[..., Any]] = {
    "size": size,
    "age": age,
    "millis": millis,
    "percent": percent,
    "dash": dash,
}
