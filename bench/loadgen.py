"""The Python load generator, for what wrk cannot measure: first byte, bursts, replays, headers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.workload import SpeakCall
from bench.wrk import PERCENTILES

MAX_FAILURES_KEPT = 5


@dataclass(frozen=True)
class Sample:
    """One request: monotonic timestamps (seconds) and what the answer said."""

    started: float
    headers_at: float
    first_byte_at: float
    ended: float
    status: int
    size: int
    cache: str
    cache_status: str
    # The proxy's X-TTS-Cache-Tier: memory or volume on a hit, empty otherwise.
    tier: str = ""

    @property
    def ttfb(self) -> float:
        """Seconds from sending to the first body byte."""
        return self.first_byte_at - self.started

    @property
    def total(self) -> float:
        """Seconds from sending to the last body byte."""
        return self.ended - self.started


@dataclass
class LoadRun:
    """A batch of requests and how long it took."""

    samples: list[Sample]
    seconds: float
    failures: int = 0
    failure_examples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return len(self.samples) / self.seconds if self.seconds else 0.0

    def totals_ms(self) -> list[float]:
        """Each request's total time, in ms."""
        return [s.total * 1000 for s in self.samples]

    def ttfbs_ms(self) -> list[float]:
        """Each request's time to first byte, in ms."""
        return [s.ttfb * 1000 for s in self.samples]


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile `p` (0-100) of `values`; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def curve(values: Sequence[float]) -> list[tuple[float, float]]:
    """(percentile, value) points for the distribution plot."""
    if not values:
        return []
    return [(p, percentile(values, p)) for p in PERCENTILES] + [(100.0, max(values))]


def session_for(concurrency: int) -> aiohttp.ClientSession:
    """A client session with one connection per concurrent request, bodies left as sent."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30),
        auto_decompress=False,
    )


async def timed_post(session: aiohttp.ClientSession, url: str, call: SpeakCall) -> Sample:
    """POST one speak call and time its head, first body byte and end."""
    started = time.monotonic()
    async with session.post(url, data=call.body, headers=call.headers()) as response:
        headers_at = time.monotonic()
        first = await response.content.readany()
        first_byte_at = time.monotonic()
        size = len(first)
        while chunk := await response.content.readany():
            size += len(chunk)
        ended = time.monotonic()
        cache = cache_outcome(response)
        return Sample(
            started,
            headers_at,
            first_byte_at,
            ended,
            response.status,
            size,
            cache,
            response.headers.get("Cache-Status") or "",
            response.headers.get("X-TTS-Cache-Tier") or "",
        )


def cache_outcome(response: aiohttp.ClientResponse) -> str:
    """nginx's X-Cache-Status when nginx answered (the backend's own X-TTS-Cache passes through
    nginx), else the proxy's X-TTS-Cache."""
    headers = response.headers
    return headers.get("X-Cache-Status") or headers.get("X-TTS-Cache") or ""


async def closed_loop(
    url: str,
    calls: Iterable[SpeakCall],
    *,
    concurrency: int,
    max_seconds: float | None = None,
) -> LoadRun:
    """Send `calls` with `concurrency` requests in flight, until done or `max_seconds` passed."""
    pending = iter(calls)
    run = LoadRun([], 0.0)
    started = time.monotonic()
    deadline = started + max_seconds if max_seconds is not None else math.inf

    async def worker(session: aiohttp.ClientSession) -> None:
        # The deadline is checked before a call is taken, so every call taken is sent.
        while time.monotonic() < deadline:
            call = next(pending, None)
            if call is None:
                return
            try:
                run.samples.append(await timed_post(session, url, call))
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.failures += 1
                if len(run.failure_examples) < MAX_FAILURES_KEPT:
                    run.failure_examples.append(f"{type(exc).__name__}: {exc}")

    async with session_for(concurrency) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    run.seconds = time.monotonic() - started
    return run


async def burst(url: str, warm_url: str, call: SpeakCall, count: int) -> LoadRun:
    """`count` identical calls at once, each on a connection opened beforehand."""
    async with session_for(count) as session:
        await asyncio.gather(*(_touch(session, warm_url) for _ in range(count)))
        started = time.monotonic()
        results = await asyncio.gather(
            *(timed_post(session, url, call) for _ in range(count)), return_exceptions=True
        )
        seconds = time.monotonic() - started
    run = LoadRun([r for r in results if isinstance(r, Sample)], seconds)
    errors = [r for r in results if isinstance(r, BaseException)]
    run.failures = len(errors)
    run.failure_examples = [f"{type(e).__name__}: {e}" for e in errors[:MAX_FAILURES_KEPT]]
    return run


async def _touch(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(url) as response:
        await response.read()
