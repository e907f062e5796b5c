"""One row of results: a scenario against one peer, with the checks that make it trustworthy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

OK: Final = "ok"
UNAVAILABLE: Final = "unavailable"
INVALID: Final = "invalid"

Curve = list[tuple[float, float]]


@dataclass
class Row:
    """A scenario against one peer. Latencies in ms; `problems` non-empty makes it invalid."""

    scenario: str
    peer_key: str
    peer: str
    body_bytes: int
    status: str = OK
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    requests: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        """Record a failed check: the row's numbers are not to be trusted."""
        self.problems.append(text)
        if self.status == OK:
            self.status = INVALID

    @property
    def usable(self) -> bool:
        """True when the row ran and every check held."""
        return self.status == OK


def unavailable(scenario: str, key: str, label: str, body_bytes: int, reason: str) -> Row:
    """A row for a peer that could not run."""
    return Row(scenario, key, label, body_bytes, status=UNAVAILABLE, notes=[reason])


def failed(scenario: str, key: str, label: str, body_bytes: int, error: BaseException) -> Row:
    """A row for a run that raised."""
    row = Row(scenario, key, label, body_bytes)
    row.problem(f"{type(error).__name__}: {error}")
    return row
