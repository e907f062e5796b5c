"""The Lakebase password on real parts: databricks-sdk's OAuth M2M against the Files API
emulator's token endpoint, each token made the role's password in a real PostgreSQL, valid
until the token expires, as Lakebase checks it at login."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.app import create_app
from proxy.index.entries import PostgresIndex
from proxy.index.lakebase import lakebase_password
from proxy.index.rotating_password import RotatingPassword
from proxy.state import INDEX
from tests.conftest import settings_for
from tests.databricks_volume_support import (  # noqa: F401 - the SDK sees only what we set
    _no_ambient_databricks_config,
)
from tests.fakes import FakeLegacyBackend
from tests.fakes.files_api import FilesApiEmulator
from tests.index_support import eventually, rows
from tests.pg import PASSWORD_ROLE, PostgresServer, set_password_role
from tests.support import ALICE, SPEAK, settle
from tests.support import speak_body as body

CLIENT_ID = "app-client-id"
CLIENT_SECRET = "app-client-secret"


@dataclass
class TokenIssuer:
    """The emulator's token endpoint wired to the role: each new token becomes its password."""

    emulator: FilesApiEmulator
    dsn: str
    delay: float = 0.0
    issued: list[str] = field(default_factory=list)
    # When each token became the role's password (epoch seconds).
    issued_at: list[float] = field(default_factory=list)
    # Held while a probe checks a login, so that the password does not change under it.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    role_dsn: str = ""

    async def issue(self, token: str, lifetime: int) -> None:
        await asyncio.sleep(self.delay)  # a slow token endpoint
        async with self.lock:
            self.role_dsn = await set_password_role(self.dsn, token, time.time() + lifetime)
            self.issued.append(token)
            self.issued_at.append(time.time())

    def refuse(self) -> None:
        """The token endpoint answers 401 invalid_client from now on."""
        self.emulator.clients.clear()

    def accept(self) -> None:
        self.emulator.clients[CLIENT_ID] = CLIENT_SECRET


@pytest.fixture
async def issuer(
    postgres_server: PostgresServer, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TokenIssuer]:
    if not postgres_server.owned:
        pytest.skip("password checks need the cluster this session configured")
    emulator = FilesApiEmulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime_seconds=4)
    await emulator.start()
    issuer = TokenIssuer(emulator, postgres_dsn)
    emulator.on_token_issued = issuer.issue
    # What a Databricks App's environment holds for its service principal.
    monkeypatch.setenv("DATABRICKS_HOST", emulator.url)
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)
    # The role exists (with a password nobody has) before the first token arrives.
    issuer.role_dsn = await set_password_role(postgres_dsn, "not-a-token")
    try:
        yield issuer
    finally:
        await emulator.stop()
        await set_password_role(postgres_dsn, "not-a-token")


async def until_async(read: Any, expected: Any, within: float) -> None:
    """Poll the coroutine function `read` until it returns `expected`, for `within` seconds."""
    seen = None
    for _ in range(int(within / 0.1)):
        seen = await read()
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    assert seen == expected


async def backend_started(index: PostgresIndex) -> float:
    """When the server session answering this call logged in (epoch seconds)."""
    sql = "SELECT extract(epoch FROM backend_start)::float8 FROM pg_stat_activity"
    sql += " WHERE pid = pg_backend_pid()"
    started = await index.pool.run("probe", lambda con: con.fetchval(sql))
    return float(started)


async def test_the_token_is_refreshed_before_it_expires_and_new_logins_use_it(
    issuer: TokenIssuer,
) -> None:
    issuer.emulator.token_lifetime_seconds = 5
    issuer.delay = 0.8  # every refresh is in flight for most of a second
    token = lakebase_password()
    index = PostgresIndex(
        issuer.role_dsn, token=token, timeout_seconds=2.0, idle_connection_seconds=0.1
    )
    await index.start()
    try:
        assert index.available
        logins: list[float] = []
        slowest = 0.0
        during_fetch = 0
        deadline = time.monotonic() + 10.0  # two token lives
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)  # past idle_connection_seconds: a new login each time
            fetching = issuer.emulator.calls["POST /oidc/v1/token"] > len(issuer.issued)
            async with issuer.lock:
                if token() != issuer.issued[-1]:
                    continue  # issued, not yet received: the role has only the newest password
                started = time.monotonic()
                login = await backend_started(index)
                slowest = max(slowest, time.monotonic() - started)
                during_fetch += fetching
                logins.append(login)
    finally:
        await index.aclose()

    assert token.failures == 0
    assert len(issuer.issued) >= 3  # the first token and a refresh every half life
    # Each token opened new sessions while it was the role's only password, which PostgreSQL
    # refuses once it expires: a token was never needed past its life.
    periods = list(zip(issuer.issued_at, issuer.issued_at[1:], strict=False))
    assert all(any(start <= login < end for login in logins) for start, end in periods)
    # A login never waited for a token fetch, though fetches were in flight around them.
    assert during_fetch >= 1
    assert slowest < issuer.delay
    # The setup is real: a rotated-out token no longer logs in.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(issuer.role_dsn, password=issuer.issued[0])


async def test_a_refresh_failure_is_counted_the_proxy_serves_and_recovers(
    issuer: TokenIssuer,
    postgres_dsn: str,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy")
    settings = settings_for(
        tmp_path,
        legacy_backend.url,
        **{
            "index.dsn": issuer.role_dsn,
            "index.password_from": "databricks",
            "index.timeout_seconds": 1.0,
        },
    )
    client = await aiohttp_client(create_app(settings))
    index = client.app[INDEX]
    token = index.pool.token
    assert isinstance(token, RotatingPassword)
    assert index.available
    assert await speak(client, "m-1") == (200, "miss")
    await settle(client.app)
    assert await recorded(postgres_dsn) == ["m-1"]

    issuer.refuse()
    await until(lambda: token.failures > 0)
    await until(lambda: not token.valid)
    metrics = await scrape(client)
    assert metrics["tts_proxy_index_token_refresh_failures_total"] >= 1
    assert metrics["tts_proxy_index_token_valid_seconds"] == 0
    # Open sessions would still work (the token is checked at login); Lakebase drops them.
    await terminate_sessions(postgres_dsn)

    index_errors = metrics['tts_proxy_errors_total{kind="index"}']
    legacy_calls = legacy_backend.calls[SPEAK]
    assert await speak(client, "m-2") == (200, "miss")
    assert await speak(client, "m-2") == (200, "hit")
    assert await speak(client, "m-1") == (200, "hit")
    assert legacy_backend.calls[SPEAK] == legacy_calls + 1
    await settle(client.app)
    metrics = await scrape(client)
    assert metrics["tts_proxy_index_available"] == 0
    assert metrics['tts_proxy_errors_total{kind="index"}'] > index_errors
    assert metrics['tts_proxy_errors_total{kind="index_token"}'] == token.failures

    issuer.accept()
    await until(lambda: index.available, within=30)
    assert await speak(client, "m-3") == (200, "miss")
    await settle(client.app)
    assert "m-3" in await recorded(postgres_dsn)

    # The row the outage kept back (m-2's) is written by the recorder's next retry.
    async def all_recorded() -> bool:
        return await recorded(postgres_dsn) == ["m-1", "m-2", "m-3"]

    await eventually(all_recorded)
    assert (await scrape(client))["tts_proxy_index_available"] == 1

    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "database token refreshed again" in m]) == 1
    assert len([m for m in messages if "index available again" in m]) == 1
    warned = [m for m in messages if "database token refresh failed (" in m]
    # One line when it starts failing, one when the token runs out; the retries in between
    # (after one second, then two, then four) go to debug.
    assert 1 <= len(warned) <= 2
    assert token.failures >= 2
    assert "invalid_client" in warned[0]
    for issued in issuer.issued:
        assert issued not in caplog.text


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    async def holds() -> bool:
        return check()

    await eventually(holds, within)


async def speak(client: Any, message_id: str) -> tuple[int, str]:
    async with client.post(SPEAK, json=body(message_id=message_id), headers=ALICE) as response:
        audio = await response.read()
        assert audio == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
        return response.status, response.headers["X-TTS-Cache"]


async def recorded(dsn: str) -> list[str]:
    found = await rows(dsn, "SELECT message_id FROM tts_cache.tts_cache_entries ORDER BY 1")
    return [row["message_id"] for row in found]


async def terminate_sessions(dsn: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            PASSWORD_ROLE,
        )
    finally:
        await con.close()


_SAMPLE = re.compile(r"^(\S+) (\S+)$")


async def scrape(client: Any) -> dict[str, float]:
    async with client.get("/_proxy/metrics") as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples
