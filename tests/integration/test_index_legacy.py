"""The legacy chat_messages table on a real PostgreSQL: ownership, the tts_cache metadata."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.index.legacy import LegacyMessages
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from tests.index_support import (
    ALICE,
    BOB,
    KEY,
    MakeIndex,
    make_index_fixture,  # noqa: F401
    path_of,
)
from tests.pg import (
    ChatMessage,
    create_chat_messages,
    message_metadata,
)


async def test_ownership(postgres_dsn: str, make_index: MakeIndex) -> None:
    index = await make_index()
    legacy = LegacyMessages(index.pool)
    with pytest.raises(IndexUnavailable):
        # No chat_messages table: the index cannot tell, and says so rather than guess.
        await legacy.owns(ALICE, "m-123")
    assert await index.ping() is True

    await create_chat_messages(postgres_dsn, [ChatMessage("m-123", ALICE, "t-9", "hello")])
    assert await legacy.owns(ALICE, "m-123") is True
    assert await legacy.owns(BOB, "m-123") is False
    assert await legacy.owns(ALICE, "m-missing") is False

    exists_style = LegacyMessages(
        (await make_index()).pool,
        ownership_query="SELECT EXISTS(SELECT 1 FROM chat_messages"
        " WHERE message_id = $1 AND user_id = $2)",
    )
    assert await exists_style.owns(ALICE, "m-123") is True
    assert await exists_style.owns(BOB, "m-123") is False


async def test_legacy_metadata_only_on_the_owners_row(
    postgres_dsn: str,
    make_index: MakeIndex,
) -> None:
    await create_chat_messages(
        postgres_dsn,
        [
            ChatMessage("m-123", ALICE, "t-9", "hello", {"feedback": "up", "tokens": 12}),
            ChatMessage("m-null", ALICE, "t-9", "no metadata yet"),
        ],
    )
    legacy = LegacyMessages((await make_index()).pool)
    volume_path = path_of(KEY)
    cached_at = datetime(2026, 5, 20, 12, 30, tzinfo=UTC)

    bobs_key = CacheKey(BOB, "t-9", "m-123", "af_nicole")
    assert await legacy.write_metadata(bobs_key, "/evil", "replicate", cached_at) is False
    assert await message_metadata(postgres_dsn, "m-123") == {"feedback": "up", "tokens": 12}

    assert await legacy.write_metadata(KEY, volume_path, "replicate", cached_at) is True
    assert await message_metadata(postgres_dsn, "m-123") == {
        "feedback": "up",
        "tokens": 12,
        "tts_cache": {
            "volume_path": volume_path,
            "voice": "af_nicole",
            "provider": "replicate",
            "cached_at": "2026-05-20T12:30:00+00:00",
        },
    }

    null_key = CacheKey(ALICE, "t-9", "m-null", "bf_emma")
    assert await legacy.write_metadata(null_key, "/v/p", "deepgram", 1_700_000_000.0) is True
    tts_cache = (await message_metadata(postgres_dsn, "m-null") or {})["tts_cache"]
    assert tts_cache["voice"] == "bf_emma"
    assert tts_cache["cached_at"] == datetime.fromtimestamp(1_700_000_000, UTC).isoformat()

    missing = CacheKey(ALICE, "t-9", "m-missing", "af_nicole")
    assert await legacy.write_metadata(missing, "/v/p", "replicate", cached_at) is False
