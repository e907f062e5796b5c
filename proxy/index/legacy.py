"""LegacyMessages: the legacy chat_messages table: who owns a message, its tts_cache metadata."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from proxy.config import IndexSettings
from proxy.index.pool import IndexPool, row_count
from proxy.speak import CacheKey

LEGACY_TABLE: Final = "chat_messages"


class LegacyMessages:
    """Questions and updates to the legacy chat_messages table, on the index's pool."""

    def __init__(
        self, pool: IndexPool, *, ownership_query: str = IndexSettings.ownership_query
    ) -> None:
        self.pool = pool
        self._ownership_query = ownership_query

    async def owns(self, user: str, message_id: str) -> bool:
        """True when the legacy table says `user` owns `message_id`; IndexUnavailable if unsure."""
        row = await self.pool.run(
            "owns", lambda con: con.fetchrow(self._ownership_query, message_id, user)
        )
        # Accept both `SELECT 1 ...` (a row or none) and `SELECT EXISTS(...)` (true or false).
        return row is not None and row[0] is not None and row[0] is not False

    async def write_metadata(
        self, key: CacheKey, volume_path: str, provider: str | None, cached_at: datetime | float
    ) -> bool:
        """Set chat_messages.metadata.tts_cache as the legacy backend did, on the owner's row."""
        if not isinstance(cached_at, datetime):
            cached_at = datetime.fromtimestamp(cached_at, UTC)
        # The legacy UPDATE matched the message id alone; matching the user too means a user
        # can never rewrite the metadata of someone else's message.
        sql = f"""
            UPDATE {LEGACY_TABLE}
            SET metadata = COALESCE(metadata, '{{}}'::jsonb) || jsonb_build_object(
                'tts_cache', jsonb_build_object(
                    'volume_path', $3::text, 'voice', $4::text,
                    'provider', $5::text, 'cached_at', $6::text))
            WHERE message_id = $1 AND user_id = $2
        """
        args = (key.message_id, key.user, volume_path, key.voice, provider, cached_at.isoformat())
        status = await self.pool.run("legacy_metadata", lambda con: con.execute(sql, *args), key)
        return row_count(status) > 0
