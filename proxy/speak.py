"""What a speak call asks for (SpeakRequest), the key of its entry (CacheKey), valid ids."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Final, NamedTuple

from proxy.reasons import Reason

# Ids become path segments: one strict pattern, bounded, no "..", no "/", no NUL, ASCII only.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}")

# The key's own segments. Each starts with "_", which no valid id does: a content key can never
# take a message key's place, the shared scope can never be a user's, and a caller known by an
# API key can never be a user a gateway names.
CONTENT_THREAD: Final = "_text"
"""The thread segment of a content key: `{user}/_text/{text sha256}/{variant}`."""
SHARED_USER: Final = "_shared"
"""The user segment of a content key in the shared scope."""
API_KEY_USER_PREFIX: Final = "_key-"
"""The user segment of a caller known by the HMAC of its API key: `_key-` and 32 hex digits."""
_API_KEY_USER = re.compile(r"_key-[0-9a-f]{32}")


def valid_id(value: object) -> bool:
    """True when `value` is safe to use as a cache key part and a path segment."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None and ".." not in value


def valid_user_segment(value: object) -> bool:
    """True for a user folder: a valid id, the shared scope, or an API key's user."""
    return valid_id(value) or value == SHARED_USER or api_key_user(value)


def valid_thread_segment(value: object) -> bool:
    """True for a thread folder: a valid id or the content keys' folder."""
    return valid_id(value) or value == CONTENT_THREAD


def api_key_user(value: object) -> bool:
    """True for the user segment of a caller known by its API key."""
    return isinstance(value, str) and _API_KEY_USER.fullmatch(value) is not None


class CacheKey(NamedTuple):
    """Where one recording lives: a message's for a user and voice, or a text's (content key).

    A message key is `(user, thread, message, voice)` (the thread is part of the address because
    the Volume layout nests messages in threads). A content key is `(user, "_text", sha256 of
    the text, variant)`, the variant being the voice and a hash of whatever else changes the
    audio; in the shared scope its user is "_shared". A tuple, so hashing and comparing it
    (several times per request) run in C.
    """

    user: str
    thread_id: str
    message_id: str
    voice: str

    @classmethod
    def content(cls, user: str, text_sha256: str, variant: str) -> CacheKey:
        """The content key of a text for `user` (or `SHARED_USER`)."""
        return cls(user, CONTENT_THREAD, text_sha256, variant)

    @property
    def is_content(self) -> bool:
        """True for a content key (a text's recording, not a message's)."""
        return self.thread_id == CONTENT_THREAD

    @property
    def is_shared(self) -> bool:
        """True for a content key in the shared scope."""
        return self.user == SHARED_USER

    def digest(self) -> str:
        """A short hash of the key, for logs: never the ids themselves."""
        raw = "\0".join((self.user, self.thread_id, self.message_id, self.voice))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def audio_path(self) -> str:
        """The proxy URL that serves this entry (`Content-Location`).

        `/_proxy/audio/{thread}/{message}/{voice}`; a content key's is
        `/_proxy/audio/_text/{digest}/{variant}`, or `/_proxy/audio/_shared/...` in the shared
        scope (the requester's own user is never part of the URL).
        """
        if self.user == SHARED_USER:
            return f"/_proxy/audio/{SHARED_USER}/{self.message_id}/{self.voice}"
        return f"/_proxy/audio/{self.thread_id}/{self.message_id}/{self.voice}"

    def valid(self) -> bool:
        """True when every part is a safe path segment in its place.

        Message, thread and voice are valid ids; the thread may be the content keys' folder, and
        the user the shared scope (content keys only) or an API key's user.
        """
        if self.user == SHARED_USER and self.thread_id != CONTENT_THREAD:
            return False
        return (
            valid_user_segment(self.user)
            and valid_thread_segment(self.thread_id)
            and valid_id(self.message_id)
            and valid_id(self.voice)
        )


class SpeakRequest(NamedTuple):
    """What a speak call asks for, as its route's contract reads it (`proxy/contracts.py`)."""

    text: str
    voice: str
    provider: str | None
    message_id: str | None
    thread_id: str | None
    save_to_volume: bool
    save_said: bool = True
    """Whether the body has a save field at all (absent: the route's default decides)."""
    params: str = ""
    """Everything else in the key, as canonical JSON (content keys only; "" when none)."""
    problem: Reason | None = None
    """Why the body cannot be keyed safely (a field not declared, a field of the wrong type)."""

    @classmethod
    def from_json(cls, body: dict[str, Any], default_voice: str) -> SpeakRequest:
        """The legacy contract's fields; wrong types count as absent."""
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
        """The digest a stored entry must match: another text is another recording.

        The text without surrounding space, as the legacy backend synthesizes it.
        """
        return text_digest(self.text.strip())


def text_digest(text: str) -> str:
    """The sha256 of a text, hex."""
    # surrogatepass: JSON may carry lone surrogates ("\\ud800"), which strict UTF-8 refuses.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is anything else."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # deeply nested JSON is not a speak call either: forwarded untouched
    return value if isinstance(value, dict) else None
