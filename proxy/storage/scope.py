"""Scope: a prefix of user / thread / message / voice, what purges remove and listings show."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.speak import CacheKey, valid_id, valid_thread_segment, valid_user_segment

_PARTS = ("user", "thread", "message", "voice")
# Each part's check: a valid id, or one of the key's own "_" segments in its place (speak.py).
_VALID = (valid_user_segment, valid_thread_segment, valid_id, valid_id)


class BadScope(ValueError):
    """The scope is not a valid prefix of user / thread / message / voice."""


@dataclass(frozen=True, slots=True)
class Scope:
    """A prefix of the entry path; nothing set with `everything` means the whole cache.

    A purge's scope is strict (`parse`: a prefix in order, valid ids, or everything alone);
    a listing's filter is lenient (`from_query`: any valid parts, the rest ignored).
    """

    user: str | None = None
    thread_id: str | None = None
    message_id: str | None = None
    voice: str | None = None
    everything: bool = False

    @classmethod
    def parse(
        cls,
        *,
        user: str | None,
        thread_id: str | None = None,
        message_id: str | None = None,
        voice: str | None = None,
        everything: bool = False,
    ) -> Scope:
        """A purge scope: a prefix in order, valid ids, or `everything` alone; else BadScope."""
        parts = [user, thread_id, message_id, voice]
        given = [p for p in parts if p is not None]
        if everything:
            if given:
                raise BadScope("all=true cannot be combined with ids")
            return cls(everything=True)
        if not given:
            raise BadScope("name a user (and optionally thread, message, voice), or all=true")
        for index, part in enumerate(parts[1:], start=1):
            if part is not None and parts[index - 1] is None:
                raise BadScope(f"{_PARTS[index]} needs {_PARTS[index - 1]}")
        for name, part, valid in zip(_PARTS, parts, _VALID, strict=True):
            if part is not None and not valid(part):
                raise BadScope(f"invalid {name}")
        return cls(user, thread_id, message_id, voice)

    @classmethod
    def from_query(cls, values: Mapping[str, str]) -> Scope:
        """A listing filter from query parameters; empty or invalid parts are dropped."""

        def part(name: str) -> str | None:
            value = values.get(name, "").strip()
            return value if _VALID[_PARTS.index(name)](value) else None

        return cls(part("user"), part("thread"), part("message"), part("voice"))

    @classmethod
    def of(cls, key: CacheKey) -> Scope:
        """The scope of exactly one entry."""
        return cls(key.user, key.thread_id, key.message_id, key.voice)

    def covers(self, key: CacheKey) -> bool:
        """True when `key` matches every part that is set."""
        if self.everything:
            return True
        pairs = (
            (self.user, key.user),
            (self.thread_id, key.thread_id),
            (self.message_id, key.message_id),
            (self.voice, key.voice),
        )
        return all(wanted is None or wanted == actual for wanted, actual in pairs)

    def query(self) -> dict[str, str]:
        """The parts that are set, as query parameters (`all=true` for everything)."""
        if self.everything:
            return {"all": "true"}
        values = (self.user, self.thread_id, self.message_id, self.voice)
        return {name: value for name, value in zip(_PARTS, values, strict=True) if value}
