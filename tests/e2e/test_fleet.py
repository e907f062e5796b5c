"""One cache across workers and replicas: purges reach every process, scrapes sum the group.

Real processes (`serve --workers N`, the CLI), the fake legacy backend and, for replicas, a real
PostgreSQL. Which worker answered a request is read from /proc (tests/e2e/groups.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import PROXY_MODULE, toml_for
from tests.e2e.groups import TRIES, Group, StartGroup, metric, scrape
from tests.e2e.test_workers import socket_inodes
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, SPEAK, TOKEN

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find the workers"
)

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
AUDIO_URL = "/_proxy/audio/t-1/m-1/af_nicole"
ALICE_USER = ALICE["X-Forwarded-Email"]


async def cached_everywhere(groups: list[Group]) -> bytes:
    """Speak until every worker of every group answers from its memory; the audio's bytes."""
    for group in groups:
        answers = await group.on_every_worker(group.speak, each=2)
        last = {a.worker: a for a in answers}
        for worker, answer in last.items():
            assert answer.headers.get("X-TTS-Cache-Tier") == "memory", (worker, answer.headers)
    return answers[-1].body


async def purge_through(group: Group, **query: str) -> dict[str, Any]:
    answer = await group.ask("DELETE", "/_proxy/admin/api/entries", params=query, headers=ADMIN)
    assert answer.status == 200, answer.body
    result: dict[str, Any] = json.loads(answer.body)
    return result


async def served_nowhere(groups: list[Group]) -> None:
    """The audio URL is a 404 on every worker of every group (at least three times on each)."""
    for group in groups:
        fetch = lambda g=group: g.ask("GET", AUDIO_URL, headers=ALICE)  # noqa: E731
        for answer in await group.on_every_worker(fetch, each=3):
            assert answer.status == 404, (answer.worker, answer.headers)


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *PROXY_MODULE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_three_workers_without_postgres_a_purge_reaches_every_worker(
    start_group: StartGroup, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    group = await start_group(legacy_backend.url, workers=3)
    assert (await group.speak()).headers["X-TTS-Cache"] == "miss"
    old = await cached_everywhere([group])

    # The message is edited: one worker records the new text; the others drop their old copy,
    # so the audio URL serves the new recording whichever worker answers.
    edited = await group.speak(text="Hello, edited")
    assert edited.headers["X-TTS-Cache"] == "miss" and edited.body != old
    fetch = lambda: group.ask("GET", AUDIO_URL, headers=ALICE)  # noqa: E731
    for _ in range(50):  # the Volume write, 10 ms behind the answer, then the notice
        bodies = {a.worker: a.body for a in await group.on_every_worker(fetch)}
        if all(body == edited.body for body in bodies.values()):
            break
        await asyncio.sleep(0.1)
    assert all(body == edited.body for body in bodies.values())

    # Through the admin API of whichever worker the connection reaches.
    result = await purge_through(group, user="alice@example.com")
    assert result["removed"] == 1 and result["volume"] == 1
    assert result["processes"]["confirmed"] == 3 and result["processes"]["expected"] == 3
    await served_nowhere([group])
    # Speak calls now get the backend's new recording, never the purged one, on every worker.
    legacy_backend.speak.size = 50_000
    calls = legacy_backend.calls[SPEAK]
    for answer in await group.on_every_worker(group.speak, each=3):
        assert answer.status == 200 and answer.body != old and len(answer.body) == 50_000
    assert legacy_backend.calls[SPEAK] > calls

    # The command line goes through the running proxy (admin.token is in its config).
    await cached_everywhere([group])
    code, out, err = await run_cli("purge", "--config", str(group.config), "--user", ALICE_USER)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["via"] == "admin-api" and answer["removed"] == 1
    assert answer["processes"]["confirmed"] == 3 and answer["processes"]["expected"] == 3
    await served_nowhere([group])

    # Without the token and without an index the command cannot reach the workers' memory: it
    # says so, fails, and removes nothing.
    await cached_everywhere([group])
    no_token = tmp_path / "no-token.toml"
    no_token.write_text(
        toml_for(
            {
                "server.port": group.proxy.port,
                "cache.volume.path": str(tmp_path / "volume"),
            }
        )
    )
    code, out, err = await run_cli("purge", "--config", str(no_token), "--user", ALICE_USER)
    assert code == 1 and out == ""
    assert "could not reach" in err and "nothing was removed" in err
    assert (await group.speak()).headers["X-TTS-Cache"] == "hit"
    stored = tmp_path / "volume" / "tts_audio" / ALICE_USER / "t-1" / "m-1" / "af_nicole.mp3"
    assert stored.stat().st_size == 50_000


async def test_scrapes_on_any_worker_sum_the_group_and_only_grow(
    start_group: StartGroup, legacy_backend: FakeLegacyBackend
) -> None:
    group = await start_group(legacy_backend.url, workers=3)
    answers = [await group.speak()]
    answers += await group.on_every_worker(group.speak, each=2)
    hits = sum(1 for a in answers if a.headers["X-TTS-Cache"] == "hit")

    seen: dict[int, int] = {}
    previous = -1.0
    scrapes = 0
    while scrapes < 6 or len(seen) < 3:
        assert scrapes < TRIES
        worker, samples = await scrape(group)
        scrapes += 1
        seen[worker] = seen.get(worker, 0) + 1
        assert metric(samples, "tts_proxy_workers") == 3
        total = sum(
            metric(samples, "tts_proxy_requests_total", outcome="hit", tier=tier)
            for tier in ("memory", "volume")
        )
        assert total == hits  # the same sum whichever worker answers
        upstream = metric(samples, "tts_proxy_upstream_calls_total")
        assert upstream == legacy_backend.calls[SPEAK]  # each worker's misses, summed
        assert total >= previous
        previous = total
        if scrapes % 2 == 0:  # traffic between scrapes: the next sum is larger
            answer = await group.speak()
            hits += answer.headers["X-TTS-Cache"] == "hit"
    assert len(seen) == 3

    stats = await group.ask("GET", "/_proxy/admin/api/stats", headers=ADMIN)
    numbers = json.loads(stats.body)
    assert numbers["processes"] == {"sampled": 3, "expected": 3}
    assert sum(numbers["requests"]["hits"].values()) == hits
    # Each worker holds its own copy in memory: the group holds three.
    assert numbers["tiers"]["memory"]["entries"] == 3

    # A purge from the dashboard says how many workers confirmed.
    admin = f"{group.proxy.url}/_proxy/admin"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(f"{admin}/login", data={"token": TOKEN}) as page:
            assert page.status == 200
        async with browser.get(f"{admin}/purge", params={"user": ALICE_USER}) as page:
            found = re.search(r'name="csrf" value="([0-9a-f]+)"', await page.text())
        assert found is not None
        form = {"user": ALICE_USER, "csrf": found.group(1)}
        async with browser.post(f"{admin}/purge", data=form) as page:
            text = await page.text()
    assert "Purged: 1 entry removed; 3 of 3 processes confirmed." in text

    # The workers' sockets live in one folder only this user may enter, gone once they stop.
    folders = {Path(path).parent for worker in group.workers for path in unix_sockets(worker)}
    assert len(folders) == 1
    (folder,) = folders
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    group.proxy.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(group.proxy.process.wait(), timeout=15) == 0
    assert not folder.exists()


def unix_sockets(pid: int) -> list[str]:
    """The paths of the Unix sockets `pid` listens on (from /proc/net/unix)."""
    held = socket_inodes(pid)
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[6] in held:
            paths.append(fields[7])
    return paths


async def test_two_replicas_on_postgres_a_purge_reaches_every_process_of_both(
    start_group: StartGroup,
    legacy_backend: FakeLegacyBackend,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    shared = {"index.dsn": postgres_dsn}
    first = await start_group(legacy_backend.url, workers=2, **shared)
    second = await start_group(legacy_backend.url, workers=2, **shared)
    assert (await first.speak()).headers["X-TTS-Cache"] == "miss"
    await cached_everywhere([first, second])
    stats = json.loads((await first.ask("GET", "/_proxy/admin/api/stats", headers=ADMIN)).body)
    # Memory is each worker's own (summed over this replica's two); the Volume is shared.
    assert stats["tiers"]["memory"]["entries"] == 2
    assert stats["tiers"]["volume"] == {"entries": 1, "bytes": 65536, "source": "index"}

    result = await purge_through(second, user=ALICE_USER)
    assert result["removed"] == 1 and result["index"] == 1
    assert result["processes"]["confirmed"] == 4 and result["processes"]["expected"] == 4
    await served_nowhere([first, second])

    # The command without the admin token: straight on the Volume and the index, then NOTIFY,
    # which every process of both replicas hears and confirms.
    await cached_everywhere([first, second])
    direct = tmp_path / "direct.toml"
    direct.write_text(
        toml_for({"cache.volume.path": str(tmp_path / "volume"), "index.dsn": postgres_dsn})
    )
    code, out, err = await run_cli("purge", "--config", str(direct), "--user", ALICE_USER)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["via"] == "postgres" and answer["volume"] == 1 and answer["index"] == 1
    assert answer["processes"]["confirmed"] == 4 and answer["processes"]["expected"] == 4
    await served_nowhere([first, second])

    # A process whose LISTEN session is cut drops its whole memory when it is back, and says so.
    await cached_everywhere([first])
    victim = first.workers[0]
    con = await asyncpg.connect(postgres_dsn)
    try:
        killed = await con.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE $1",
            f"tts-fleet % %-{victim}",
        )
    finally:
        await con.close()
    assert killed == 1
    flushes = 0.0
    for _ in range(100):
        _, samples = await scrape(first)
        flushes = metric(samples, "tts_proxy_memory_flushes_total")
        if flushes:
            break
        await asyncio.sleep(0.05)
    assert flushes == 1
    assert "memory tier dropped" in first.proxy.log()
    answers = await first.on_every_worker(first.speak)
    after = next(a for a in answers if a.worker == victim)
    # Its memory copy went; the Volume still has the entry.
    assert after.headers.get("X-TTS-Cache-Tier") == "volume"
