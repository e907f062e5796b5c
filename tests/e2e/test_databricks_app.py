"""The app as deployed: deploy/databricks/app.yaml's command, run as Databricks Apps runs it.

The legacy app is the FastAPI stand-in (tests/fakes/legacy_fastapi_app.py, its folder's
`app.py`), assembled with the proxy by deploy/databricks/bundle.py. The command is the
template's, parsed from app.yaml, started in the assembled folder without a shell, with the
environment the platform gives: DATABRICKS_APP_PORT (and PORT, UVICORN_PORT, ... naming it, as
the platform and `databricks apps run-local` set them), the workspace, and app.yaml's `env` with
each `valueFrom` resolved. Behind it: the Files API emulator with tens of milliseconds per call
and the workspace's concurrency limit, and the session's PostgreSQL as Lakebase.

Departures from the platform, each for the test's sake: the app authenticates with a token
(DATABRICKS_TOKEN) instead of client credentials, so that PostgreSQL can check that token as the
Lakebase password (a role with that password); PGSSLMODE is left unset (the test cluster has no
TLS; the platform sets `require`); `python` is this venv's (the platform's has the pins).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from multidict import CIMultiDict

from tests.conftest import ProxyProcess, clean_environment, free_port
from tests.fakes.files_api import FilesApiEmulator
from tests.fakes.legacy_fastapi_app import synthesize
from tests.pg import PASSWORD_ROLE, create_chat_messages, message_metadata, set_password_role

ROOT = Path(__file__).resolve().parents[2]
APP_YAML = ROOT / "deploy/databricks/app.yaml"
PRESET = ROOT / "deploy/databricks/tts-cache-proxy.toml"
STAND_IN = ROOT / "tests/fakes/legacy_fastapi_app.py"
VOLUME = "/Volumes/main/chat/tts"
PAT = "dapi-app-token"
# What app.yaml's valueFrom keys resolve to here: the Volume's path, the database's host.
RESOURCES = {"volume": VOLUME, "database": "127.0.0.1"}
# The workspace's Files API concurrency (about 10), and tens of milliseconds per call.
WORKSPACE_CONCURRENCY = 10
FILES_API_LATENCY = 0.03
# The preset's share: cache.volume.max_concurrent_calls.
CONFIGURED_CONCURRENCY = 8
PLATFORM_STOP_SECONDS = 15.0
ALICE = "alice@example.com"
BOB = "bob@example.com"
SYNTHESIZED = "legacy-app: synthesized"


def gateway(email: str) -> dict[str, str]:
    """What the Apps gateway sends with a signed-in user's request (user authorization on)."""
    name = email.split("@")[0]
    return {
        "X-Forwarded-Email": email,
        "X-Forwarded-User": f"{name}-id@example.com",
        "X-Forwarded-Preferred-Username": name,
        "X-Forwarded-Access-Token": f"obo-token-of-{name}",
        "X-Real-Ip": "203.0.113.7",
        "X-Request-Id": str(uuid.uuid4()),
    }


def app_yaml() -> dict[str, Any]:
    """deploy/databricks/app.yaml, parsed."""
    loaded: dict[str, Any] = yaml.safe_load(APP_YAML.read_text())
    return loaded


def rollback_command(path: Path) -> list[str]:
    """The legacy app alone: the commented command line under the active one."""
    for line in path.read_text().splitlines():
        if line.startswith("# command:"):
            command: list[str] = yaml.safe_load(line.lstrip("# "))["command"]
            return command
    raise AssertionError(f"no rollback line in {path}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's folder: the stand-in legacy app (app.py) behind the proxy, as make assembles it."""
    legacy = tmp_path_factory.mktemp("legacy")
    shutil.copyfile(STAND_IN, legacy / "app.py")
    (legacy / "requirements.txt").write_text("fastapi>=0.110\nuvicorn>=0.29\nasyncpg>=0.29\n")
    out = tmp_path_factory.mktemp("app") / "chat"
    script = str(ROOT / "deploy/databricks/bundle.py")
    result = subprocess.run(
        [sys.executable, script, "--legacy", str(legacy), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # No app.yaml of its own: the folder runs the template's command exactly.
    assert yaml.safe_load((out / "app.yaml").read_text())["command"] == app_yaml()["command"]
    assert "asyncpg==" in (out / "requirements.txt").read_text()
    return out


@dataclass
class Deployment:
    """The platform around one app: its port, environment, Files API and database."""

    folder: Path
    logs: Path
    emulator: FilesApiEmulator
    dsn: str
    env: dict[str, str]
    port: int
    started: list[ProxyProcess] = field(default_factory=list)

    async def start(self, command: list[str] | None = None) -> ProxyProcess:
        """Run app.yaml's command (or `command`) in the app's folder, no shell, as the platform."""
        argv = [
            part.replace("$DATABRICKS_APP_PORT", str(self.port))
            for part in (command or app_yaml()["command"])
        ]
        log_path = self.logs / f"app-{len(self.started)}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.folder,
                env=clean_environment(**self.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        app = ProxyProcess(process, self.port, log_path)
        self.started.append(app)
        return app

    async def ready(self, app: ProxyProcess, path: str = "/_proxy/ready") -> None:
        """Wait until `path` answers 200 (the proxy, its backend, Volume and index)."""
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert app.process.returncode is None, app.log()
                try:
                    async with session.get(f"{app.url}{path}") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        pytest.fail(f"{path} never answered 200\n{app.log()}")

    async def stop(self, app: ProxyProcess, within: float = PLATFORM_STOP_SECONDS) -> int:
        """SIGTERM, as the platform stops an app; the exit code."""
        app.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(app.process.wait(), timeout=within)
        except TimeoutError:
            pytest.fail(f"still running {within:g} s after SIGTERM\n{app.log()}")


@pytest.fixture
async def deployment(bundle: Path, tmp_path: Path, postgres_dsn: str) -> AsyncIterator[Deployment]:
    """The platform's side, fresh for each test; every process started is killed after it."""
    emulator = FilesApiEmulator(
        volumes=[VOLUME], tokens=[PAT], max_concurrent=WORKSPACE_CONCURRENCY
    )
    emulator.latency = FILES_API_LATENCY
    await emulator.start()
    # The legacy app's table, as it exists before the proxy arrives; the app's role may use it.
    await create_chat_messages(postgres_dsn)
    await set_password_role(postgres_dsn, PAT)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f"GRANT SELECT, INSERT, UPDATE ON chat_messages TO {PASSWORD_ROLE}")
        database = await admin.fetchval("SELECT current_database()")
        pg_port = await admin.fetchval("SELECT inet_server_port()")
    finally:
        await admin.close()
    port = free_port()
    resolved = {}
    for entry in app_yaml()["env"]:
        resolved[entry["name"]] = (
            entry["value"] if "value" in entry else RESOURCES[entry["valueFrom"]]
        )
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # The platform's defaults: the app's port, under every name frameworks read it by.
        "DATABRICKS_APP_PORT": str(port),
        "DATABRICKS_APP_NAME": "chat",
        "PORT": str(port),
        "UVICORN_PORT": str(port),
        "UVICORN_HOST": "0.0.0.0",
        "FLASK_RUN_PORT": str(port),
        # Not the platform's: a test's servers listen on loopback only (the platform's 0.0.0.0
        # default gives way to an explicit setting, as an operator's would).
        "TTS_PROXY_SERVER_HOST": "127.0.0.1",
        "DATABRICKS_HOST": emulator.url,
        "DATABRICKS_TOKEN": PAT,
        "DATABRICKS_CONFIG_FILE": str(tmp_path / "no-databrickscfg"),
        # The database resource's variables.
        "PGPORT": str(pg_port),
        "PGDATABASE": str(database),
        "PGUSER": PASSWORD_ROLE,
        **resolved,
    }
    deployed = Deployment(bundle, tmp_path, emulator, postgres_dsn, env, port)
    try:
        yield deployed
    finally:
        for app in deployed.started:
            await app.stop()
        await emulator.stop()


async def speak(
    session: aiohttp.ClientSession, app: ProxyProcess, email: str, message: str, text: str
) -> tuple[int, CIMultiDict[str], bytes]:
    """A speak call for `message` of thread t-1, as the Flutter client sends it."""
    body = {
        "text": text,
        "voice": "af_nicole",
        "provider": "replicate",
        "message_id": message,
        "thread_id": "t-1",
        "save_to_volume": True,
    }
    async with session.post(f"{app.url}/api/tts/speak", json=body, headers=gateway(email)) as r:
        return r.status, r.headers.copy(), await r.read()


async def post_message(session: aiohttp.ClientSession, app: ProxyProcess, text: str) -> str:
    """Alice writes a message in thread t-1, through the proxy; its id."""
    body = {"thread_id": "t-1", "content": text}
    async with session.post(
        f"{app.url}/api/chat/messages", json=body, headers=gateway(ALICE)
    ) as response:
        assert response.status == 200, await response.text()
        message_id: str = (await response.json())["message_id"]
        return message_id


def object_path(email: str, message: str) -> str:
    return f"{VOLUME}/tts_audio/{email}/t-1/{message}/af_nicole.mp3"


async def eventually(check: Any, within: float = 10.0) -> None:
    """Poll `check` (a function, or a coroutine function) until it answers true."""
    deadline = time.monotonic() + within
    while True:
        answer = check()
        if asyncio.iscoroutine(answer):
            answer = await answer
        if answer:
            return
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.05)


async def tts_cache(dsn: str, message: str) -> dict[str, Any] | None:
    """chat_messages.metadata.tts_cache of `message`."""
    metadata = await message_metadata(dsn, message)
    return None if metadata is None else metadata.get("tts_cache")


async def test_speech_is_cached_in_memory_then_on_the_volume_across_a_restart(
    deployment: Deployment,
) -> None:
    app = await deployment.start()
    await deployment.ready(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{app.url}/health", headers=gateway(ALICE)) as response:
            assert response.status == 200 and (await response.json())["status"] == "healthy"
        async with session.get(f"{app.url}/", headers=gateway(ALICE)) as response:
            assert response.status == 200 and "<h1>Chat</h1>" in await response.text()
        async with session.get(f"{app.url}/api/me", headers=gateway(ALICE)) as response:
            seen = await response.json()
        # The preset believes the gateway: the legacy app gets the user and the token.
        assert (seen["email"], seen["has_token"], seen["real_ip"]) == (ALICE, True, "203.0.113.7")

        text = "Hello there, this is a message read aloud."
        message = await post_message(session, app, text)
        status, headers, audio = await speak(session, app, ALICE, message, text)
        assert (status, headers["X-TTS-Cache"], headers["Content-Type"]) == (
            200,
            "miss",
            "audio/mpeg",
        )
        assert headers["X-TTS-Provider"] == "replicate"
        assert audio == synthesize(text, "af_nicole")
        status, headers, again = await speak(session, app, ALICE, message, text)
        assert (status, headers["X-TTS-Cache"], headers["X-TTS-Cache-Tier"]) == (
            200,
            "hit",
            "memory",
        )
        assert again == audio

        # Many messages at once: the Volume's writes stay within the configured concurrency.
        others = [f"m-{index}" for index in range(24)]
        admin = await asyncpg.connect(deployment.dsn)
        try:
            await admin.executemany(
                "INSERT INTO chat_messages (message_id, user_id, thread_id, content)"
                " VALUES ($1, $2, 't-1', $1)",
                [(other, ALICE) for other in others],
            )
        finally:
            await admin.close()
        burst = await asyncio.gather(*(speak(session, app, ALICE, m, m) for m in others))
        assert {(status, headers["X-TTS-Cache"]) for status, headers, _ in burst} == {(200, "miss")}

    # Stored under the configured Volume, and in the owner's chat_messages row.
    stored = object_path(ALICE, message)
    await eventually(lambda: deployment.emulator.read(stored) == audio)
    await eventually(lambda: all(deployment.emulator.read(object_path(ALICE, m)) for m in others))
    assert all(path.startswith(f"{VOLUME}/tts_audio/") for path in deployment.emulator.files)
    await eventually(lambda: tts_cache(deployment.dsn, message))
    cached = await tts_cache(deployment.dsn, message) or {}
    assert (cached["volume_path"], cached["voice"], cached["provider"]) == (
        stored,
        "af_nicole",
        "replicate",
    )
    assert await deployment.stop(app) == 0, app.log()
    assert app.log().count(SYNTHESIZED) == 1 + len(others), app.log()

    # The whole command again: the memory is gone, the Volume answers.
    app = await deployment.start()
    await deployment.ready(app)
    async with aiohttp.ClientSession() as session:
        status, headers, again = await speak(session, app, ALICE, message, text)
        assert (status, headers["X-TTS-Cache"], headers["X-TTS-Cache-Tier"]) == (
            200,
            "hit",
            "volume",
        )
        assert again == audio
        burst = await asyncio.gather(*(speak(session, app, ALICE, m, m) for m in others))
    # A lookup waits for a Files API slot within its budget only (lookup_budget_ms): in a
    # burst past the per-second share some become misses, answered and not synthesized twice.
    outcomes = [(h["X-TTS-Cache"], h.get("X-TTS-Cache-Tier")) for _, h, _ in burst]
    assert set(outcomes) <= {("hit", "volume"), ("miss", None)}
    assert outcomes.count(("hit", "volume")) >= len(others) // 2, outcomes
    assert [body for _, _, body in burst] == [synthesize(m, "af_nicole") for m in others]
    assert app.log().count(SYNTHESIZED) == outcomes.count(("miss", None)), app.log()

    # The workspace's Files API saw at most the preset's share at once, and never refused.
    assert 0 < deployment.emulator.max_in_flight <= CONFIGURED_CONCURRENCY
    assert deployment.emulator.over_limit == 0
    assert not [r for r in deployment.emulator.requests if r.status == 429]


async def test_another_user_gets_no_cached_audio_and_no_metadata_is_theirs(
    deployment: Deployment,
) -> None:
    app = await deployment.start()
    await deployment.ready(app)
    text = "Only Alice's message."
    async with aiohttp.ClientSession() as session:
        message = await post_message(session, app, text)
        status, headers, audio = await speak(session, app, ALICE, message, text)
        assert (status, headers["X-TTS-Cache"]) == (200, "miss")
        await eventually(lambda: deployment.emulator.read(object_path(ALICE, message)) == audio)
        await eventually(lambda: app.log().count(SYNTHESIZED) == 1)
        await eventually(lambda: tts_cache(deployment.dsn, message))
        written = await tts_cache(deployment.dsn, message)

        # Bob names Alice's message: chat_messages says it is not his (verify_ownership).
        status, headers, bobs = await speak(session, app, BOB, message, text)
        assert (status, headers["X-TTS-Cache"]) == (200, "disabled")
        assert "X-TTS-Cache-Tier" not in headers
        audio_url = f"{app.url}/_proxy/audio/t-1/{message}/af_nicole"
        async with session.get(audio_url, headers=gateway(BOB)) as response:
            assert response.status == 404
        async with session.get(audio_url, headers=gateway(ALICE)) as response:
            assert response.status == 200 and await response.read() == audio
    # Bob's audio came from the legacy app, which cached nothing itself (no DATABRICKS_VOLUME
    # behind the proxy): no object of Bob's, and the metadata is still Alice's, written once.
    assert bobs == audio and app.log().count(SYNTHESIZED) == 2
    assert not [path for path in deployment.emulator.files if BOB in path]
    assert await tts_cache(deployment.dsn, message) == written
    assert written is not None and written["volume_path"] == object_path(ALICE, message)


async def test_sigterm_with_a_stream_open_stops_within_the_platform_bound(
    deployment: Deployment,
) -> None:
    app = await deployment.start()
    await deployment.ready(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{app.url}/api/chat/stream", headers=gateway(ALICE)) as stream:
            assert stream.status == 200
            assert (await stream.content.readline()).startswith(b"data: tick")
            stopped_at = time.monotonic()
            code = await deployment.stop(app)
            elapsed = time.monotonic() - stopped_at

    assert code == 0, app.log()
    assert elapsed < PLATFORM_STOP_SECONDS, app.log()
    assert "legacy-app: stopped" in app.log()  # the legacy app's own shutdown ran


async def test_a_dead_legacy_app_stops_the_command_non_zero(deployment: Deployment) -> None:
    app = await deployment.start()
    await deployment.ready(app)
    children = await asyncio.to_thread(
        lambda: Path(f"/proc/{app.pid}/task/{app.pid}/children").read_text().split()
    )
    assert len(children) == 1, children  # the legacy app, started by the proxy

    os.kill(int(children[0]), signal.SIGKILL)
    code = await asyncio.wait_for(app.process.wait(), timeout=10)

    assert code != 0
    lines = [line for line in app.log().splitlines() if "exited on its own" in line]
    assert len(lines) == 1, app.log()
    assert "uvicorn app:app" in lines[0]


async def test_the_rollback_line_runs_the_legacy_app_alone_on_what_the_proxy_cached(
    deployment: Deployment,
) -> None:
    app = await deployment.start()
    await deployment.ready(app)
    text = "Cached by the proxy, then by the legacy app itself."
    async with aiohttp.ClientSession() as session:
        cached_by_proxy = await post_message(session, app, text)
        status, _, audio = await speak(session, app, ALICE, cached_by_proxy, text)
        assert status == 200
        await eventually(lambda: tts_cache(deployment.dsn, cached_by_proxy))
    assert await deployment.stop(app) == 0

    legacy = await deployment.start(rollback_command(deployment.folder / "app.yaml"))
    await deployment.ready(legacy, "/health")
    async with aiohttp.ClientSession() as session:
        # The legacy app alone, on the platform's port: chat_messages.metadata.tts_cache, as
        # the proxy wrote it, leads it to the proxy's object.
        status, headers, again = await speak(session, legacy, ALICE, cached_by_proxy, text)
        assert (status, headers["X-TTS-Cache"], again) == (200, "hit", audio)
        # Its own Volume cache is on again.
        message = await post_message(session, legacy, text)
        first = await speak(session, legacy, ALICE, message, text)
        second = await speak(session, legacy, ALICE, message, text)
    assert [(status, h["X-TTS-Cache"]) for status, h, _ in (first, second)] == [
        (200, "miss"),
        (200, "hit"),
    ]
    assert first[2] == second[2] == synthesize(text, "af_nicole")
    legacy_path = f"{VOLUME}/tts_audio/{ALICE}/t-1/{message}.mp3"
    assert deployment.emulator.read(legacy_path) == first[2]
    assert legacy.log().count(SYNTHESIZED) == 1
