"""One JSON line per request on `proxy.access`: ids and timings, never text, tokens or raw ids."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.access_log import ACCESS_LOGGER
from proxy.speak import CacheKey
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.support import SPEAK, TOKEN, logged_client, settle, speak, speak_body

USER = "carol@example.com"
TEXT = "my secret diary entry about the merger"
ACCESS_TOKEN = "obo-token-NEVER-LOGGED"
THREAD, MESSAGE = "thread-private-42", "message-private-7"
CAROL = {"X-Forwarded-Email": USER, "X-Forwarded-Access-Token": ACCESS_TOKEN}
FIELDS = {
    "ts",
    "request_id",
    "method",
    "path",
    "status",
    "cache",
    "tier",
    "key",
    "upstream_ms",
    "total_ms",
}

# What the proxy makes when the client sent no usable id: a per-process prefix and a counter.
NEW_ID = r"[0-9a-f]{12}-[0-9a-f]+"


@pytest.fixture
def access_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[dict[str, Any]]]:
    """The parsed proxy.access lines of the test, captured with every other log record."""
    # The CLI writes these lines straight to stderr; here they go through caplog like the rest.
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)
    lines: list[dict[str, Any]] = []
    caplog.set_level(logging.DEBUG)
    yield lines


def parsed(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(record.getMessage()) for record in caplog.records if record.name == ACCESS_LOGGER
    ]


async def test_each_request_is_one_json_line_without_text_tokens_or_ids(
    aiohttp_server: Any,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    access_lines: list[dict[str, Any]],
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"admin.token": TOKEN})
    client = await logged_client(aiohttp_server, aiohttp_client, settings)
    body = speak_body(text=TEXT, thread_id=THREAD, message_id=MESSAGE)

    miss = await speak(client, SPEAK, body, headers={**CAROL, "X-Request-Id": "req-42"})
    await settle(client.app)
    hit = await speak(client, SPEAK, body, headers=CAROL)
    async with client.get(
        f"/_proxy/audio/{THREAD}/{MESSAGE}/af_nicole", headers={**CAROL, "Range": "bytes=0-9"}
    ) as audio:
        assert audio.status == 206
    async with client.get(f"/echo/path?q={MESSAGE}&text={TEXT}") as echoed:
        assert echoed.status == 200
    async with client.get(
        "/_proxy/admin/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as stats:
        assert stats.status == 200

    lines = parsed(caplog)
    assert len(lines) == 5
    assert all(set(line) == FIELDS for line in lines)
    speak_miss, speak_hit, audio_line, echo_line, stats_line = lines
    key = CacheKey(USER, THREAD, MESSAGE, "af_nicole").digest()

    assert speak_miss["request_id"] == "req-42" == miss.request_id
    assert speak_miss["method"] == "POST" and speak_miss["path"] == SPEAK
    assert speak_miss["status"] == 200 and speak_miss["cache"] == "miss"
    assert speak_miss["key"] == key and speak_miss["tier"] is None
    assert speak_miss["upstream_ms"] > 0 and speak_miss["total_ms"] >= speak_miss["upstream_ms"]

    assert speak_hit["cache"] == "hit" and speak_hit["tier"] == "memory"
    assert speak_hit["key"] == key and speak_hit["upstream_ms"] is None
    assert re.fullmatch(NEW_ID, speak_hit["request_id"]) and hit.request_id

    # The audio URL carries the ids: its template is logged, and the key's hash.
    assert audio_line["path"] == "/_proxy/audio/{thread}/{message}/{voice}"
    assert audio_line["status"] == 206 and audio_line["key"] == key
    # Pass-through: the path without its query string.
    assert echo_line["path"] == "/echo/path" and echo_line["cache"] is None
    assert echo_line["upstream_ms"] > 0
    assert stats_line["path"] == "/_proxy/admin/api/stats" and stats_line["key"] is None

    # Nothing anyone logged (at any level) names the text, a token, or the raw ids.
    everything = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (TEXT, "secret diary", ACCESS_TOKEN, TOKEN, THREAD, MESSAGE):
        assert secret not in everything, secret


async def test_the_request_id_is_passed_through_when_sane_and_created_otherwise(
    aiohttp_server: Any,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    access_lines: list[dict[str, Any]],
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url)
    client = await logged_client(aiohttp_server, aiohttp_client, settings)

    sane = await speak(client, SPEAK, speak_body(), headers={**CAROL, "X-Request-Id": "abc.123"})
    assert sane.request_id == "abc.123"
    assert legacy_backend.speak_headers[-1]["X-Request-Id"] == "abc.123"

    for hostile in (f"text {TEXT}", "x" * 300, "<script>", ""):
        answer = await speak(
            client, SPEAK, speak_body(message_id="m-9"), headers={**CAROL, "X-Request-Id": hostile}
        )
        assert answer.request_id is not None
        assert re.fullmatch(NEW_ID, answer.request_id), hostile
    # A miss forwards the id it answers with.
    assert legacy_backend.speak_headers[-1]["X-Request-Id"] != ""
    first_miss = parsed(caplog)[1]
    assert legacy_backend.speak_headers[-1]["X-Request-Id"] == first_miss["request_id"]
    # Every response carries one, the proxy's own routes too.
    async with client.get("/_proxy/health", headers={"X-Request-Id": "hc-1"}) as health:
        assert health.headers["X-Request-Id"] == "hc-1"


async def test_access_log_off_means_no_logger_at_all(
    aiohttp_server: Any,
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    access_lines: list[dict[str, Any]],
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"server.access_log": False})
    client = await logged_client(aiohttp_server, aiohttp_client, settings)
    answer = await speak(client, SPEAK, speak_body(), headers=CAROL)
    assert answer.cache == "miss" and answer.request_id  # the id header stays
    assert parsed(caplog) == []
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]
