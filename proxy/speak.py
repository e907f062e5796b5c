"""The /speak contract: what a request asks for (SpeakRequest), its entry key, valid ids."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, NamedTuple

# Ids become path segments: one strict pattern, bounded, no "..", no "/", no NUL, ASCII only.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}")


def valid_id(value: object) -> bool:
    """True when `value` is safe to use as a cache key part and a path segment."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None and ".." not in value


class CacheKey(NamedTuple):
    """Where one message's audio for one user and voice lives.

    The thread is part of the address because the Volume layout nests messages in threads.
    A tuple, so hashing and comparing it (several times per request) run in C.
    """

    user: str
    thread_id: str
    message_id: str
    voice: str

    def digest(self) -> str:
        """A short hash of the key, for logs: never the ids themselves."""
        raw = "\0".join((self.user, self.thread_id, self.message_id, self.voice))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def audio_path(self) -> str:
        """The proxy URL that serves this entry (`Content-Location`)."""
        return f"/_proxy/audio/{self.thread_id}/{self.message_id}/{self.voice}"

    def valid(self) -> bool:
        """True when every part passes `valid_id`."""
        return all(
            valid_id(part) for part in (self.user, self.thread_id, self.message_id, self.voice)
        )


class SpeakRequest(NamedTuple):
    """The JSON body of a speak call, as the legacy Flutter client sends it."""

    text: str
    voice: str
    provider: str | None
    message_id: str | None
    thread_id: str | None
    save_to_volume: bool
    save_said: bool = True
    """Whether the body has a save field at all (absent: the route's default decides)."""

    @classmethod
    def from_json(cls, body: dict[str, Any], default_voice: str) -> SpeakRequest:
        """Read the fields the cache cares about; wrong types count as absent."""
        text = body.get("text")
        voice = body.get("voice")
        provider = body.get("provider")
        message_id = body.get("message_id")
        thread_id = body.get("thread_id")
        return cls(
            text=text if isinstance(text, str) else "",
            voice=voice if isinstance(voice, str) and voice else default_voice,
            provider=provider.lower() if isinstance(provider, str) and provider else None,
            message_id=message_id if isinstance(message_id, str) else None,
            thread_id=thread_id if isinstance(thread_id, str) else None,
            save_to_volume=body.get("save_to_volume") is True,
            save_said="save_to_volume" in body,
        )

    def text_sha256(self) -> str:
        """The digest a stored entry must match: another text is another recording."""
        return hashlib.sha256(self.text.strip().encode()).hexdigest()


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is anything else."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # deeply nested JSON is not a speak call either: forwarded untouched
    return value if isinstance(value, dict) else None
