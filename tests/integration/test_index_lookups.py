"""Lookups through the index: with PostgreSQL on, a Databricks miss costs no Files API call.

The proxy's Volume is the Files API emulator (the real databricks-sdk authenticates against it),
its index a real PostgreSQL. Files API reads are counted by the emulator: GET and HEAD on files
(a sidecar or an object); writes behind a fill only PUT files and list their folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.app import create_app
from proxy.index.coverage import VolumeCoverage, volume_id
from proxy.index.ledger import IndexLedger
from proxy.index.lookup import IndexLookup
from proxy.index.pool import IndexUnavailable
from proxy.index.recorder import EntryRecorder
from proxy.settings import VolumeSettings
from proxy.state import INDEX, JANITOR, RECORDER
from proxy.storage.entry import Entry
from proxy.storage.local import LocalVolume
from tests.conftest import settings_for
from tests.databricks_volume_support import (  # noqa: F401 - autouse: no ambient config
    _no_ambient_databricks_config,
)
from tests.fakes import FakeLegacyBackend
from tests.fakes.files_api import FilesApiEmulator
from tests.index_support import KEY, MakeIndex, eventually, make_index_fixture  # noqa: F401
from tests.pg import PostgresServer, free_port
from tests.support import ALICE, SPEAK, settle
from tests.support import speak_body as body

VOLUME_PATH = "/Volumes/main/default/tts"
APP_TOKEN = "dapi-app-token"
OBJECT = f"{VOLUME_PATH}/tts_audio/alice@example.com/t-1/m-1/af_nicole.mp3"
SIDECAR = OBJECT.replace(".mp3", ".meta.json")
COVERAGE_ID = volume_id(VolumeSettings(kind="databricks", path=VOLUME_PATH))


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FilesApiEmulator]:
    """The Files API emulator, with the app's PAT in the environment as Databricks Apps would."""
    server = FilesApiEmulator(volumes=[VOLUME_PATH], tokens=[APP_TOKEN])
    await server.start()
    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", APP_TOKEN)
    try:
        yield server
    finally:
        await server.stop()


async def proxy(
    aiohttp_client: Any, backend: FakeLegacyBackend, tmp_path: Path, dsn: str | None, **extra: Any
) -> Any:
    """A proxy on the emulator's Volume, with an index on `dsn` (None: no index)."""
    settings = settings_for(
        tmp_path,
        backend.url,
        **{
            "cache.volume.kind": "databricks",
            "cache.volume.path": VOLUME_PATH,
            "cache.volume.timeout_seconds": 2.0,
            "upstream.timeout_seconds": 5.0,
            "cache.janitor_interval_seconds": 3600.0,  # one run at start, then when told
            **({"index.dsn": dsn, "index.timeout_seconds": 1.0} if dsn else {}),
            **extra,
        },
    )
    return await aiohttp_client(create_app(settings))


def volume_reads(emulator: FilesApiEmulator) -> int:
    """Files API reads of a sidecar or an object (what a lookup costs; writes never read)."""
    return emulator.count("GET", "files") + emulator.count("HEAD", "files")


async def speak(client: Any, **change: Any) -> tuple[str, str | None, bytes]:
    async with client.post(SPEAK, json=body(**change), headers=ALICE) as response:
        assert response.status == 200
        data = await response.read()
        return response.headers["X-TTS-Cache"], response.headers.get("X-TTS-Cache-Tier"), data


async def lookups(client: Any) -> dict[str, float]:
    """tts_proxy_index_lookups_total by outcome, as the metrics endpoint shows it."""
    async with client.get("/_proxy/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tts_proxy_index_lookups_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = float(line.split()[-1])
    return found


async def volume_calls(client: Any) -> dict[tuple[str, str], float]:
    """tts_proxy_volume_calls_total by (method, outcome): the proxy's own Files API counters."""
    async with client.get("/_proxy/metrics") as response:
        text = await response.text()
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("tts_proxy_volume_calls_total{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[(method, outcome)] = float(line.split()[-1])
    return found


async def covered(dsn: str) -> bool:
    connection = await asyncpg.connect(dsn)
    try:
        return bool(
            await connection.fetchval(
                "SELECT covered = generation FROM tts_cache.tts_cache_volumes WHERE volume = $1",
                COVERAGE_ID,
            )
        )
    finally:
        await connection.close()


async def index_rows(dsn: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(dsn)
    try:
        found = await connection.fetch(
            "SELECT message_id, text_sha256 FROM tts_cache.tts_cache_entries ORDER BY message_id"
        )
    finally:
        await connection.close()
    return [(row[0], row[1]) for row in found]


async def started_janitor_done(client: Any, within: float = 30.0) -> None:
    """Wait for the janitor's run at start to end (however slow the machine)."""
    janitor = client.app[JANITOR]
    for _ in range(int(within / 0.05)):
        if janitor.runs + janitor.errors >= 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the janitor's run at start did not end")


async def walked(client: Any) -> None:
    """One janitor run (after the one at start): its walk records the Volume in the index."""
    report = await client.app[JANITOR].run_once()
    assert report.elected


async def test_a_miss_costs_no_files_api_call_then_memory_then_the_volume_via_the_index(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    postgres_dsn: str,
) -> None:
    first = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    await walked(first)
    assert await covered(postgres_dsn)  # an empty Volume, walked: the index names all of it
    reads, calls = volume_reads(emulator), await volume_calls(first)

    cache, _, audio = await speak(first)

    assert cache == "miss" and legacy_backend.calls[SPEAK] == 1
    assert volume_reads(emulator) == reads  # no sidecar GET: the index said "not stored"
    assert await lookups(first) == {"stored": 0, "absent": 1, "uncovered": 0, "unavailable": 0}
    assert await speak(first) == ("hit", "memory", audio)
    await settle(first.app)
    assert emulator.read(OBJECT) == audio
    # The proxy's own counters agree: the write behind PUT twice and listed the folder, and no
    # lookup asked for a sidecar (a miss's GET answers 404).
    after = await volume_calls(first)
    assert after.get(("GET", "404"), 0) == calls.get(("GET", "404"), 0)
    assert after[("PUT", "2xx")] - calls.get(("PUT", "2xx"), 0) == 2
    assert not [method for method, _ in after if method == "HEAD"]
    assert [message for message, _ in await index_rows(postgres_dsn)] == ["m-1"]
    # Another message is a miss without a Files API call too; an edited text as well (the row
    # records another text's digest).
    assert (await speak(first, message_id="m-2"))[0] == "miss"
    assert (await speak(first, text="Hello again"))[0] == "miss"
    assert volume_reads(emulator) == reads
    assert (await lookups(first))["absent"] == 3
    await settle(first.app)
    await first.close()

    second = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    await started_janitor_done(second)  # its reads (a walk) are not the lookup's
    reads = volume_reads(emulator)
    cache, tier, again = await speak(second, text="Hello again")
    edited = legacy_backend.audio_for("Hello again", "af_nicole")
    assert (cache, tier, again) == ("hit", "volume", edited)
    assert volume_reads(emulator) == reads + 2  # the sidecar, then the object
    assert (await lookups(second))["stored"] == 1
    assert legacy_backend.calls[SPEAK] == 3


async def test_with_the_index_down_or_hung_the_volume_is_read_as_before(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    postgres_dsn: str,
    postgres_server: PostgresServer,
) -> None:
    first = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    _, _, audio = await speak(first)
    await settle(first.app)
    await first.close()

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    down = await proxy(aiohttp_client, legacy_backend, tmp_path, dead)
    assert await speak(down) == ("hit", "volume", audio)
    assert (await lookups(down))["unavailable"] == 1
    await down.close()

    if not postgres_server.owned:
        pytest.skip("pausing needs the cluster this session started")
    hung = await proxy(
        aiohttp_client,
        legacy_backend,
        tmp_path,
        postgres_dsn,
        **{"cache.volume.lookup_budget_ms": 400},  # the index gets 100 ms of it
    )
    await walked(hung)
    await asyncio.to_thread(postgres_server.pause)
    try:
        started = time.monotonic()
        answer = await speak(hung)
        took = time.monotonic() - started
    finally:
        await asyncio.to_thread(postgres_server.resume)
    assert answer == ("hit", "volume", audio)
    assert took < 0.9, took  # far from index.timeout_seconds (1 s): the Volume went on without it
    assert (await lookups(hung))["unavailable"] == 1
    assert legacy_backend.calls[SPEAK] == 1


async def test_an_entry_the_index_does_not_name_is_served_until_the_walk_records_it(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    postgres_dsn: str,
    make_index: MakeIndex,
) -> None:
    # Written before there was an index (or by a process whose row was lost).
    before = await proxy(aiohttp_client, legacy_backend, tmp_path, None)
    _, _, audio = await speak(before)
    await settle(before.app)
    await before.close()

    # Another replica's janitor is elected meanwhile, so no walk has recorded the Volume yet.
    other = await make_index()
    async with IndexLedger(other.pool).elected() as election:
        assert election is not None
        client = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
        assert not (await client.app[JANITOR].run_once()).elected
        assert await speak(client) == ("hit", "volume", audio)
        assert (await lookups(client))["uncovered"] == 1
        assert not await covered(postgres_dsn)
    await walked(client)
    assert [message for message, _ in await index_rows(postgres_dsn)] == ["m-1"]
    assert await covered(postgres_dsn)
    await client.close()

    restarted = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert await speak(restarted) == ("hit", "volume", audio)
    assert (await lookups(restarted))["stored"] == 1
    assert legacy_backend.calls[SPEAK] == 1


async def test_always_trusts_the_index_at_once_and_rewrites_what_it_did_not_name(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    postgres_dsn: str,
    make_index: MakeIndex,
) -> None:
    before = await proxy(aiohttp_client, legacy_backend, tmp_path, None)
    await speak(before)
    await settle(before.app)
    await before.close()
    stale = emulator.read(SIDECAR)

    # Another replica's janitor is elected: no walk reads the Volume (or records it) meanwhile.
    other = await make_index()
    async with IndexLedger(other.pool).elected() as election:
        assert election is not None
        always = {"cache.volume.lookup_via_index": "always"}
        client = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **always)
        await started_janitor_done(client)
        reads = volume_reads(emulator)
        # The index does not name the entry and is trusted: synthesized again, and rewritten.
        assert (await speak(client))[0] == "miss"
        assert volume_reads(emulator) == reads
        assert legacy_backend.calls[SPEAK] == 2
        await settle(client.app)
    assert emulator.read(SIDECAR) != stale
    assert [message for message, _ in await index_rows(postgres_dsn)] == ["m-1"]


async def test_a_row_the_index_could_not_take_is_written_when_it_answers_again(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    postgres_dsn: str,
    postgres_server: PostgresServer,
) -> None:
    if not postgres_server.owned:
        pytest.skip("stopping needs the cluster this session started")
    client = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    await walked(client)
    recorder = client.app[RECORDER]
    await asyncio.to_thread(postgres_server.stop)
    try:
        _, _, audio = await speak(client)
        await settle(client.app)
        assert emulator.read(OBJECT) == audio
        assert len(recorder.unrecorded) == 1
    finally:
        await asyncio.to_thread(postgres_server.start)

    async def recorded() -> bool:
        return not recorder.unrecorded

    await eventually(recorded, within=20)
    assert [message for message, _ in await index_rows(postgres_dsn)] == ["m-1"]
    assert await covered(postgres_dsn)  # nothing was given up on: still covered
    await client.close()

    restarted = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert await speak(restarted) == ("hit", "volume", audio)
    assert legacy_backend.calls[SPEAK] == 1


async def test_a_local_volume_is_read_without_asking_the_index(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    local = {"cache.volume.kind": "local", "cache.volume.path": str(tmp_path / "volume")}
    client = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **local)
    assert (await speak(client))[0] == "miss"
    await settle(client.app)
    await client.close()
    restarted = await proxy(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **local)
    assert (await speak(restarted))[:2] == ("hit", "volume")
    assert set((await lookups(restarted)).values()) == {0}
    assert restarted.app[INDEX].available


async def test_user_auth_trusts_the_index_only_when_told(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    postgres_dsn: str,
) -> None:
    # No token outside a request, so no walk: "when-complete" never trusts the index there.
    user = {"cache.volume.auth": "user"}
    headers = {**ALICE, "X-Forwarded-Access-Token": APP_TOKEN}
    for mode, reads_per_miss in (("when-complete", 1), ("always", 0)):
        client = await proxy(
            aiohttp_client,
            legacy_backend,
            tmp_path,
            postgres_dsn,
            **user,
            **{"cache.volume.lookup_via_index": mode},
        )
        reads = volume_reads(emulator)
        payload = body(message_id=f"m-{mode}")
        async with client.post(SPEAK, json=payload, headers=headers) as response:
            assert response.headers["X-TTS-Cache"] == "miss"
        assert volume_reads(emulator) - reads == reads_per_miss, mode
        await client.close()


async def test_coverage_is_claimed_only_by_a_walk_begun_after_the_last_gap(
    postgres_dsn: str, make_index: MakeIndex
) -> None:
    index = await make_index()
    coverage = VolumeCoverage(index.pool, COVERAGE_ID)
    assert not await coverage.covered()
    generation = await coverage.begin_walk()
    await coverage.withdraw()  # an entry given up on while the walk went on
    assert not await coverage.complete_walk(generation)
    assert not await coverage.covered()
    generation = await coverage.begin_walk()
    assert await coverage.complete_walk(generation)
    assert await coverage.covered()
    await coverage.withdraw()
    assert not await coverage.covered()


async def test_rows_given_up_on_withdraw_the_coverage_when_the_index_answers(
    postgres_dsn: str, make_index: MakeIndex, tmp_path: Path
) -> None:
    up = await make_index()
    coverage = VolumeCoverage(up.pool, COVERAGE_ID)
    assert await coverage.complete_walk(await coverage.begin_walk())
    later = await make_index(start=False)  # not started yet: every call is refused
    volume = LocalVolume(str(tmp_path / "volume"), "tts_audio")
    recorder = EntryRecorder(
        later, volume, coverage=VolumeCoverage(later.pool, COVERAGE_ID), max_unrecorded=1
    )
    entries = [_entry(f"voice {n}") for n in range(2)]
    keys = [KEY._replace(message_id=f"m-{n}") for n in range(2)]
    for key, entry in zip(keys, entries, strict=True):
        with pytest.raises(IndexUnavailable):
            await recorder(key, entry)
    assert list(recorder.unrecorded) == [keys[1]] and recorder.dropped == 1

    await later.start()
    assert await recorder.retry() == 1
    assert not await coverage.covered()  # the entry given up on may be on the Volume unnamed
    assert not recorder.unrecorded
    assert await later.known(keys) == {keys[1]}
    await volume.aclose()


def _entry(text: str) -> Entry:
    return Entry.build(
        text.encode() * 100,
        content_type="audio/mpeg",
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        provider=None,
    )


async def test_a_key_written_here_whose_row_is_still_to_come_is_read_from_the_volume(
    postgres_dsn: str, make_index: MakeIndex
) -> None:
    index = await make_index()
    coverage = VolumeCoverage(index.pool, COVERAGE_ID)
    assert await coverage.complete_walk(await coverage.begin_walk())
    counts: Counter[str] = Counter()
    waiting = {KEY}  # what the recorder holds while the index could not take the row
    lookup = IndexLookup(
        index,
        COVERAGE_ID,
        trust="when-complete",
        wait_seconds=1.0,
        counts=counts,
        unrecorded=waiting,
    )
    text = "a" * 64
    assert await lookup.may_be_stored(KEY, text, None)
    other = KEY._replace(message_id="m-other")
    assert not await lookup.may_be_stored(other, text, None)
    await index.record(other, _entry("x").meta, "/Volumes/x")
    assert await lookup.may_be_stored(other, _entry("x").meta.text_sha256, None)
    assert not await lookup.may_be_stored(other, _entry("x").meta.text_sha256, "deepgram")
    assert counts == {"stored": 2, "absent": 2}
