"""The Files API emulator is faithful: the real databricks-sdk works against it unchanged."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.config import Config
from databricks.sdk.errors import (
    AlreadyExists,
    BadRequest,
    NotFound,
    PermissionDenied,
)

from tests.databricks_volume_support import (  # noqa: F401 - autouse: no ambient config
    _no_ambient_databricks_config,
)
from tests.fakes.files_api import FilesApiEmulator

PAT = "dapi-app-token"
VOLUME = "/Volumes/main/default/tts"


@pytest.fixture
async def emulator() -> AsyncIterator[FilesApiEmulator]:
    """A started emulator, stopped after the test."""
    server = FilesApiEmulator()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def sdk_client(**options: Any) -> WorkspaceClient:
    """A WorkspaceClient built in a thread: its constructor calls the emulator synchronously."""
    return await asyncio.to_thread(lambda: WorkspaceClient(**options))


async def in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one blocking SDK call off the event loop that serves the emulator."""
    return await asyncio.to_thread(function, *args, **kwargs)


def _download(client: WorkspaceClient, path: str) -> bytes:
    response = client.files.download(path)
    assert response.contents is not None
    with response.contents as stream:
        data: bytes = stream.read()
    return data


async def test_pat_upload_metadata_download_delete(emulator: FilesApiEmulator) -> None:
    client = await sdk_client(host=emulator.url, token=PAT)
    path = f"{VOLUME}/dir/a@b+c.mp3"
    payload = bytes(range(256)) * 300

    await in_thread(client.files.create_directory, f"{VOLUME}/dir")
    await in_thread(client.files.upload, path, io.BytesIO(payload), overwrite=True)
    assert emulator.read(path) == payload

    meta = await in_thread(client.files.get_metadata, path)
    assert meta.content_length == len(payload)
    assert meta.content_type == "application/octet-stream"
    assert meta.last_modified

    # The SDK's default download asks for a presigned URL first.
    assert await in_thread(_download, client, path) == payload
    assert emulator.count("POST", "download-url") == 1
    assert emulator.count("GET", "presigned") == 1

    plain_config = await in_thread(
        Config, host=emulator.url, token=PAT, disable_experimental_files_api_client=True
    )
    plain = await sdk_client(config=plain_config)
    assert await in_thread(_download, plain, path) == payload
    assert emulator.count("GET", "files", path) == 1

    await in_thread(client.files.delete, path)
    assert emulator.read(path) is None
    with pytest.raises(NotFound):
        await in_thread(client.files.get_metadata, path)
    # Every Files API call carried the PAT, and the workspace id the host metadata advertised.
    assert emulator.tokens_used(VOLUME) == {PAT}
    assert {r.workspace_id for r in emulator.requests if r.endpoint == "files"} == {
        emulator.workspace_id
    }


async def test_upload_without_overwrite_conflicts(emulator: FilesApiEmulator) -> None:
    client = await sdk_client(host=emulator.url, token=PAT)
    path = f"{VOLUME}/once.bin"
    await in_thread(client.files.upload, path, io.BytesIO(b"first"), overwrite=False)
    with pytest.raises(AlreadyExists):
        await in_thread(client.files.upload, path, io.BytesIO(b"second"), overwrite=False)
    assert emulator.read(path) == b"first"
    # overwrite unspecified means overwrite.
    await in_thread(client.files.upload, path, io.BytesIO(b"third"))
    assert emulator.read(path) == b"third"


async def test_missing_paths_are_not_found(emulator: FilesApiEmulator) -> None:
    client = await sdk_client(host=emulator.url, token=PAT)
    missing = f"{VOLUME}/nope/missing.mp3"
    for call in (client.files.get_metadata, client.files.delete):
        with pytest.raises(NotFound):
            await in_thread(call, missing)
    with pytest.raises(NotFound):
        await in_thread(_download, client, missing)
    with pytest.raises(NotFound):
        await in_thread(lambda: list(client.files.list_directory_contents(f"{VOLUME}/nope")))
    with pytest.raises(NotFound):
        await in_thread(client.files.get_directory_metadata, f"{VOLUME}/nope")

    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{emulator.url}/api/2.0/fs/files{missing}",
            headers={"Authorization": f"Bearer {PAT}"},
        ) as response,
    ):
        assert response.status == 404
        body = await response.json()
    assert body["error_code"] == "NOT_FOUND"
    assert isinstance(body["message"], str)


async def test_listing_is_paged(emulator: FilesApiEmulator) -> None:
    emulator.page_limit = 2
    client = await sdk_client(host=emulator.url, token=PAT)
    for index in range(5):
        emulator.write(f"{VOLUME}/list/f{index}.mp3", b"x" * (index + 1))
    await in_thread(client.files.create_directory, f"{VOLUME}/list/sub")

    entries = await in_thread(lambda: list(client.files.list_directory_contents(f"{VOLUME}/list")))

    assert [e.name for e in entries] == ["f0.mp3", "f1.mp3", "f2.mp3", "f3.mp3", "f4.mp3", "sub"]
    assert [e.file_size for e in entries[:5]] == [1, 2, 3, 4, 5]
    assert entries[5].is_directory and not entries[0].is_directory
    assert entries[0].path == f"{VOLUME}/list/f0.mp3"
    assert isinstance(entries[0].last_modified, int)
    assert emulator.count("GET", "directories") == 3

    # An empty directory lists as nothing (its body is `{}`).
    assert (
        await in_thread(lambda: list(client.files.list_directory_contents(f"{VOLUME}/list/sub")))
        == []
    )


async def test_directory_delete_needs_an_empty_directory(emulator: FilesApiEmulator) -> None:
    client = await sdk_client(host=emulator.url, token=PAT)
    emulator.write(f"{VOLUME}/d/e/file.bin", b"1")
    with pytest.raises(BadRequest) as raised:
        await in_thread(client.files.delete_directory, f"{VOLUME}/d/e")
    assert "not empty" in str(raised.value)

    await in_thread(client.files.delete, f"{VOLUME}/d/e/file.bin")
    await in_thread(client.files.delete_directory, f"{VOLUME}/d/e")
    await in_thread(client.files.get_directory_metadata, f"{VOLUME}/d")
    with pytest.raises(NotFound):
        await in_thread(client.files.get_directory_metadata, f"{VOLUME}/d/e")
    # create_directory is idempotent and creates parents.
    await in_thread(client.files.create_directory, f"{VOLUME}/x/y/z")
    await in_thread(client.files.create_directory, f"{VOLUME}/x/y/z")
    await in_thread(client.files.get_directory_metadata, f"{VOLUME}/x/y")


async def test_oauth_m2m_through_host_metadata(emulator: FilesApiEmulator) -> None:
    client = await sdk_client(
        host=emulator.url, client_id="app-client-id", client_secret="app-client-secret"
    )
    path = f"{VOLUME}/m2m.bin"
    await in_thread(client.files.upload, path, io.BytesIO(b"machine"), overwrite=True)
    assert await in_thread(_download, client, path) == b"machine"

    used = emulator.tokens_used(VOLUME)
    assert len(used) == 1
    (token,) = used
    assert token in emulator.issued_tokens
    assert emulator.calls["GET /.well-known/databricks-config"] >= 1
    assert emulator.calls["GET /oidc/.well-known/oauth-authorization-server"] >= 1
    assert emulator.calls["POST /oidc/v1/token"] == 1


async def test_oauth_m2m_with_a_wrong_secret_fails(emulator: FilesApiEmulator) -> None:
    with pytest.raises(ValueError):
        client = await sdk_client(host=emulator.url, client_id="app-client-id", client_secret="x")
        await in_thread(client.files.get_metadata, f"{VOLUME}/any")
    assert emulator.tokens_used(VOLUME) <= {None}


async def test_environment_configures_the_sdk(
    emulator: FilesApiEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", emulator.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", PAT)
    emulator.write(f"{VOLUME}/env.bin", b"env")
    client = await sdk_client()
    meta = await in_thread(client.files.get_metadata, f"{VOLUME}/env.bin")
    assert meta.content_length == 3


async def test_tokens_are_checked(emulator: FilesApiEmulator) -> None:
    emulator.write(f"{VOLUME}/t.bin", b"t")
    client = await sdk_client(host=emulator.url, token="dapi-wrong")
    # HEAD answers carry no body: the status alone says it.
    with pytest.raises(PermissionDenied):
        await in_thread(client.files.get_metadata, f"{VOLUME}/t.bin")
    with pytest.raises(PermissionDenied) as raised:
        await in_thread(lambda: list(client.files.list_directory_contents(VOLUME)))
    assert raised.value.error_code == "PERMISSION_DENIED"
    assert str(raised.value).startswith("Invalid access token.")

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{emulator.url}/api/2.0/fs/files{VOLUME}/t.bin") as response:
            assert response.status == 401
            assert (await response.json())["error_code"] == "UNAUTHENTICATED"
        emulator.add_token("user-token")
        async with session.get(
            f"{emulator.url}/api/2.0/fs/files{VOLUME}/t.bin",
            headers={"Authorization": "Bearer user-token"},
        ) as response:
            assert response.status == 200
    assert emulator.tokens_used(f"{VOLUME}/t.bin") == {"dapi-wrong", None, "user-token"}


async def test_range_head_and_headers(emulator: FilesApiEmulator) -> None:
    payload = bytes(range(100))
    emulator.write(f"{VOLUME}/r.bin", payload)
    url = f"{emulator.url}/api/2.0/fs/files{VOLUME}/r.bin"
    auth = {"Authorization": f"Bearer {PAT}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.get(url, headers={"Range": "bytes=10-19"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == "bytes 10-19/100"
            assert response.headers["Content-Length"] == "10"
            assert await response.read() == payload[10:20]
        async with session.get(url, headers={"Range": "bytes=-5"}) as response:
            assert response.status == 206
            assert await response.read() == payload[95:]
        async with session.get(url, headers={"Range": "bytes=90-"}) as response:
            assert response.headers["Content-Range"] == "bytes 90-99/100"
        async with session.get(url, headers={"Range": "bytes=100-"}) as response:
            assert response.status == 416
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "100"
            assert "GMT" in response.headers["Last-Modified"]
            assert await response.read() == payload
        async with session.head(url) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "100"
            assert await response.read() == b""
        # The Databricks CLI escapes "/" too; the emulator decodes either spelling.
        escaped = url.replace(
            f"files{VOLUME}/r.bin", "files/Volumes%2Fmain%2Fdefault%2Ftts%2Fr.bin"
        )
        async with session.get(escaped) as response:
            assert await response.read() == payload


async def test_sdk_honours_retry_after(emulator: FilesApiEmulator) -> None:
    emulator.write(f"{VOLUME}/slow.bin", b"s")
    client = await sdk_client(host=emulator.url, token=PAT)
    emulator.throttle_next(1, retry_after=1)
    started = time.monotonic()
    meta = await in_thread(client.files.get_metadata, f"{VOLUME}/slow.bin")
    assert meta.content_length == 1
    assert time.monotonic() - started >= 0.9
    assert emulator.count("HEAD", "files") == 2


async def test_injected_faults(emulator: FilesApiEmulator) -> None:
    payload = b"0123456789" * 10_000
    emulator.write(f"{VOLUME}/f.bin", payload)
    url = f"{emulator.url}/api/2.0/fs/files{VOLUME}/f.bin"
    auth = {"Authorization": f"Bearer {PAT}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        emulator.fail_next(2, status=503)
        for _ in range(2):
            async with session.get(url) as response:
                assert response.status == 503
                assert (await response.json())["error_code"] == "TEMPORARILY_UNAVAILABLE"
        async with session.get(url) as response:
            assert response.status == 200

        emulator.throttle_next(1, retry_after=7)
        async with session.get(url) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "7"

        emulator.cut_next(1)
        async with session.get(url) as response:
            assert response.headers["Content-Length"] == str(len(payload))
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()

        emulator.hang_next(1)
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=0.3)):
                pass

        emulator.latency = 0.2
        started = time.monotonic()
        async with session.head(url) as response:
            assert response.status == 200
        assert time.monotonic() - started >= 0.2
        emulator.clear_faults()

    emulator.corrupt(f"{VOLUME}/f.bin")
    corrupted = emulator.read(f"{VOLUME}/f.bin")
    assert corrupted is not None and len(corrupted) == len(payload) and corrupted != payload


async def test_calls_past_the_concurrency_limit_are_throttled() -> None:
    server = FilesApiEmulator(max_concurrent=3)
    await server.start()
    server.latency = 0.2
    url = f"{server.url}/api/2.0/fs/files{VOLUME}/missing.bin"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {PAT}"}) as session:

            async def head() -> tuple[int, str | None]:
                async with session.head(url) as response:
                    return response.status, response.headers.get("Retry-After")

            answers = await asyncio.gather(*(head() for _ in range(5)))
    finally:
        await server.stop()

    assert sorted(answers, key=str) == [(404, None)] * 3 + [(429, "1")] * 2
    assert (server.max_in_flight, server.over_limit) == (3, 2)


async def test_calls_past_the_rate_limit_are_throttled() -> None:
    server = FilesApiEmulator(max_per_second=4)
    await server.start()
    url = f"{server.url}/api/2.0/fs/files{VOLUME}/missing.bin"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {PAT}"}) as session:
            statuses = []
            for _ in range(6):
                async with session.head(url) as response:
                    statuses.append(response.status)
    finally:
        await server.stop()

    # Six calls in a row, well within a second: the budget is four.
    assert statuses == [404] * 4 + [429] * 2
    assert server.over_limit == 2
