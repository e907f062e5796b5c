"""DatabricksVolume against the Files API emulator: storage, integrity, faults, breaker, auth."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import VolumeSettings
from proxy.identity import CURRENT_TOKEN
from proxy.speak import CacheKey
from proxy.storage.databricks.files_api import VolumeRequestFailed, VolumeUnavailable
from proxy.storage.databricks.streamed import CorruptEntry, StreamedEntry
from proxy.storage.databricks.volume import DatabricksVolume
from proxy.storage.entry import Entry
from proxy.storage.tiered import TieredCache
from tests.fakes.files_api import FilesApiEmulator

PAT = "dapi-app-token"
CLIENT_ID = "app-client-id"
CLIENT_SECRET = "app-client-secret"
VOLUME = "/Volumes/main/default/tts"
BASE = f"{VOLUME}/tts_audio"
KEY = CacheKey("alice@example.com", "t-9", "m+123", "af_nicole")
FOLDER = f"{BASE}/alice@example.com/t-9/m+123"
OBJECT = f"{FOLDER}/af_nicole.mp3"
SIDECAR = f"{FOLDER}/af_nicole.meta.json"

MakeVolume = Callable[..., DatabricksVolume]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def audio(size: int = 64 * 1024, seed: str = "hello") -> bytes:
    """Deterministic bytes that differ everywhere between seeds."""
    blocks = bytearray()
    counter = 0
    while len(blocks) < size:
        blocks.extend(hashlib.sha256(f"{seed}|{counter}".encode()).digest())
        counter += 1
    return bytes(blocks[:size])


def entry_for(body: bytes, content_type: str = "audio/mpeg") -> Entry:
    return Entry.build(
        body,
        content_type=content_type,
        text_sha256=hashlib.sha256(b"hello").hexdigest(),
        provider="replicate",
        headers=(("content-type", content_type),),
    )


def settings(**overrides: Any) -> VolumeSettings:
    base = VolumeSettings(
        kind="databricks",
        path=VOLUME,
        prefix="tts_audio",
        timeout_seconds=2.0,
        auth="app",
        retries=2,
        failure_threshold=3,
        cooldown_seconds=30.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(autouse=True)
def _no_ambient_databricks_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """Nothing from this machine's environment or ~/.databrickscfg leaks into the SDK."""
    for name in list(os.environ):
        if name.startswith(("DATABRICKS_", "ARM_", "AZURE_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    yield


@pytest.fixture
async def emulator() -> AsyncIterator[FilesApiEmulator]:
    server = FilesApiEmulator(chunk_size=16 * 1024)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def make_volume(emulator: FilesApiEmulator) -> AsyncIterator[MakeVolume]:
    """A factory of volumes on the emulator (PAT auth unless told otherwise), closed after."""
    made: list[DatabricksVolume] = []

    def make(**options: Any) -> DatabricksVolume:
        volume_settings = settings(**options.pop("settings", {}))
        options.setdefault("host", emulator.url)
        options.setdefault("config_options", {"token": PAT})
        options.setdefault("jitter", lambda: 0.0)
        volume = DatabricksVolume(volume_settings, **options)
        made.append(volume)
        return volume

    yield make
    for volume in made:
        await volume.aclose()


async def as_user(token: str | None, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` in its own task with CURRENT_TOKEN set, as a request handler would."""

    async def run() -> Any:
        CURRENT_TOKEN.set(token)
        return await work()

    return await asyncio.create_task(run())


async def collect(streamed: StreamedEntry) -> bytes:
    try:
        return b"".join([chunk async for chunk in streamed])
    finally:
        await streamed.aclose()


# Storage


async def test_put_then_get_round_trip_in_the_documented_layout(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    await volume.put(KEY, entry)

    assert emulator.read(OBJECT) == entry.body
    raw_sidecar = emulator.read(SIDECAR)
    assert raw_sidecar is not None
    sidecar = json.loads(raw_sidecar)
    assert sidecar["object"] == "af_nicole.mp3"
    assert sidecar["key"] == {
        "user": KEY.user,
        "thread_id": KEY.thread_id,
        "message_id": KEY.message_id,
        "voice": KEY.voice,
    }
    assert sidecar["body_sha256"] == entry.meta.body_sha256
    # Object first, sidecar last.
    puts = [r.path for r in emulator.requests if r.method == "PUT"]
    assert puts == [OBJECT, SIDECAR]
    assert emulator.tokens_used(VOLUME) == {PAT}
    assert {r.workspace_id for r in emulator.requests if r.endpoint == "files"} == {
        emulator.workspace_id
    }

    got = await volume.get(KEY)
    assert got == entry
    assert volume.breaker_state == "closed"


async def test_a_new_instance_finds_the_entry(make_volume: MakeVolume) -> None:
    entry = entry_for(audio(seed="restart"))
    first = make_volume()
    await first.put(KEY, entry)
    await first.aclose()

    second = make_volume()
    assert await second.get(KEY) == entry


async def test_a_miss_is_none_and_not_a_failure(make_volume: MakeVolume) -> None:
    volume = make_volume(settings={"failure_threshold": 1})
    for _ in range(3):
        assert await volume.get(KEY) is None
        assert await volume.open(KEY) is None
    await volume.delete(KEY)
    assert volume.breaker_state == "closed"
    assert volume.breaker.consecutive_failures == 0


async def test_put_in_another_format_removes_the_old_object(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio(), "audio/mpeg"))
    wav = entry_for(audio(seed="wav"), "audio/wav")
    await volume.put(KEY, wav)
    assert emulator.read(OBJECT) is None
    assert emulator.read(f"{FOLDER}/af_nicole.wav") == wav.body
    assert await volume.get(KEY) == wav

    await volume.delete(KEY)
    assert emulator.read(f"{FOLDER}/af_nicole.wav") is None
    assert emulator.read(SIDECAR) is None
    assert await volume.get(KEY) is None


async def test_streamed_open_starts_before_the_whole_object_arrived(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(chunk_size=16 * 1024)
    entry = entry_for(audio(256 * 1024))
    await volume.put(KEY, entry)
    emulator.chunk_delay = 0.04  # 16 chunks of 16 KiB: about 0.6 s for the whole object

    streamed = await volume.open(KEY)
    assert streamed is not None
    assert streamed.meta == entry.meta
    arrivals: list[float] = []
    chunks: list[bytes] = []
    try:
        async for chunk in streamed:
            arrivals.append(time.monotonic())
            chunks.append(chunk)
    finally:
        await streamed.aclose()

    assert b"".join(chunks) == entry.body
    assert len(chunks) > 4
    # The first chunk was in hand long before the last one had been sent.
    assert arrivals[-1] - arrivals[0] >= 0.3


async def test_range_on_a_stored_object(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    entry = entry_for(audio())
    await make_volume().put(KEY, entry)
    url = f"{emulator.url}/api/2.0/fs/files{OBJECT.replace('@', '%40').replace('+', '%2B')}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, headers={"Authorization": f"Bearer {PAT}", "Range": "bytes=1000-1999"}
        ) as response,
    ):
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-1999/{len(entry.body)}"
        assert await response.read() == entry.body[1000:2000]


# Integrity


async def test_a_corrupt_object_is_a_miss_and_both_files_go(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio()))
    emulator.corrupt(OBJECT)
    assert await volume.get(KEY) is None
    assert emulator.read(OBJECT) is None
    assert emulator.read(SIDECAR) is None
    assert volume.breaker_state == "closed"


async def test_an_object_of_the_wrong_length_is_a_miss(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    for reader in (volume.get, volume.open):
        await volume.put(KEY, entry)
        emulator.write(OBJECT, entry.body[:-100])
        assert await reader(KEY) is None
        assert emulator.read(OBJECT) is None
        assert emulator.read(SIDECAR) is None


async def test_a_malformed_sidecar_is_a_miss_and_removed(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio()))
    emulator.write(SIDECAR, b"{not json")
    assert await volume.get(KEY) is None
    assert emulator.read(SIDECAR) is None
    assert emulator.read(OBJECT) is None


async def test_a_sidecar_naming_another_key_is_refused(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio()))
    raw = emulator.read(SIDECAR)
    assert raw is not None
    tampered = json.loads(raw)
    tampered["key"]["user"] = "mallory"
    emulator.write(SIDECAR, json.dumps(tampered).encode())
    assert await volume.get(KEY) is None


async def test_streamed_open_withholds_the_final_chunk_of_a_corrupt_object(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(chunk_size=16 * 1024)
    entry = entry_for(audio(128 * 1024))
    await volume.put(KEY, entry)
    emulator.corrupt(OBJECT)

    streamed = await volume.open(KEY)
    assert streamed is not None
    received = bytearray()
    with pytest.raises(CorruptEntry):
        async for chunk in streamed:
            received.extend(chunk)
    await streamed.aclose()

    assert len(received) < len(entry.body)
    assert len(received) >= len(entry.body) - 16 * 1024
    assert emulator.read(OBJECT) is None
    assert emulator.read(SIDECAR) is None


# Faults


async def test_500s_then_success_are_retried(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    emulator.fail_next(2, status=500, method="PUT")
    await volume.put(KEY, entry)
    assert emulator.count("PUT", "files", ".mp3") == 3

    emulator.fail_next(2, status=503, path_suffix=".mp3")
    assert await volume.get(KEY) == entry
    assert volume.breaker_state == "closed"


async def test_retries_run_out(emulator: FilesApiEmulator, make_volume: MakeVolume) -> None:
    volume = make_volume(settings={"retries": 1})
    emulator.fail_next(10, status=502)
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert emulator.count("GET", "files") == 2


async def test_a_client_error_is_not_retried(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    emulator.fail_next(1, status=400)
    with pytest.raises(VolumeRequestFailed) as raised:
        await volume.get(KEY)
    assert raised.value.status == 400
    assert emulator.count("GET", "files") == 1


async def test_429_retry_after_is_honoured(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.throttle_next(1, retry_after=1, path_suffix=".json")
    started = time.monotonic()
    assert await volume.get(KEY) == entry
    assert time.monotonic() - started >= 1.0
    assert emulator.count("GET", "files", ".json") == 2


async def test_a_retry_after_past_the_budget_is_not_waited_for(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 2.0})
    emulator.throttle_next(1, retry_after=30)
    started = time.monotonic()
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert time.monotonic() - started < 1.0
    assert emulator.count("GET", "files") == 1


async def test_a_body_cut_short_is_retried_or_missed_never_served(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    entry = entry_for(audio())
    volume = make_volume()
    await volume.put(KEY, entry)

    # One cut: the retry reads the whole object.
    emulator.cut_next(1, path_suffix=".mp3")
    assert await volume.get(KEY) == entry

    # Cut every time: a miss for the user, and the stored entry is left alone.
    no_retries = make_volume(settings={"retries": 0})
    emulator.cut_next(1, path_suffix=".mp3")
    cache = TieredCache(None, no_retries, timeout_seconds=5.0, logger=logging.getLogger("test"))
    assert await cache.get(KEY) is None
    assert cache.errors["volume"] == 1
    assert emulator.read(OBJECT) == entry.body
    assert await cache.get(KEY) is not None

    # Streamed: the cut surfaces as an unavailable Volume, not as corruption.
    streamed = await volume.open(KEY)
    assert streamed is not None
    emulator.cut_next(1, path_suffix=".mp3")
    streamed_again = await volume.open(KEY)
    assert streamed_again is not None
    with pytest.raises(VolumeUnavailable):
        await collect(streamed_again)
    assert await collect(streamed) == entry.body
    assert emulator.read(SIDECAR) is not None


async def test_a_hang_raises_within_the_timeout(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 0.5})
    emulator.hang_next(1)
    started = time.monotonic()
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert time.monotonic() - started < 0.5 + 0.3

    emulator.hang_next(1, method="PUT")
    cache = TieredCache(None, volume, timeout_seconds=5.0, logger=logging.getLogger("test"))
    started = time.monotonic()
    cache.put(KEY, entry_for(audio()))
    await cache.drain()
    assert time.monotonic() - started < 0.5 + 0.3
    assert cache.errors["volume"] == 1


async def test_added_latency_stays_within_budget(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 1.0})
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.latency = 0.1
    assert await volume.get(KEY) == entry
    emulator.latency = 0.6  # two calls per get: the second runs out of budget
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)


# Breaker


async def test_breaker_opens_after_threshold_and_closes_after_cooldown(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    clock = FakeClock()
    volume = make_volume(
        clock=clock,
        settings={"retries": 0, "failure_threshold": 2, "cooldown_seconds": 30.0},
    )
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.fail_next(100, status=500)

    for _ in range(2):
        with pytest.raises(VolumeUnavailable):
            await volume.get(KEY)
    assert volume.breaker_state == "open"
    calls = len(emulator.requests)
    for _ in range(5):
        with pytest.raises(VolumeUnavailable, match="circuit breaker"):
            await volume.get(KEY)
    assert len(emulator.requests) == calls

    # After the cooldown a failing trial reopens it...
    clock.now += 30.0
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert volume.breaker_state == "open"
    assert len(emulator.requests) == calls + 1

    # ...and a succeeding one closes it.
    emulator.clear_faults()
    clock.now += 30.0
    assert await volume.get(KEY) == entry
    assert volume.breaker_state == "closed"


async def test_tiered_cache_keeps_answering_while_the_breaker_is_open(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"retries": 0, "failure_threshold": 1})
    emulator.fail_next(1, status=503)
    cache = TieredCache(None, volume, timeout_seconds=5.0, logger=logging.getLogger("test"))
    assert await cache.get(KEY) is None
    assert volume.breaker_state == "open"
    started = time.monotonic()
    for _ in range(20):
        assert await cache.get(KEY) is None
    assert time.monotonic() - started < 0.5
    assert cache.errors["volume"] == 21
    assert await volume.ping() is False


# Authentication


async def test_oauth_m2m_app_credentials(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(config_options={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    assert await volume.get(KEY) == entry
    (token,) = emulator.tokens_used(VOLUME)
    assert token in emulator.issued_tokens
    assert emulator.calls["POST /oidc/v1/token"] == 1


async def test_environment_credentials(
    emulator: FilesApiEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", emulator.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", PAT)
    volume = DatabricksVolume(settings())
    try:
        await volume.put(KEY, entry_for(audio()))
        assert await volume.ping() is True
    finally:
        await volume.aclose()
    assert emulator.tokens_used(VOLUME) == {PAT}


async def test_profile_credentials(
    emulator: FilesApiEmulator,
    make_volume: MakeVolume,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    profiles = tmp_path / "databrickscfg"
    profiles.write_text(f"[tts]\nhost = {emulator.url}\ntoken = {PAT}\n")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(profiles))
    volume = make_volume(host=None, config_options={"profile": "tts"})
    await volume.put(KEY, entry_for(audio()))
    assert emulator.tokens_used(VOLUME) == {PAT}


async def test_bad_app_configuration_is_unavailable_not_fatal(make_volume: MakeVolume) -> None:
    volume = make_volume(config_options={"client_id": CLIENT_ID, "client_secret": "wrong"})
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)


async def test_user_auth_uses_that_requests_token_only(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    emulator.add_token("tok-alice")
    emulator.add_token("tok-bob")
    volume = make_volume(settings={"auth": "user"})
    alice = KEY
    bob = CacheKey("bob@example.com", "t-1", "m-1", "af_nicole")
    alice_entry, bob_entry = entry_for(audio(seed="a")), entry_for(audio(seed="b"))

    async def store_and_read(key: CacheKey, entry: Entry) -> Entry | None:
        await volume.put(key, entry)
        streamed = await volume.open(key)
        assert streamed is not None
        assert await collect(streamed) == entry.body
        return await volume.get(key)

    got = await asyncio.gather(
        as_user("tok-alice", lambda: store_and_read(alice, alice_entry)),
        as_user("tok-bob", lambda: store_and_read(bob, bob_entry)),
    )
    assert got == [alice_entry, bob_entry]
    assert emulator.tokens_used(f"{BASE}/alice@example.com/") == {"tok-alice"}
    assert emulator.tokens_used(f"{BASE}/bob@example.com/") == {"tok-bob"}
    assert PAT not in emulator.tokens_used()
    assert emulator.calls["GET /.well-known/databricks-config"] == 0

    # No token: skipped, as a miss or a no-op, without a call.
    calls = len(emulator.requests)
    assert await as_user(None, lambda: volume.get(alice)) is None
    assert await as_user(None, lambda: volume.open(alice)) is None
    await as_user(None, lambda: volume.put(alice, bob_entry))
    await as_user(None, lambda: volume.delete(alice))
    assert len(emulator.requests) == calls


async def test_a_refused_user_token_does_not_open_the_breaker(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"auth": "user", "failure_threshold": 1})
    for _ in range(3):
        with pytest.raises(VolumeRequestFailed) as raised:
            await as_user("tok-revoked", lambda: volume.get(KEY))
        assert raised.value.status == 403
    assert volume.breaker_state == "closed"


async def test_no_token_reaches_logs_or_exceptions(
    emulator: FilesApiEmulator, make_volume: MakeVolume, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.add_token("tok-alice-secret")
    app = make_volume(
        config_options={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        settings={"timeout_seconds": 0.5, "retries": 1},
    )
    user = make_volume(settings={"auth": "user", "timeout_seconds": 0.5, "retries": 1})
    raised: list[BaseException] = []

    async def attempt(work: Callable[[], Awaitable[Any]]) -> None:
        try:
            result = await work()
            if isinstance(result, StreamedEntry):
                await collect(result)
        except Exception as exc:
            raised.append(exc)
        finally:
            emulator.clear_faults()

    def alice(work: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        return lambda: as_user("tok-alice-secret", work)

    entry = entry_for(audio())
    await attempt(lambda: app.put(KEY, entry))
    emulator.corrupt(OBJECT)
    await attempt(lambda: app.get(KEY))  # corrupt: a miss
    await attempt(lambda: app.put(KEY, entry))
    emulator.corrupt(OBJECT)
    await attempt(lambda: app.open(KEY))  # CorruptEntry
    emulator.fail_next(5, status=500)
    await attempt(lambda: app.get(KEY))  # retries run out
    emulator.hang_next(1)
    await attempt(lambda: app.get(KEY))  # timeout
    await attempt(alice(lambda: user.put(KEY, entry)))
    await attempt(alice(lambda: user.get(KEY)))
    emulator.cut_next(2, path_suffix=".mp3")
    await attempt(alice(lambda: user.get(KEY)))  # cut short twice
    await attempt(lambda: as_user("tok-not-valid-secret", lambda: user.get(KEY)))  # 403
    emulator.fail_next(5, status=503)
    await attempt(alice(lambda: user.open(KEY)))
    emulator.hang_next(1)
    await attempt(alice(lambda: user.delete(KEY)))

    kinds = [type(exc).__name__ for exc in raised]
    assert kinds.count("VolumeUnavailable") == 5
    assert kinds.count("CorruptEntry") == 1
    assert kinds.count("VolumeRequestFailed") == 1
    secrets = {PAT, CLIENT_SECRET, "tok-alice-secret", "tok-not-valid-secret"}
    secrets |= {token for token in emulator.issued_tokens}
    assert len(secrets) >= 5
    texts = [caplog.text]
    for exc in raised:
        chained: BaseException | None = exc
        while chained is not None:
            texts.extend([str(chained), repr(chained), repr(chained.args)])
            chained = chained.__cause__ or chained.__context__
    for text in texts:
        for secret in secrets:
            assert secret not in text
    # The raw ids are not in the messages either: only the key's digest is logged.
    assert KEY.user not in caplog.text
    assert KEY.digest() in caplog.text


# Listing, purge, readiness


async def test_list_entries_and_delete_prefix_walk_paged_listings(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    emulator.page_limit = 2
    volume = make_volume()
    keys = [
        CacheKey("alice", "t1", "m1", "af_nicole"),
        CacheKey("alice", "t1", "m1", "am_adam"),
        CacheKey("alice", "t1", "m2", "af_nicole"),
        CacheKey("alice", "t2", "m3", "af_nicole"),
        CacheKey("bob", "t1", "m1", "af_nicole"),
    ]
    for key in keys:
        await volume.put(key, entry_for(audio(seed=key.digest())))

    async def listed(*parts: str) -> set[CacheKey]:
        return {item.key async for item in volume.list_entries(*parts)}

    assert await listed() == set(keys)
    assert await listed("alice") == set(keys[:4])
    assert await listed("alice", "t1", "m1") == set(keys[:2])
    first = [item async for item in volume.list_entries("bob")]
    assert first[0].created_at is not None and first[0].created_at > 0

    assert await volume.delete_prefix("alice", "t1") == 3
    assert await listed("alice") == {keys[3]}
    assert await volume.get(keys[4]) is not None
    assert f"{BASE}/alice/t1" not in emulator.directories
    assert f"{BASE}/alice/t2" in emulator.directories
    assert await volume.delete_prefix("alice") == 1
    assert await volume.delete_prefix("nobody") == 0
    assert await listed() == {keys[4]}

    with pytest.raises(ValueError):
        await volume.delete_prefix("alice", None, "m1")
    with pytest.raises(ValueError):
        await volume.delete_prefix("../etc")


async def test_ping(emulator: FilesApiEmulator, make_volume: MakeVolume) -> None:
    assert await make_volume().ping() is True
    assert await make_volume(settings={"path": "/Volumes/main/default/missing"}).ping() is False
    assert await make_volume(config_options={"token": "dapi-wrong"}).ping() is False
    user = make_volume(settings={"auth": "user"})
    assert await user.ping() is True
    emulator.add_token("tok-alice")
    assert await as_user("tok-alice", user.ping) is True


@pytest.mark.parametrize(
    "overrides",
    [{"path": "var/volume"}, {"path": "/Volumes/main/default"}, {"prefix": "../x"}],
)
def test_bad_settings_are_refused(overrides: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        DatabricksVolume(settings(**overrides), host="https://example.invalid")


async def test_invalid_keys_are_refused(make_volume: MakeVolume) -> None:
    volume = make_volume()
    with pytest.raises(ValueError):
        await volume.get(CacheKey("../alice", "t", "m", "v"))
    with pytest.raises(ValueError):
        await volume.put(KEY, dataclasses.replace(entry_for(b"abc"), body=b"abd"))
