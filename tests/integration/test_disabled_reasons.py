"""Every `disabled` answer says why: Cache-Status `detail` and the access log's `reason`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from proxy.access_log import ACCESS_LOGGER
from proxy.reasons import Reason
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.pg import ChatMessage, create_chat_messages
from tests.support import ALICE, SPEAK, logged_client, speak_body

Case = tuple[dict[str, Any], bytes, dict[str, str]]


def case(
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    **settings: Any,
) -> Case:
    """Settings overrides, the body sent, the headers sent."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return settings, raw, ALICE if headers is None else headers


CASES: dict[Reason, Case] = {
    Reason.IDENTITY_OFF: case(speak_body(), **{"identity.mode": "none"}),
    Reason.UNTRUSTED_PEER: case(speak_body(), **{"identity.trusted_proxies": ["10.0.0.0/8"]}),
    Reason.NO_IDENTITY: case(speak_body(), headers={}),
    Reason.AMBIGUOUS_IDENTITY: case(
        speak_body(), headers={"X-Forwarded-Email": "alice@example.com, bob@example.com"}
    ),
    Reason.NOT_JSON: case(b"{not json"),
    Reason.SAVE_OFF: case(speak_body(save_to_volume=False)),
    Reason.SAVE_DEFAULT_OFF: case({k: v for k, v in speak_body().items() if k != "save_to_volume"}),
    Reason.NO_TEXT: case(speak_body(text="   ")),
    Reason.TEXT_TOO_LONG: case(speak_body(text="x" * 11), **{"cache.max_text_chars": 10}),
    Reason.INVALID_ID: case(speak_body(message_id="../../etc")),
}


@pytest.fixture
def access_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


def logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]


async def assert_disabled(
    client: Any,
    backend: FakeLegacyBackend,
    raw: bytes,
    headers: dict[str, str],
    reason: Reason,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = backend.calls[SPEAK]
    async with client.post(
        SPEAK, data=raw, headers={**headers, "Content-Type": "application/json"}
    ) as response:
        await response.read()
        assert response.headers["X-TTS-Cache"] == "disabled"
        status = response.headers["Cache-Status"]
    assert status == f"tts-cache-proxy; fwd=bypass; detail={reason.value}"
    assert backend.calls[SPEAK] == before + 1  # forwarded, as every disabled call is
    (line,) = [line for line in logged(caplog) if line["path"] == SPEAK][-1:]
    assert line["cache"] == "disabled" and line["reason"] == reason.value


@pytest.mark.parametrize("reason", list(CASES), ids=lambda r: r.value)
async def test_each_reason_is_named_in_cache_status_and_the_access_log(
    reason: Reason,
    aiohttp_server: Any,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    access_lines: pytest.LogCaptureFixture,
) -> None:
    overrides, raw, headers = CASES[reason]
    settings = settings_for(tmp_path, legacy_backend.url, **overrides)
    client = await logged_client(aiohttp_server, aiohttp_client, settings)
    await assert_disabled(client, legacy_backend, raw, headers, reason, access_lines)


async def test_unconfirmed_ownership_is_named(
    aiohttp_server: Any,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    postgres_dsn: str,
    access_lines: pytest.LogCaptureFixture,
) -> None:
    await create_chat_messages(postgres_dsn, [ChatMessage("m-1", "bob@example.com", "t-1")])
    settings = settings_for(
        tmp_path,
        legacy_backend.url,
        **{"index.dsn": postgres_dsn, "index.verify_ownership": True},
    )
    client = await logged_client(aiohttp_server, aiohttp_client, settings)
    raw = json.dumps(speak_body()).encode()
    await assert_disabled(
        client, legacy_backend, raw, ALICE, Reason.OWNERSHIP_UNCONFIRMED, access_lines
    )


async def test_hits_and_misses_carry_no_reason(
    aiohttp_server: Any,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    access_lines: pytest.LogCaptureFixture,
) -> None:
    client = await logged_client(
        aiohttp_server, aiohttp_client, settings_for(tmp_path, legacy_backend.url)
    )
    for expected in ("miss", "hit"):
        async with client.post(SPEAK, json=speak_body(), headers=ALICE) as response:
            await response.read()
            assert response.headers["X-TTS-Cache"] == expected
            assert "fwd=bypass" not in response.headers["Cache-Status"]
    lines = [line for line in logged(access_lines) if line["path"] == SPEAK]
    assert [line["cache"] for line in lines] == ["miss", "hit"]
    assert all("reason" not in line for line in lines)
