"""One synthesis per key across workers and replicas, with real processes.

`serve --workers N` groups (two of them sharing a Volume and a real PostgreSQL for replicas) in
front of the fake legacy backend, which counts its speak calls. Bursts of identical requests
each open their own connection, so the kernel spreads them over the workers; which worker
answered is read from /proc (as in test_fleet.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDict

from tests.conftest import free_port
from tests.e2e.groups import Group, StartGroup, metric, scrape
from tests.e2e.test_workers import TCP_ESTABLISHED, socket_inodes, tcp_sockets
from tests.fakes import FakeLegacyBackend, SpeakBehaviour
from tests.support import ALICE, SPEAK, TOKEN, speak_body

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find the workers"
)

BURST = 100
# The backend takes this long before its answer's head: every request of a burst arrives while
# the one synthesis runs.
SYNTHESIS_SECONDS = 1.5
# Generous for a loaded machine: a worker that does not hear from the owner this long fills the
# key itself, which these tests would see as a second backend call.
OWNER_TIMEOUT = 5.0
ORIGIN_A = "https://a.example"
ORIGIN_B = "https://b.example"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@dataclass(frozen=True)
class Reply:
    """One client's answer, the worker that gave it, and when it came."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    worker: int
    origin: str
    seconds: float


async def speak_on_new_connection(
    group: Group, origin: str, client_port: int | None = None, **change: Any
) -> Reply:
    """A speak call for Alice's first message on a connection of its own, from `client_port`
    (which names the connection in /proc, and so the worker holding it)."""
    client_port = client_port or free_port()
    started = time.monotonic()
    headers = {**ALICE, "Origin": origin}
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", client_port))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(
            f"{group.proxy.url}{SPEAK}", json=speak_body(**change), headers=headers
        ) as response:
            body = await response.read()
            status, answer_headers = response.status, CIMultiDict(response.headers)
        seconds = time.monotonic() - started
        # Kept alive by the session until here: the worker holding it is the one that answered.
        connection = tcp_sockets(TCP_ESTABLISHED, group.proxy.port, client_port)
        worker = next(w for w in group.workers if socket_inodes(w) & connection)
    return Reply(status, answer_headers, body, worker, origin, seconds)


def distinct_ports(count: int) -> list[int]:
    """`count` different loopback ports free now (one per connection of a burst)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


async def burst(groups: list[Group], count: int = BURST) -> list[Reply]:
    """`count` identical speak calls at once, spread over `groups`, half from each origin."""
    calls = [
        speak_on_new_connection(
            groups[n % len(groups)], ORIGIN_A if n % 4 < 2 else ORIGIN_B, client_port=port
        )
        for n, port in enumerate(distinct_ports(count))
    ]
    return list(await asyncio.gather(*calls))


def check_one_synthesis_for_all(replies: list[Reply], backend: FakeLegacyBackend) -> None:
    """One backend call; every client the same audio, under the rules a joined client gets."""
    assert backend.calls[SPEAK] == 1
    expected = FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    assert all(reply.status == 200 for reply in replies), Counter(r.status for r in replies)
    assert all(reply.body == expected for reply in replies)
    # Exactly one request reached the backend: the only answer neither joined nor a hit, and
    # the only one that carries the backend's cookie for its own client.
    forwarded = [
        reply
        for reply in replies
        if reply.headers["X-TTS-Cache"] == "miss"
        and "collapsed" not in reply.headers["Cache-Status"]
    ]
    assert len(forwarded) == 1, Counter(r.headers["Cache-Status"] for r in replies)
    assert [r for r in replies if "Set-Cookie" in r.headers] == forwarded
    for reply in replies:
        assert reply.headers["Cache-Control"].startswith("private")
        if reply in forwarded:
            continue
        # A replay carries CORS headers only to the origin they were made for.
        allowed = reply.headers.get("Access-Control-Allow-Origin")
        assert allowed == (ORIGIN_A if reply.origin == ORIGIN_A else None), reply.headers


def slow_backend(backend: FakeLegacyBackend) -> None:
    backend.speak.headers_delay = SYNTHESIS_SECONDS
    backend.speak.extra_headers = {
        "Set-Cookie": "backend-session=for-the-leader; Path=/",
        "Access-Control-Allow-Origin": ORIGIN_A,
        "Vary": "Origin",
    }


async def test_three_workers_without_postgres_make_one_synthesis_for_a_burst_of_100(
    start_group: StartGroup, legacy_backend: FakeLegacyBackend
) -> None:
    group = await start_group(
        legacy_backend.url, workers=3, **{"fleet.owner_timeout_seconds": OWNER_TIMEOUT}
    )
    slow_backend(legacy_backend)

    replies = await burst([group])

    assert {reply.worker for reply in replies} == set(group.workers)
    check_one_synthesis_for_all(replies, legacy_backend)
    _, samples = await scrape(group)
    assert metric(samples, "tts_proxy_upstream_calls_total") == 1
    # The key's owner led it; the two other workers each handed their miss to it.
    assert metric(samples, "tts_proxy_fleet_fills_total", outcome="owner") == 2
    assert metric(samples, "tts_proxy_fleet_fills_total", outcome="for_sibling") == 2
    assert metric(samples, "tts_proxy_fleet_fills_total", outcome="owner_fallback") == 0


async def test_two_replicas_of_two_workers_make_one_synthesis_for_a_burst_of_100(
    start_group: StartGroup, legacy_backend: FakeLegacyBackend, postgres_dsn: str
) -> None:
    shared = {"index.dsn": postgres_dsn, "fleet.owner_timeout_seconds": OWNER_TIMEOUT}
    first = await start_group(legacy_backend.url, workers=2, **shared)
    second = await start_group(legacy_backend.url, workers=2, **shared)
    slow_backend(legacy_backend)

    replies = await burst([first, second])

    assert {reply.worker for reply in replies} == {*first.workers, *second.workers}
    check_one_synthesis_for_all(replies, legacy_backend)
    outcomes: Counter[str] = Counter()
    for group in (first, second):
        _, samples = await scrape(group)
        for outcome in ("lease", "followed", "owner", "owner_fallback", "wait_timeout"):
            outcomes[outcome] += int(
                metric(samples, "tts_proxy_fleet_fills_total", outcome=outcome)
            )
    # One replica's owner took the lease; the other's waited and read the Volume.
    assert outcomes["lease"] == 1 and outcomes["followed"] == 1, outcomes
    assert outcomes["owner"] == 2 and outcomes["owner_fallback"] == outcomes["wait_timeout"] == 0
    async with aiohttp.ClientSession() as session:
        url = f"{first.proxy.url}/_proxy/admin/api/stats"
        async with session.get(url, headers=ADMIN) as response:
            stats = await response.json()
    assert stats["tiers"]["volume"]["entries"] == 1


async def test_a_leader_killed_mid_fill_leaves_the_followers_answered_within_the_bound(
    start_group: StartGroup, legacy_backend: FakeLegacyBackend, postgres_dsn: str
) -> None:
    wait_seconds = 30.0  # past this test's own bound: only the leader's death can free them
    shared = {
        "index.dsn": postgres_dsn,
        "fleet.owner_timeout_seconds": OWNER_TIMEOUT,
        "fleet.wait_seconds": wait_seconds,
    }
    leader = await start_group(legacy_backend.url, workers=2, **shared)
    follower = await start_group(legacy_backend.url, workers=2, **shared)
    calls = 0

    def first_call_hangs(_body: dict[str, Any], _headers: CIMultiDict[str]) -> SpeakBehaviour:
        nonlocal calls
        calls += 1
        return SpeakBehaviour(headers_delay=60.0 if calls == 1 else 0.0)

    legacy_backend.speak_plan = first_call_hangs
    leading = [asyncio.create_task(speak_on_new_connection(leader, ORIGIN_A)) for _ in range(3)]
    holder = await lease_holder(postgres_dsn)
    for _ in range(200):  # the lease comes first, then the call
        if legacy_backend.calls[SPEAK]:
            break
        await asyncio.sleep(0.02)
    assert legacy_backend.calls[SPEAK] == 1
    following = [
        asyncio.create_task(speak_on_new_connection(follower, ORIGIN_A)) for _ in range(10)
    ]
    await asyncio.sleep(1.0)  # they find the lease held, and wait
    assert legacy_backend.calls[SPEAK] == 1 and not any(task.done() for task in following)

    # The leading replica dies whole, as a replica's container does: its parent and both
    # workers at once (a worker that dies alone makes its sibling drain, which may join in).
    assert holder in leader.workers
    for pid in (leader.proxy.pid, *leader.workers):
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    replies = await asyncio.wait_for(asyncio.gather(*following), timeout=wait_seconds / 2)
    answered = time.monotonic() - killed

    expected = FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    assert all(reply.status == 200 and reply.body == expected for reply in replies)
    assert answered < wait_seconds / 2
    assert legacy_backend.calls[SPEAK] == 2  # the dead leader's, and the one that took over
    _, samples = await scrape(follower)
    assert metric(samples, "tts_proxy_fleet_fills_total", outcome="takeover") == 1
    assert metric(samples, "tts_proxy_fleet_fills_total", outcome="wait_timeout") == 0
    await asyncio.gather(*leading, return_exceptions=True)  # their replica died with the lead


async def lease_holder(dsn: str) -> int:
    """The pid of the process holding the one fill lease, once it is taken."""
    con = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            holder = await con.fetchval("SELECT holder FROM tts_cache.fill_leases")
            if holder is not None:
                return int(str(holder).rsplit("-", 1)[1])
            await asyncio.sleep(0.05)
    finally:
        await con.close()
    pytest.fail("no fill lease was taken")
