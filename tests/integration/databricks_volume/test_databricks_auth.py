"""Files API credentials: the app's (PAT, OAuth M2M, environment, profile), the user's token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.speak import CacheKey
from proxy.storage.databricks import auth
from proxy.storage.databricks.files_api import VolumeRequestFailed, VolumeUnavailable
from proxy.storage.databricks.streamed import StreamedEntry
from proxy.storage.databricks.volume import DatabricksVolume
from proxy.storage.entry import Entry
from tests.conftest import free_port
from tests.databricks_volume_support import (
    BASE,
    CLIENT_ID,
    CLIENT_SECRET,
    KEY,
    OBJECT,
    PAT,
    VOLUME,
    MakeVolume,
    as_user,
    audio,
    collect,
    entry_for,
    settings,
)
from tests.fakes.files_api import FilesApiEmulator

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


async def test_an_unreachable_workspace_keeps_no_thread_busy_for_long(
    make_volume: MakeVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    # databricks-sdk retries an unreachable host for 300 s by default, and a process waits for
    # its threads on exit: the proxy bounds the SDK's retries (SDK_RETRY_SECONDS, 2 s here).
    monkeypatch.setattr(auth, "SDK_RETRY_SECONDS", 2)
    volume = make_volume(host=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)  # its lookup budget runs out while the configuration is built
    build = volume._credentials._config_build
    assert build is not None
    started = asyncio.get_running_loop().time()
    await asyncio.wait({build}, timeout=30)
    assert build.done()
    assert asyncio.get_running_loop().time() - started < 15


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
        # Every hit streamed: a corrupt one then raises CorruptEntry as it ends.
        settings={"timeout_seconds": 0.5, "retries": 1, "verify_max_bytes": 0},
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
