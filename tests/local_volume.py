"""Helpers for the local Volume tests: a key, an entry, and what lies under a folder."""

from __future__ import annotations

from pathlib import Path

from proxy.speak import CacheKey
from proxy.storage.entry import Entry

KEY = CacheKey("alice@example.com", "t-9", "m-123", "af_nicole")
# Ids that must never become a path segment.
BAD_IDS = ["../x", "..", "x" * 500, "a\0b", "a/b", "ünïcode", "", ".hidden", "a\\b", "a b"]


def entry(body: bytes = b"ID3 fake mp3 audio" * 100, content_type: str = "audio/mpeg") -> Entry:
    """A replicate entry with a fixed creation time (equal entries for equal bodies)."""
    return Entry.build(
        body,
        content_type=content_type,
        text_sha256="ab" * 32,
        provider="replicate",
        headers=(("x-tts-provider", "replicate"),),
        created_at=1_700_000_000.5,
    )


def folder(root: Path, key: CacheKey = KEY) -> Path:
    """The message folder of `key` under the default prefix."""
    return root / "tts_audio" / key.user / key.thread_id / key.message_id


def files_under(root: Path) -> list[str]:
    """Every file under `root`, relative and sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def anything_under(root: Path) -> list[str]:
    """Every file and folder under `root`, relative and sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
