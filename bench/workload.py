"""What the load generators send: speak bodies, identities, and the Zipf replay workload."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Final

SPEAK_PATH: Final = "/api/tts/speak"
USER_HEADER: Final = "X-Forwarded-Email"
BENCH_USER: Final = "bench@example.com"
VOICES: Final = ("af_nicole", "af_bella", "am_adam")
TEXT: Final = (
    "Here is the summary you asked for: the quarterly numbers are in, revenue is up four percent "
    "and the new region is ahead of plan."
)


@dataclass(frozen=True)
class SpeakCall:
    """One speak request: who asks, and the JSON body."""

    user: str
    body: bytes

    def headers(self) -> dict[str, str]:
        """The request headers (the identity from a trusted peer: loopback)."""
        return {"Content-Type": "application/json", USER_HEADER: self.user}


def speak_body(
    message_id: str,
    *,
    thread_id: str = "t-bench",
    voice: str = VOICES[0],
    text: str = TEXT,
) -> bytes:
    """The JSON the Flutter client sends for one message."""
    document = {
        "text": text,
        "voice": voice,
        "provider": "replicate",
        "message_id": message_id,
        "thread_id": thread_id,
        "save_to_volume": True,
    }
    return json.dumps(document).encode()


def speak_call(message_id: str, *, user: str = BENCH_USER, voice: str = VOICES[0]) -> SpeakCall:
    """A speak call for `message_id` by `user`."""
    return SpeakCall(user, speak_body(message_id, voice=voice, text=f"{TEXT} ({message_id})"))


@dataclass(frozen=True)
class Replay:
    """A replay workload: the calls in order, and how many distinct cache keys they touch."""

    calls: tuple[SpeakCall, ...]
    distinct_keys: int

    @property
    def ideal_hit_ratio(self) -> float:
        """The hit ratio of an unbounded cache: every key's first request is the only miss."""
        return 1 - self.distinct_keys / len(self.calls)


def zipf_replay(
    *,
    requests: int = 20_000,
    messages: int = 2_000,
    users: int = 50,
    voices: int = 3,
    exponent: float = 1.1,
    seed: int = 20_240_611,
    tag: str = "replay",
) -> Replay:
    """Message popularity follows Zipf(`exponent`); each message belongs to one user, each request
    picks one of `voices` voices uniformly. Deterministic for a seed, so every peer gets the same
    sequence."""
    rng = random.Random(seed)
    ranked = list(range(messages))
    rng.shuffle(ranked)  # popularity does not follow the message number or the user
    weights = [1 / (rank + 1) ** exponent for rank in range(messages)]
    picks = rng.choices(ranked, weights=weights, k=requests)
    calls: list[SpeakCall] = []
    seen: set[tuple[int, str]] = set()
    for message in picks:
        user = message % users
        voice = VOICES[rng.randrange(voices)]
        seen.add((message, voice))
        body = speak_body(
            f"m-{tag}-{message:05d}",
            thread_id=f"t-{user:02d}-{message % 7}",
            voice=voice,
            text=f"{TEXT} (message {message})",
        )
        calls.append(SpeakCall(f"user{user:02d}@example.com", body))
    return Replay(tuple(calls), len(seen))
