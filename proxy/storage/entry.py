"""One stored recording: its metadata, its bytes, and the record a listing gives of it."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from proxy.speak import CacheKey

# Response headers replayed on a hit (lower case); everything else is the proxy's own.
STORED_HEADERS = frozenset({"content-type", "x-tts-provider", "cache-control", "content-language"})


def stored_header(name: str) -> bool:
    """True for a response header that is part of the cached entry (CORS included)."""
    lower = name.lower()
    return lower in STORED_HEADERS or lower.startswith("access-control-")


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """What the cache knows about one stored recording."""

    content_type: str
    length: int
    body_sha256: str
    text_sha256: str
    provider: str | None
    created_at: float
    status: int = 200
    headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def etag(self) -> str:
        """A strong validator derived from the body digest."""
        return f'"{self.body_sha256[:32]}"'

    def to_json(self) -> dict[str, object]:
        """The sidecar form."""
        return {
            "content_type": self.content_type,
            "length": self.length,
            "body_sha256": self.body_sha256,
            "text_sha256": self.text_sha256,
            "provider": self.provider,
            "created_at": self.created_at,
            "status": self.status,
            "headers": [list(pair) for pair in self.headers],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> EntryMeta:
        """Parse a sidecar; raises ValueError/TypeError/KeyError on a malformed one."""
        headers = data.get("headers", [])
        if not isinstance(headers, list):
            raise ValueError("headers must be a list")
        provider = data.get("provider")
        length = data["length"]
        created_at = data["created_at"]
        status = data.get("status", 200)
        if not isinstance(length, int) or not isinstance(created_at, int | float):
            raise ValueError("length and created_at must be numbers")
        if not isinstance(status, int):
            raise ValueError("status must be an integer")
        return cls(
            content_type=str(data["content_type"]),
            length=length,
            body_sha256=str(data["body_sha256"]),
            text_sha256=str(data["text_sha256"]),
            provider=provider if isinstance(provider, str) else None,
            created_at=float(created_at),
            status=status,
            headers=tuple((str(k), str(v)) for k, v in headers),
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached recording: its metadata and its bytes."""

    meta: EntryMeta
    body: bytes

    @classmethod
    def build(
        cls,
        body: bytes,
        *,
        content_type: str,
        text_sha256: str,
        provider: str | None,
        headers: tuple[tuple[str, str], ...] = (),
        created_at: float | None = None,
    ) -> Entry:
        """An entry whose length and digest are computed from `body`."""
        meta = EntryMeta(
            content_type=content_type,
            length=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
            text_sha256=text_sha256,
            provider=provider,
            created_at=time.time() if created_at is None else created_at,
            headers=headers,
        )
        return cls(meta, body)

    def intact(self) -> bool:
        """True when the body agrees with its recorded length and digest."""
        return (
            len(self.body) == self.meta.length
            and hashlib.sha256(self.body).hexdigest() == self.meta.body_sha256
        )

    @property
    def size(self) -> int:
        """Bytes this entry costs in memory: body plus a bound on its metadata."""
        return len(self.body) + 512 + sum(len(k) + len(v) for k, v in self.meta.headers)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One stored entry as a listing sees it (index rows, Volume walks, the dashboard).

    Every source knows the key, the size and the times; the rest is None where the source does
    not know it (a Volume walk reads no sidecar; only the index counts hits and keeps the path).
    """

    key: CacheKey
    bytes: int
    created_at: float
    last_hit_at: float
    provider: str | None = None
    hits: int | None = None
    path: str | None = None
    content_type: str | None = None
    body_sha256: str | None = None
    text_sha256: str | None = None
    in_memory: bool = False
