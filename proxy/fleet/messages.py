"""Invalidations: what one process tells every other to drop, and their JSON wire form."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from proxy.speak import CacheKey
from proxy.storage.scope import BadScope, Scope

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (the default build); the group's
# sockets take the same messages, so one bound serves both.
MAX_PAYLOAD_BYTES: Final = 7_900
PURGE: Final = "purge"
STORED: Final = "stored"
Kind = Literal["purge", "stored"]
_SHA256_HEX: Final = 64


class BadMessage(ValueError):
    """A payload that is not an invalidation this version understands."""


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One broadcast: a purge's scope, or keys another process stored a new recording for.

    `id` is unique fleet-wide, so a process told twice (over the group's sockets and over
    PostgreSQL) applies it once; `origin` is the sending process (which applied it already);
    `reply`, when set, is the PostgreSQL channel that wants an acknowledgement.
    """

    id: str
    origin: str
    kind: Kind
    scope: Scope | None = None
    # (key, body sha256 of the new recording): a process holding that very recording keeps it.
    stored: tuple[tuple[CacheKey, str], ...] = field(default=())
    reply: str = ""

    def to_json(self) -> dict[str, Any]:
        """The message as JSON-ready data."""
        data: dict[str, Any] = {"id": self.id, "origin": self.origin, "kind": self.kind}
        if self.scope is not None:
            data["scope"] = self.scope.query()
        if self.stored:
            data["stored"] = [[*key, sha] for key, sha in self.stored]
        if self.reply:
            data["reply"] = self.reply
        return data

    def payload(self) -> str:
        """The wire form; BadMessage past MAX_PAYLOAD_BYTES (see stored_batches)."""
        text = json.dumps(self.to_json(), separators=(",", ":"))
        if len(text.encode()) > MAX_PAYLOAD_BYTES:
            raise BadMessage(f"invalidation of {len(text)} bytes, past {MAX_PAYLOAD_BYTES}")
        return text

    @classmethod
    def from_json(cls, data: Any) -> Invalidation:
        """Read a message; BadMessage unless every part is valid (ids as strict as a purge's)."""
        if not isinstance(data, dict):
            raise BadMessage("not a JSON object")
        ident, origin, kind = data.get("id"), data.get("origin"), data.get("kind")
        reply = data.get("reply", "")
        if not all(isinstance(v, str) and 0 < len(v) <= 200 for v in (ident, origin)):
            raise BadMessage("id and origin must be short strings")
        if not isinstance(reply, str) or len(reply) > 63:
            raise BadMessage("reply must be a channel name")
        assert isinstance(ident, str) and isinstance(origin, str)
        if kind == PURGE:
            return cls(ident, origin, PURGE, scope=_scope(data.get("scope")), reply=reply)
        if kind == STORED:
            return cls(ident, origin, STORED, stored=_stored(data.get("stored")), reply=reply)
        raise BadMessage(f"unknown kind {kind!r}")

    @classmethod
    def from_payload(cls, text: str | bytes) -> Invalidation:
        """Read the wire form."""
        if len(text) > MAX_PAYLOAD_BYTES:
            raise BadMessage("payload too large")
        try:
            return cls.from_json(json.loads(text))
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, BadMessage):
                raise
            raise BadMessage("not JSON") from None


def _scope(raw: Any) -> Scope:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise BadMessage("a purge needs a scope")
    try:
        return Scope.parse(
            user=raw.get("user"),
            thread_id=raw.get("thread"),
            message_id=raw.get("message"),
            voice=raw.get("voice"),
            everything=raw.get("all") == "true",
        )
    except BadScope as exc:
        raise BadMessage(f"bad scope: {exc}") from None


def _stored(raw: Any) -> tuple[tuple[CacheKey, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise BadMessage("stored needs keys")
    keys: list[tuple[CacheKey, str]] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 5
            or not all(isinstance(v, str) for v in item)
        ):
            raise BadMessage("a stored key is [user, thread, message, voice, sha256]")
        key = CacheKey(*item[:4])
        if not key.valid() or len(item[4]) != _SHA256_HEX:
            raise BadMessage("invalid stored key")
        keys.append((key, item[4]))
    return tuple(keys)


class MessageIds:
    """Ids for the messages one process sends: its name and a counter, never reused."""

    def __init__(self, process: str) -> None:
        self.process = process
        self._counter = itertools.count(1)
        # A restarted process with a recycled pid must not repeat an id: a random boot mark.
        self._boot = secrets.token_hex(3)

    def next(self) -> str:
        """A fresh message id."""
        return f"{self.process}.{self._boot}.{next(self._counter)}"


def stored_batches(
    ids: MessageIds, stored: Iterable[tuple[CacheKey, str]]
) -> Iterator[Invalidation]:
    """`stored` keys as as few messages as fit MAX_PAYLOAD_BYTES each."""
    batch: list[tuple[CacheKey, str]] = []
    size = 0
    # Room for the envelope: the id, the origin and the field names.
    room = MAX_PAYLOAD_BYTES - 200 - 2 * len(ids.process)
    for key, sha in stored:
        cost = sum(len(part) for part in key) + len(sha) + 16
        if batch and size + cost > room:
            yield Invalidation(ids.next(), ids.process, STORED, stored=tuple(batch))
            batch, size = [], 0
        batch.append((key, sha))
        size += cost
    if batch:
        yield Invalidation(ids.next(), ids.process, STORED, stored=tuple(batch))
