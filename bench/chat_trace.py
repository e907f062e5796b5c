"""The synthetic chat trace the fleet's replay simulation replays (bench/fleet_replay.py).

Every user is active all along: assistant messages arrive (a Poisson process), most are read
aloud at once (a miss), some are tapped twice, and older messages are replayed, the latest most
often (Zipf over recency). Each user already has earlier messages on the Volume. Deterministic
per seed: every configuration replays the same requests.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final


@dataclass(frozen=True)
class Workload:
    """Active users of the chat app and how they use speech (every user active all along)."""

    users: int
    name: str = "chat"
    minutes: float = 20.0
    message_every_seconds: float = 60.0  # a new assistant message per user, on average
    play: float = 0.7  # share of new messages read aloud at once (a miss)
    replays_per_minute: float = 0.5  # plays of an older message of the user's
    recency_exponent: float = 1.0  # which older one: Zipf over recency (the latest most)
    recency_depth: int = 50
    history: int = 30  # messages each user already has on the Volume (earlier sessions)
    duplicate: float = 0.05  # plays tapped twice or on a second device, 50-500 ms apart
    median_bytes: int = 180_000  # lognormal recording sizes (about 20 s of 64 kbit/s MP3)
    sigma: float = 0.6
    synthesis_seconds: float = 2.0
    seed: int = 17

    def describe(self) -> str:
        """The workload in a sentence."""
        return (
            f"a new message every {self.message_every_seconds:g} s per user, {self.play:.0%} "
            f"played at once, {self.replays_per_minute:g} replays a minute (Zipf "
            f"{self.recency_exponent:g} over the last {self.recency_depth}), "
            f"{self.duplicate:.0%} tapped twice, {self.history} earlier messages stored, "
            f"recordings of {self.median_bytes // 1000} KB (median), synthesis "
            f"{self.synthesis_seconds:g} s, {self.minutes:g} simulated minutes"
        )


class Request:
    """One speak call of the trace."""

    __slots__ = ("at", "duplicate", "key", "size", "user")

    def __init__(self, at: float, user: int, key: int, size: int, duplicate: bool) -> None:
        self.at = at
        self.user = user
        self.key = key
        self.size = size
        self.duplicate = duplicate

    def __lt__(self, other: Request) -> bool:
        return self.at < other.at


def trace(workload: Workload) -> Iterator[Request]:
    """Every user's speak calls, in time order."""
    return heapq.merge(*(_user_trace(workload, user) for user in range(workload.users)))


def _user_trace(w: Workload, user: int) -> Iterator[Request]:
    rng = random.Random(f"{w.seed}|{user}")
    end = w.minutes * 60
    sizes: dict[int, int] = {}
    messages: list[int] = []

    def new_message() -> int:
        key = user * 1_000_000 + len(messages)
        messages.append(key)
        sizes[key] = int(w.median_bytes * math.exp(rng.gauss(0, w.sigma)))
        return key

    for _ in range(w.history):
        new_message()
    events: list[Request] = []
    now = rng.expovariate(1 / w.message_every_seconds)
    while now < end:
        key = new_message()
        if rng.random() < w.play:
            events.append(Request(now, user, key, sizes[key], False))
            if rng.random() < w.duplicate:
                events.append(Request(now + rng.uniform(0.05, 0.5), user, key, sizes[key], True))
        now += rng.expovariate(1 / w.message_every_seconds)
    weights = [1 / (rank + 1) ** w.recency_exponent for rank in range(w.recency_depth)]
    now = rng.expovariate(w.replays_per_minute / 60) if w.replays_per_minute else end
    while now < end:
        # The user's messages by then (the history, and those that came before `now`).
        known = w.history + sum(1 for e in events if e.at <= now and not e.duplicate)
        recent = messages[:known][-w.recency_depth :][::-1]
        key = rng.choices(recent, weights=weights[: len(recent)])[0]
        events.append(Request(now, user, key, sizes[key], False))
        now += rng.expovariate(w.replays_per_minute / 60)
    events.sort()
    return iter(events)


CHAT: Final = Workload(users=0)
REPLAY_HEAVY: Final = replace(
    CHAT, name="replay-heavy", replays_per_minute=3.0, recency_exponent=1.5, recency_depth=20
)
