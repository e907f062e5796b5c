"""The chaos soak's judgement: what clients saw and what the fakes counted, against the promises."""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from proxy.speak import CacheKey
from proxy.storage.layout import SIDECAR_SUFFIX, parse_sidecar, voice_of
from tests.soak_workload import (
    FALLBACK_VOICE,
    HARMLESS_FAULTS,
    BackendCall,
    Observation,
    Recording,
)

# Every request is answered, or cut, within this (the proxy's timeouts are set well below it).
ANSWER_BOUND_SECONDS: Final = 5.0
# The longest the Volume may hold a request before the backend is asked or the hit starts.
VOLUME_WAIT_BOUND_SECONDS: Final = 1.0
# A joiner may join a fill that started this long before it was sent (the longest faulty fill).
FILL_SPAN_SECONDS: Final = 2.5
# A fill's Volume write may start this long after its last client had the last byte.
WRITE_SLACK_SECONDS: Final = 0.5
BREAKING_FAULTS: Final = frozenset(
    {"reset", "reset-mid-body", "truncate", "truncate-chunked", "status-500", "hang", "stall"}
)
EXAMPLES: Final = 5

# (user, thread, message, voice or None for every voice of the message)
KeyScope = tuple[str, str, str, str | None]


@dataclass
class VolumeTrouble:
    """What went wrong with the Volume, and where: per key, and while the breaker was not closed."""

    failed: set[KeyScope] = field(default_factory=set)
    breaker_open: list[tuple[float, float]] = field(default_factory=list)
    corrupted: set[CacheKey] = field(default_factory=set)

    def touched(self, recording: Recording, times: Iterable[tuple[float, float]]) -> bool:
        """True when a Volume failure may have made this recording miss or not be stored."""
        user, thread, message, voice, _ = recording
        if recording.key in self.corrupted:
            return True
        if {(user, thread, message, voice), (user, thread, message, None)} & self.failed:
            return True
        return any(
            sent <= closed and opened <= ended + WRITE_SLACK_SECONDS
            for sent, ended in times
            for opened, closed in self.breaker_open
        )


@dataclass
class Verdict:
    """Counts and broken promises, each with a few examples."""

    seed: int
    seconds: float
    # time.monotonic() when the traffic started: times in examples are seconds since then
    origin: float
    counts: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    syntheses: dict[Recording, int] = field(default_factory=dict)
    clean: set[Recording] = field(default_factory=set)
    faults: Counter[str] = field(default_factory=Counter)
    # Seconds the Volume held each request that consulted it, before the backend or the hit.
    volume_waits: list[float] = field(default_factory=list)

    def fail(self, promise: str, example: str) -> None:
        """Record one broken promise."""
        self.failures[promise].append(example)

    def report(self) -> str:
        """The soak's summary: the seed first, so a failure can be replayed."""
        counts = self.counts
        all_counts = list(self.syntheses.values()) or [0]
        clean_counts = [self.syntheses[r] for r in self.clean] or [0]
        waits = sorted(self.volume_waits) or [0.0]
        faults = ", ".join(f"{name} {n}" for name, n in sorted(self.faults.items()))
        lines = [
            f"chaos soak: SOAK_SEED={self.seed} SOAK_SECONDS={self.seconds:g}",
            f"  requests {counts['requests']} (speak {counts['speak']}, audio URL "
            f"{counts['audio-url']}), hits {counts['hit']} (memory {counts['hit-memory']}, volume "
            f"{counts['hit-volume']}), misses {counts['miss']}, disabled {counts['disabled']}",
            f"  cut {counts['cut']}, non-200 {counts['non-200']}, stand-ins {counts['stand-in']},"
            f" timeouts {counts['timeout']}, slowest {counts['slowest-ms']} ms; the Volume held"
            f" requests p50 {waits[len(waits) // 2] * 1000:.0f} ms, p99 "
            f"{waits[len(waits) * 99 // 100] * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms",
            f"  leaks {counts['leaks']}, wrong bodies {counts['wrong']}, stored wrong "
            f"{counts['stored-wrong']}",
            f"  backend calls {counts['backend-calls']} (faults: {faults})",
            f"  syntheses per unique key: mean {statistics.fmean(all_counts):.2f}, max "
            f"{max(all_counts)} over {len(self.syntheses)} keys",
            f"  clean keys (no fault, edit, restart or Volume trouble) {len(self.clean)}: mean "
            f"{statistics.fmean(clean_counts):.2f}, max {max(clean_counts)}, "
            f"{sum(1 for c in clean_counts if c > 1)} synthesized more than once; left out: "
            f"fault {counts['tainted-fault']}, edit {counts['tainted-edit']}, restart "
            f"{counts['tainted-restart']}, Volume {counts['tainted-volume']}",
        ]
        for promise, examples in sorted(self.failures.items()):
            lines.append(f"  BROKEN {promise}: {len(examples)}")
            lines.extend(f"    {example}" for example in examples[:EXAMPLES])
        return "\n".join(lines)


def judge(
    verdict: Verdict,
    observations: list[Observation],
    calls: list[BackendCall],
    volume: VolumeTrouble,
    stored: dict[str, bytes],
    volume_base: str,
) -> Verdict:
    """Judge a soak into `verdict`: every request, every key's syntheses, every stored object."""
    faults_of: dict[Recording, list[BackendCall]] = defaultdict(list)
    for call in calls:
        faults_of[call.recording].append(call)
    led = {call.request_id: call for call in calls}
    wrong = any(seen.verdict == "wrong" for seen in observations)
    owners = _audio_owners(calls) if wrong else {}
    for seen in observations:
        _count(verdict, seen)
        described = _describe(seen, verdict.origin)
        _judge_request(verdict, seen, described, faults_of.get(seen.recording, []), owners)
        _judge_timing(verdict, seen, described, led.get(seen.request_id))
    _judge_syntheses(verdict, observations, calls, volume)
    _judge_stored(verdict, observations, stored, volume_base)
    return verdict


def _count(verdict: Verdict, seen: Observation) -> None:
    counts = verdict.counts
    counts["requests"] += 1
    counts["audio-url" if seen.audio_url else "speak"] += 1
    if not seen.audio_url and seen.cache is not None:
        counts[seen.cache] += 1
        if seen.cache == "hit":
            counts[f"hit-{seen.tier}"] += 1
    counts[seen.outcome] += 1
    if seen.status is not None and seen.status not in (200, 206, 404):
        counts["non-200"] += 1
    if seen.verdict == "stand-in":
        counts["stand-in"] += 1
    took = round((seen.ended - seen.sent) * 1000)
    counts["slowest-ms"] = max(counts["slowest-ms"], took)


def _describe(seen: Observation, origin: float) -> str:
    r = seen.recording
    ids = f"{r.user[:24]} {r.thread[:12]!r}/{r.message[:12]!r}/{r.voice[:12]!r}"
    error = f" {seen.error}" if seen.error else ""
    return (
        f"{seen.request_id} {seen.action} at {seen.sent - origin:.2f} s, proxy "
        f"{seen.generation}, {ids} -> {seen.status} {seen.cache}/{seen.tier} {seen.outcome}"
        f"{error}, {seen.verdict} {seen.body_length} B in {seen.ended - seen.sent:.2f} s"
    )


def _judge_request(
    verdict: Verdict,
    seen: Observation,
    described: str,
    calls: list[BackendCall],
    owners: dict[str, Recording],
) -> None:
    """No one hears another's audio; a hit is whole and right; trouble comes from the backend."""
    if seen.verdict == "wrong":
        verdict.counts["wrong"] += 1
        owner = owners.get(seen.body_sha256)
        if owner is not None and owner != seen.recording:
            verdict.counts["leaks"] += 1
            verdict.fail("no one hears audio made for another", f"{described}: {owner}")
        else:
            verdict.fail("every body is the right audio, whole", described)
    if seen.audio_url:
        if seen.outcome != "complete" or seen.status not in (200, 206, 404):
            verdict.fail("the audio URL answers 200/206/404", described)
        return
    if seen.hostile:
        if seen.cache != "disabled" or seen.status != 200 or seen.verdict != "right":
            verdict.fail("hostile ids are disabled, forwarded and answered", described)
        return
    if seen.status is not None and seen.cache not in ("hit", "miss"):
        verdict.fail("a cacheable request is a hit or a miss", described)
    if seen.cache == "hit":
        if seen.outcome != "complete" or seen.status != 200 or seen.verdict != "right":
            verdict.fail("a hit is the right audio, whole (never cut, never a stand-in)", described)
        return
    trouble = _trouble(seen)
    if trouble is None:
        return
    window = (seen.sent - FILL_SPAN_SECONDS, seen.ended + 0.05)
    if not any(c.fault in trouble and window[0] <= c.arrived <= window[1] for c in calls):
        verdict.fail("only a backend fault makes a miss fail, cut or differ", described)


def _trouble(seen: Observation) -> frozenset[str] | None:
    """The backend faults that can explain what this miss saw; None when it saw nothing wrong."""
    if seen.outcome != "complete" or seen.status != 200:
        return BREAKING_FAULTS
    if not seen.content_type.lower().startswith("audio/"):
        return frozenset({"non-audio"})
    if seen.fallback or seen.verdict == "stand-in":
        return frozenset({"fallback"})
    return None


def _judge_timing(
    verdict: Verdict, seen: Observation, described: str, led: BackendCall | None
) -> None:
    """Every request answered within the bound; the Volume never holds one long."""
    took = seen.ended - seen.sent
    if seen.outcome == "timeout" or took > ANSWER_BOUND_SECONDS:
        verdict.fail(f"every request is answered within {ANSWER_BOUND_SECONDS:g} s", described)
    # Until the backend was asked, or until the headers of a Volume hit or of an audio URL
    # answer (which only the tiers serve).
    waited: float | None = None
    if led is not None:
        waited = led.arrived - seen.sent
    elif seen.headers_at is not None and (seen.audio_url or seen.tier == "volume"):
        waited = seen.headers_at - seen.sent
    if waited is None:
        return
    verdict.volume_waits.append(waited)
    if waited > VOLUME_WAIT_BOUND_SECONDS:
        verdict.fail(
            f"the Volume holds no request over {VOLUME_WAIT_BOUND_SECONDS:g} s",
            f"{described}, waited {waited:.2f} s",
        )


def _judge_syntheses(
    verdict: Verdict,
    observations: list[Observation],
    calls: list[BackendCall],
    volume: VolumeTrouble,
) -> None:
    """One backend call per recording that saw no fault, no edit, no restart, no sick Volume."""
    calls_of: dict[Recording, list[BackendCall]] = defaultdict(list)
    texts: dict[CacheKey, set[str]] = defaultdict(set)
    for call in calls:
        if call.recording.key.valid():
            calls_of[call.recording].append(call)
            texts[call.recording.key].add(call.recording.text)
    requests: dict[Recording, list[Observation]] = defaultdict(list)
    for seen in observations:
        if not (seen.hostile or seen.audio_url):
            requests[seen.recording].append(seen)
            texts[seen.recording.key].add(seen.recording.text)
    counts = verdict.counts
    for recording, made in calls_of.items():
        verdict.syntheses[recording] = len(made)
        counts["backend-calls"] += len(made)
        verdict.faults.update(c.fault for c in made if c.fault is not None)
        faulted = sum(1 for c in made if c.fault is not None and c.fault not in HARMLESS_FAULTS)
        seen = requests[recording]
        if faulted:
            counts["tainted-fault"] += 1
        elif len(texts[recording.key]) > 1:
            counts["tainted-edit"] += 1
        elif len({s.generation for s in seen}) > 1:
            counts["tainted-restart"] += 1
        elif volume.touched(recording, [(s.sent, s.ended) for s in seen]):
            counts["tainted-volume"] += 1
        else:
            verdict.clean.add(recording)
            if len(made) != 1:
                verdict.fail(
                    "one synthesis per key that saw no fault, edit or restart",
                    _timeline(recording, seen, made, verdict.origin),
                )


def _timeline(
    recording: Recording, seen: list[Observation], made: list[BackendCall], origin: float
) -> str:
    """A key's requests and backend calls in time order, for a failure's example."""
    events = [(s.sent, f"{s.action} {s.cache}/{s.tier}") for s in seen]
    events += [(c.arrived, "BACKEND") for c in made]
    shown = ", ".join(f"{when - origin:.3f} {what}" for when, what in sorted(events)[:12])
    # Whether a client had the whole audio before the request that synthesized it again was
    # sent (the entry was committed: memory or the Volume should have had it), or not.
    delivered = min((s.ended for s in seen if s.verdict == "right"), default=None)
    leaders = {s.request_id: s.sent for s in seen}
    again = [leaders[c.request_id] for c in made[1:] if c.request_id in leaders]
    if delivered is not None and again and min(again) > delivered:
        when = f"for a request sent {(min(again) - delivered) * 1000:.0f} ms after one was answered"
    else:
        when = "for a request sent before any was answered"
    return f"{recording[:4]} synthesized {len(made)} times, again {when}: {shown}"


def _judge_stored(
    verdict: Verdict, observations: list[Observation], stored: dict[str, bytes], base: str
) -> None:
    """Every object the Volume would serve is the right audio; nothing under a hostile id."""
    texts = {
        hashlib.sha256(s.recording.text.encode()).hexdigest(): s.recording.text
        for s in observations
    }
    for path, raw in sorted(stored.items()):
        parts = path.removeprefix(base + "/").split("/")
        if len(parts) != 4 or not CacheKey(*parts[:3], voice_of(parts[3])).valid():
            verdict.fail("nothing is stored under a hostile id", path)
            continue
        if not parts[3].endswith(SIDECAR_SUFFIX):
            continue
        key = CacheKey(*parts[:3], parts[3].removesuffix(SIDECAR_SUFFIX))
        parsed = parse_sidecar(raw, key)
        if parsed is None:
            continue
        meta, name = parsed
        body = stored.get(path.rsplit("/", 1)[0] + "/" + name)
        if body is None or hashlib.sha256(body).hexdigest() != meta.body_sha256:
            continue  # torn or corrupt: every read rejects it
        text = texts.get(meta.text_sha256)
        if text is None or body != Recording(*key, text).audio():
            verdict.counts["stored-wrong"] += 1
            verdict.fail("only whole, right audio is stored", f"{key} ({len(body)} B)")


def _audio_owners(calls: list[BackendCall]) -> dict[str, Recording]:
    """The digest of every audio the backend made, and whom (and which voice) it was made for."""
    owners: dict[str, Recording] = {}
    for recording in {call.recording for call in calls}:
        for voice in (recording.voice, FALLBACK_VOICE):
            audio = recording.audio(voice)
            owners[hashlib.sha256(audio).hexdigest()] = recording._replace(voice=voice)
    return owners
