"""TieredCache: memory, then the Volume; write-behind; a failing tier is logged and skipped."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple, TypeVar

from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.memory import MemoryTier
from proxy.storage.tiers import DurableTier, EntryStream, VolumeBusy

T = TypeVar("T")
# How long the proxy waits before it writes a fresh entry to the Volume (see TieredCache).
WRITE_DELAY_SECONDS = 0.01
# How many keys' latest put the cache remembers for put_since (older marks answer True).
RECENT_PUTS: Final = 4_096
# How many invalidations the cache remembers for promote(since=...): an older mark promotes nothing.
RECENT_INVALIDATIONS: Final = 256
AfterVolumeWrite = Callable[[CacheKey, Entry], Awaitable[None]]
Covers = Callable[[CacheKey], bool]


class Purged(NamedTuple):
    """What purge_where dropped: memory entries, and the keys whose Volume write it waited for."""

    memory: int
    # Those writes may have landed after another process removed the key from the Volume.
    written: tuple[CacheKey, ...]


class TieredCache:
    """Reads through memory then the volume, promotes volume hits, writes the volume behind."""

    def __init__(
        self,
        memory: MemoryTier | None,
        volume: DurableTier | None,
        *,
        timeout_seconds: float,
        logger: logging.Logger,
        after_volume_write: AfterVolumeWrite | None = None,
        max_pending_bytes: int = 32 * 1024 * 1024,
        write_delay_seconds: float = 0.0,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be greater than 0")
        self.memory = memory
        self.volume = volume
        # Entries waiting for their Volume write are held in memory beside the memory tier: past
        # this many bytes, new writes are skipped (counted) rather than let memory grow unbounded.
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        # A Volume write starts this long after its put: a fill ends when its client has the last
        # byte, which is when a client playing messages in turn asks for the next one, and the
        # write must not take the CPU from that request's first byte. drain() and delete() wait
        # for it.
        self.write_delay_seconds = write_delay_seconds
        # Every tier call ends by then: a backstop past a Volume's own bounds (DurableTier), which
        # count their overruns on its breaker; an overrun here is counted as an error only.
        self.timeout_seconds = timeout_seconds
        self.misses = 0
        self.errors: Counter[str] = Counter()
        self._logger = logger
        self._after_volume_write = after_volume_write
        # One writer task per key, holding the strong reference the event loop does not keep.
        # Later puts for a key wait in _queued, so volume writes land in put order and a burst
        # of puts for one key costs one write after the one in flight.
        self._writers: dict[CacheKey, asyncio.Task[None]] = {}
        # Invariant: an entry is readable (get_memory) from its put until the Volume has it,
        # whatever the memory tier evicts meanwhile: waiting in _queued, then in _writing while
        # its write is out. Otherwise a lookup in that window misses both tiers and synthesizes
        # the key a second time. Both are bounded by max_pending_bytes.
        self._queued: dict[CacheKey, Entry] = {}
        self._writing: dict[CacheKey, Entry] = {}
        # One sequence orders puts and invalidations: a lookup that started before a put cannot
        # have seen it (put_since), and what it read before an invalidation covering its key
        # must not enter memory after it (promote's `since`).
        self._seq = 0
        self._put_at: OrderedDict[CacheKey, int] = OrderedDict()
        self._forgotten_before = 0
        # (sequence, which keys, the recording the invalidation keeps: a notice that another
        # process stored recording R does not stop a read of R from entering memory).
        self._invalidated: deque[tuple[int, Covers, str | None]] = deque()
        self._invalidations_forgotten_before = 0

    @property
    def pending_writes(self) -> int:
        """Keys whose volume write has not finished yet."""
        return len(self._writers)

    async def get(self, key: CacheKey) -> tuple[Entry, str] | None:
        """The entry and the name of the tier that had it, or None on a miss."""
        entry = self.get_memory(key)
        if entry is not None and self.memory is not None:
            return entry, self.memory.name
        entry = await self._read_volume(key)
        if entry is not None and self.volume is not None:
            self._logger.debug("cache volume hit %s", key.digest())
            return entry, self.volume.name
        self.misses += 1
        return None

    def get_memory(self, key: CacheKey) -> Entry | None:
        """The entry this process holds, without awaiting: the memory tier (the hot path), else
        one put whose Volume write has not ended yet."""
        memory = self.memory
        if memory is not None:
            try:
                entry = memory.get_nowait(key)
            except Exception as exc:
                self._failed(memory.name, "get", key, exc)
                entry = None
            if entry is not None:
                return entry
        pending = self._queued.get(key)
        return pending if pending is not None else self._writing.get(key)

    def put_mark(self) -> int:
        """A point in the order of puts and invalidations, for put_since and promote's `since`."""
        return self._seq

    def put_since(self, key: CacheKey, mark: int) -> bool:
        """True when `key` was put after `mark` (or may have been: too many puts to remember)."""
        if mark < self._forgotten_before:
            return True
        return self._put_at.get(key, -1) > mark

    async def open_volume(self, key: CacheKey) -> Entry | EntryStream | None:
        """The Volume's entry, streamed where the Volume can stream it; errors skip the tier.

        An entry read whole (without a thread where the Volume can) is promoted here; a stream
        is promoted by its reader once its body has been checked.
        """
        volume = self.volume
        if volume is None:
            return None
        entry = self._volume_nowait(volume, key)
        if entry is not None:
            return entry
        mark = self._seq
        found = await self._call(volume.name, "open", key, lambda: volume.open(key))
        if isinstance(found, Entry):
            self.promote(key, found, since=mark)
        return found

    async def _read_volume(self, key: CacheKey) -> Entry | None:
        """The Volume's entry read whole (without a thread where the Volume can), promoted."""
        volume = self.volume
        if volume is None:
            return None
        entry = self._volume_nowait(volume, key)
        if entry is not None:
            return entry
        mark = self._seq
        entry = await self._call(volume.name, "get", key, lambda: volume.get(key))
        if entry is not None:
            self.promote(key, entry, since=mark)
        return entry

    def _volume_nowait(self, volume: DurableTier, key: CacheKey) -> Entry | None:
        """The Volume's entry read without awaiting, where it cannot block; promoted."""
        try:
            entry = volume.get_nowait(key)
        except Exception as exc:
            self._failed(volume.name, "get", key, exc)
            return None
        if entry is not None:
            self.promote(key, entry)
        return entry

    def promote(self, key: CacheKey, entry: Entry, *, since: int | None = None) -> None:
        """Copy an entry read from the Volume into memory, unless a newer write is pending or
        (given the put_mark taken before the read) an invalidation covered the key meanwhile:
        the read may predate a purge, and memory must not keep what the purge removed."""
        if key in self._writers:
            return
        if since is not None and self.invalidated_since(key, since, entry.meta.body_sha256):
            return
        self._memory_put(key, entry)

    def invalidated_since(self, key: CacheKey, mark: int, body_sha256: str | None = None) -> bool:
        """True when an invalidation covering `key` came after `mark` (or may have), other than
        one that keeps the recording `body_sha256`."""
        log = self._invalidated
        if not log or log[-1][0] <= mark:
            return False
        if mark < self._invalidations_forgotten_before:
            return True
        return any(
            seq > mark and covers(key) and (kept is None or kept != body_sha256)
            for seq, covers, kept in log
        )

    def invalidate_key(self, key: CacheKey, keep_body_sha256: str | None = None) -> bool:
        """Drop this process's memory copy of `key` unless it is the recording named (another
        process stored a new one); no Volume call. True when a copy went."""
        self._note_invalidation(key.__eq__, keep_body_sha256)
        memory = self.memory
        if memory is None:
            return False
        held = memory.get_nowait(key)
        if held is None or held.meta.body_sha256 == keep_body_sha256:
            return False
        memory.delete_nowait(key)
        return True

    def count_error(self, tier: str, op: str, key: CacheKey, exc: Exception) -> None:
        """Count and log a tier failure noticed by a caller (a stream that broke mid-body)."""
        self._failed(tier, op, key, exc)

    def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` in memory now and schedule its volume write in the background."""
        self._note_put(key)
        self._memory_put(key, entry)
        volume = self.volume
        if volume is None:
            return
        replaced = self._queued.get(key)
        growth = entry.meta.length - (replaced.meta.length if replaced is not None else 0)
        if self._pending_bytes + growth > self.max_pending_bytes:
            self.errors["volume_backlog"] += 1
            self._logger.warning("volume write skipped for key %s: backlog full", key.digest())
            return
        self._pending_bytes += growth
        self._queued[key] = entry
        if key in self._writers:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._write_behind(volume, key))
        except RuntimeError as exc:
            self._pending_bytes -= entry.meta.length
            self._queued.pop(key, None)
            self._failed(volume.name, "put", key, exc)
            return
        self._writers[key] = task

    async def delete(self, key: CacheKey) -> None:
        """Remove `key` from every tier, after any volume write already in flight for it."""
        dropped = self._queued.pop(key, None)
        if dropped is not None:
            self._pending_bytes -= dropped.meta.length
        self._writing.pop(key, None)  # no longer readable; its write is awaited below
        memory = self.memory
        if memory is not None:
            await self._call(memory.name, "delete", key, lambda: memory.delete(key))
        writer = self._writers.get(key)
        if writer is not None:
            await asyncio.wait([writer])
        volume = self.volume
        if volume is not None:
            await self._call(volume.name, "delete", key, lambda: volume.delete(key))

    async def purge_where(self, covers: Covers) -> Purged:
        """Drop matching entries from memory and pending writes; wait out writes in flight.

        The Volume itself is the caller's to clear after, including the keys in `written`.
        """
        self._note_invalidation(covers)
        for key in [k for k in self._queued if covers(k)]:
            dropped = self._queued.pop(key, None)
            if dropped is not None:
                self._pending_bytes -= dropped.meta.length
        for key in [k for k in self._writing if covers(k)]:
            del self._writing[key]
        writing = {key: task for key, task in self._writers.items() if covers(key)}
        if writing:
            await asyncio.wait(writing.values())
        memory = self.memory
        dropped_entries = memory.delete_where(covers) if memory is not None else 0
        return Purged(dropped_entries, tuple(writing))

    async def drain(self) -> None:
        """Wait until every scheduled volume write has finished (or failed and been counted)."""
        while self._writers:
            await asyncio.wait(list(self._writers.values()))

    async def aclose(self) -> None:
        """Finish pending writes, then close both tiers."""
        await self.drain()
        for tier in (self.memory, self.volume):
            if tier is None:
                continue
            try:
                await tier.aclose()
            except Exception as exc:
                self.errors[tier.name] += 1
                self._logger.warning(
                    "cache tier %s failed to close: %s", tier.name, type(exc).__name__
                )

    async def _write_behind(self, volume: DurableTier, key: CacheKey) -> None:
        try:
            if self.write_delay_seconds > 0:
                await asyncio.sleep(self.write_delay_seconds)
            while (entry := self._queued.get(key)) is not None:
                # Readable from _writing from the moment it leaves _queued (no await between).
                self._writing[key] = self._queued.pop(key)
                try:
                    written = await self._call(
                        volume.name, "put", key, lambda: _done(volume.put(key, entry))
                    )
                finally:
                    self._pending_bytes -= entry.meta.length
                    if self._writing.get(key) is entry:
                        del self._writing[key]
                if written and self._after_volume_write is not None:
                    await self._notify_written(key, entry)
        finally:
            self._writers.pop(key, None)

    async def _call(
        self, tier: str, op: str, key: CacheKey, call: Callable[[], Awaitable[T]]
    ) -> T | None:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await call()
        except Exception as exc:
            self._failed(tier, op, key, exc)
            return None

    async def _notify_written(self, key: CacheKey, entry: Entry) -> None:
        assert self._after_volume_write is not None
        try:
            await self._after_volume_write(key, entry)
        except Exception as exc:
            self._failed("index", "record", key, exc)

    def _note_invalidation(self, covers: Covers, keep_body_sha256: str | None = None) -> None:
        self._seq += 1
        log = self._invalidated
        log.append((self._seq, covers, keep_body_sha256))
        if len(log) > RECENT_INVALIDATIONS:
            forgotten, _, _ = log.popleft()
            self._invalidations_forgotten_before = forgotten

    def _note_put(self, key: CacheKey) -> None:
        self._seq += 1
        self._put_at[key] = self._seq
        self._put_at.move_to_end(key)
        if len(self._put_at) > RECENT_PUTS:
            _, oldest = self._put_at.popitem(last=False)
            self._forgotten_before = oldest

    def _memory_put(self, key: CacheKey, entry: Entry) -> None:
        memory = self.memory
        if memory is None:
            return
        try:
            memory.put_nowait(key, entry)
        except Exception as exc:
            self._failed(memory.name, "put", key, exc)

    def _failed(self, tier: str, op: str, key: CacheKey, exc: Exception) -> None:
        if isinstance(exc, VolumeBusy):
            # Its call budget, not the Volume: counted apart; a busy minute would flood the log.
            self.errors[f"{tier}_busy"] += 1
            self._logger.debug("cache tier %s %s skipped for key %s: busy", tier, op, key.digest())
            return
        self.errors[tier] += 1
        # Only the exception's type: its message may carry a path built from the raw ids.
        self._logger.warning(
            "cache tier %s %s failed for key %s: %s", tier, op, key.digest(), type(exc).__name__
        )


async def _done(write: Awaitable[None]) -> bool:
    """True once `write` has finished without raising."""
    await write
    return True
