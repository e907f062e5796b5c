"""The storage contracts: Tier (every place entries live) and DurableTier (the Volume)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple, Protocol

from proxy.speak import CacheKey
from proxy.storage.breaker import BreakerState
from proxy.storage.entry import Entry, EntryInfo, EntryMeta


class VolumeUnavailable(Exception):
    """The Volume cannot be used now: its breaker is open, time ran out, or retries ran out."""


class VolumeBusy(VolumeUnavailable):
    """The Volume's call budget could not start the call in its time: the Volume is not at fault
    (its breaker does not count it), the caller goes on without it."""


class CorruptEntry(Exception):
    """A stored object disagreed with its sidecar (length or sha256); the entry is being removed."""


class Tier(Protocol):
    """A place entries live: memory, a local folder, a Databricks Volume."""

    name: str

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry stored under `key`, or None; a corrupt one is a miss."""

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`, replacing what was there."""

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""

    async def aclose(self) -> None:
        """Release what the tier holds open."""


class EntryStream(Protocol):
    """A stored entry whose body arrives in chunks, checked as it goes (a streamed Volume hit)."""

    @property
    def meta(self) -> EntryMeta:
        """The entry's metadata, known before the first byte."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The body; raises rather than yield a final chunk that fails the integrity check."""
        ...

    async def aclose(self) -> None:
        """Stop reading and release the connection."""


class CallStats(NamedTuple):
    """A remote Volume's API calls since start: (method, outcome) -> count; seconds waited."""

    calls: Mapping[tuple[str, str], int]
    wait_seconds: float


class DurableTier(Tier, Protocol):
    """The Volume: entries that outlive the process, shared by every process and replica.

    Layout and integrity rules are common to every Volume (`proxy.storage.layout`): an object
    beside its sidecar, the object written first and the sidecar last, and an object whose length
    or sha256 disagrees with its sidecar removed, counted (`corrupt_entries`) and missed, never
    served: a hit up to `cache.volume.verify_max_bytes` is checked before `open` answers it, a
    larger one streams with its last chunk held back until it passes.

    Every Volume bounds its own calls and keeps a circuit breaker: a lookup (`get`, `open`) that
    has no answer within `cache.volume.lookup_budget_ms` (a body then gets
    `cache.volume.timeout_seconds`), or a write past `timeout_seconds`, raises and counts as a
    failure, like an error; after `failure_threshold` of them in a row the Volume is not asked
    (VolumeUnavailable at once) for `cooldown_seconds`.
    """

    kind: str

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state: closed, open or half-open."""
        ...

    @property
    def corrupt_entries(self) -> int:
        """Entries found corrupt by a read (length or sha256 against the sidecar) since start."""
        ...

    @property
    def walkable(self) -> bool:
        """True when the Volume can be listed outside a request (no user's token needed)."""
        ...

    def describe(self) -> str:
        """The Volume's kind and health, in words, for the dashboard."""
        ...

    def call_stats(self) -> CallStats:
        """Calls to a remote Volume's API by method and outcome, and time spent waiting for a
        slot to make them (empty for a Volume that makes no API calls)."""
        ...

    def get_nowait(self, key: CacheKey) -> Entry | None:
        """A hit read without awaiting, only where that cannot block; None means "ask open()"."""
        ...

    async def open(self, key: CacheKey) -> Entry | EntryStream | None:
        """The entry under `key`, streamed where the Volume streams, or None on a miss."""
        ...

    async def read_meta(self, key: CacheKey) -> EntryMeta | None:
        """The sidecar's metadata without the body; None when absent or malformed (kept as is)."""
        ...

    async def exists(self, key: CacheKey) -> bool:
        """True when `key` has a valid sidecar and an object of the length it records."""
        ...

    def location(self, key: CacheKey, content_type: str) -> str:
        """Where the object for `key` lives (what the index and the legacy metadata record)."""
        ...

    def list_entries(
        self,
        user: str | None = None,
        thread_id: str | None = None,
        message_id: str | None = None,
    ) -> AsyncIterator[EntryInfo]:
        """Every entry under the base, a user, a thread or a message."""
        ...

    async def scan(self) -> list[EntryInfo]:
        """Every entry with an object: its size, when it was made and last hit."""
        ...

    async def delete_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Remove a user's, a thread's or a message's entries; return how many entries went."""
        ...

    async def record_hits(self, hits: Mapping[CacheKey, float]) -> bool:
        """Write hits seen elsewhere (memory) into the Volume's last-hit times.

        False when the Volume keeps no hit times: the caller must then keep them itself.
        """
        ...

    async def clean_leftovers(self) -> int:
        """Remove the temporary files a crash of this host left behind; return how many."""
        ...

    async def clean_orphans(self, *, limit: int, older_than: float) -> int:
        """Remove up to `limit` crash leftovers last changed before `older_than`."""
        ...

    async def ping(self) -> bool:
        """True when the Volume can be written now (readiness)."""
        ...
