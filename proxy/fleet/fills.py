"""FleetFills: one fill per recording across the workers of a host and across replicas.

A miss the speak handler leads (proxy/routes/speak.py, step 8) opens through a `FleetMiss`:

1. **The key's owner among the workers** (`serve --workers N`): the worker the key hashes to
   over the group's pids. Any other worker hands it the miss over the owner's socket
   (proxy/fleet/owner.py) and streams the answer into its local fill, which its own clients
   join as usual. An owner that does not take the miss within `fleet.owner_timeout_seconds`
   (gone, hung) is passed over: the worker fills the key itself (counted `owner_fallback`).
2. **The first replica to miss** (with the index and a Volume): a lease per recording in
   PostgreSQL (proxy/index/fill_leases.py). A replica that finds it held waits for the
   holder's recording and reads it from the Volume (proxy/fleet/follow.py), within
   `fleet.wait_seconds`, else fills the key itself.
3. **The upstream**, here: the recording is stored as by any fill.

A fill answered by the owner or by another replica is kept in this process's memory only (a
copy: the recording is stored once, by whoever made it). Memory hits stay each worker's own:
see docs/architecture.md ("Workers and replicas") for the measurements behind that choice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from proxy.fill import Fill, FillReader, FlightKey, Flights
from proxy.fleet.follow import StoredNotices
from proxy.fleet.group import Siblings, SiblingServer, WorkerGroup
from proxy.fleet.miss import Commit, FleetMiss, MayStore
from proxy.fleet.owner import OwnedFill, OwnerRoute
from proxy.fleet.wire import FillAsk
from proxy.index.fill_leases import FillLeases
from proxy.index.pool import IndexUnavailable
from proxy.policy import entry_matches
from proxy.speak import CacheKey
from proxy.stats import CacheStats
from proxy.storage.entry import Entry
from proxy.storage.tiered import TieredCache
from proxy.upstreams.base import SpeakCall, Upstream

log = logging.getLogger(__name__)

# fleet_fills outcomes, in the order the metrics list them.
OUTCOMES: Final = (
    "owner",
    "owner_fallback",
    "for_sibling",
    "lease",
    "followed",
    "takeover",
    "wait_timeout",
    "lease_unavailable",
)


class Lead(Protocol):
    """The speak handler's way to lead a new fill (registered in its flights, opened)."""

    def __call__(
        self, flight: FlightKey, call: SpeakCall, *, sibling: bool
    ) -> Awaitable[tuple[Fill, FillReader, Callable[[], bool] | None]]:
        """The new fill, a reader of it from its first byte, and whether it replays another's."""
        ...


class FleetFills:
    """Who leads a miss: the key's owner among the workers, the first replica, or this process."""

    def __init__(
        self,
        *,
        cache: TieredCache,
        flights: Flights,
        stats: CacheStats,
        group: WorkerGroup | None = None,
        siblings: Siblings | None = None,
        owner_timeout_seconds: float = 1.0,
        leases: FillLeases | None = None,
        wait_seconds: float = 15.0,
        pid: int | None = None,
    ) -> None:
        self.cache = cache
        self.flights = flights
        self.stats = stats
        self.group = group
        self.siblings = siblings
        self.owner_timeout = owner_timeout_seconds
        self.leases = leases
        self.wait_seconds = wait_seconds
        self.pid = os.getpid() if pid is None else pid
        self.notices = StoredNotices()
        self._lead: Lead | None = None
        self._leaders: dict[CacheKey, set[FleetMiss]] = {}
        self._work: set[asyncio.Task[None]] = set()

    def attach(self, lead: Lead) -> None:
        """The speak handler's lead, for the misses siblings hand this worker."""
        self._lead = lead

    def serve_on(self, server: SiblingServer) -> None:
        """Take the misses of the keys this worker owns from its siblings."""
        OwnerRoute(self._for_sibling, owner_timeout_seconds=self.owner_timeout).serve_on(server)

    def owner_of(self, key: CacheKey) -> int | None:
        """The pid of the worker that leads `key`'s fills; None when it is this one (or when
        there are no workers to share with)."""
        if self.group is None or self.siblings is None:
            return None
        pids = sorted([self.pid, *self.group.sibling_pids(self.pid)])
        owner = pids[int(key.digest(), 16) % len(pids)]
        return None if owner == self.pid else owner

    def miss(
        self,
        flight: FlightKey,
        *,
        sibling: bool,
        synthesizer: Upstream,
        commit: Commit,
        may_store: MayStore,
    ) -> FleetMiss:
        """How one new fill of this process opens (see FleetMiss)."""
        return FleetMiss(
            self,
            flight,
            sibling=sibling,
            synthesizer=synthesizer,
            commit=commit,
            may_store=may_store,
        )

    def stored(self, key: CacheKey, own: bool) -> None:
        """A recording of `key` reached the Volume (`own`: this process wrote it)."""
        self.notices.notify(key)
        if own:
            for miss in list(self._leaders.get(key, ())):
                miss.written()

    def count(self, outcome: str) -> None:
        """Count one fleet outcome (tts_proxy_fleet_fills_total)."""
        self.stats.fleet_fills[outcome] += 1

    def spawn(self, work: Awaitable[None]) -> None:
        """Run `work` in the background, awaited at close."""
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def aclose(self) -> None:
        """Let lease releases in flight finish (bounded)."""
        if self._work:
            await asyncio.wait(self._work, timeout=2.0)

    def hold(self, miss: FleetMiss) -> None:
        """`miss` holds its recording's lease: give it back once the recording is written."""
        self._leaders.setdefault(miss.key, set()).add(miss)

    def forget(self, miss: FleetMiss) -> None:
        """`miss` gave its lease back."""
        held = self._leaders.get(miss.key)
        if held is not None:
            held.discard(miss)
            if not held:
                del self._leaders[miss.key]

    async def _for_sibling(self, ask: FillAsk) -> OwnedFill | Entry:
        """A sibling's miss: this worker's memory, its fill in flight, or a new fill it leads."""
        self.count("for_sibling")
        key, text_sha256, provider = ask.flight
        entry = self.cache.get_memory(key)
        if entry is not None and entry_matches(entry.meta, text_sha256, provider):
            return entry
        fill = self.flights.joinable(ask.flight)
        if fill is not None:
            return OwnedFill(fill, fill.reader(), joined=lambda: True)
        if self._lead is None:
            raise RuntimeError("FleetFills.attach was not called")
        fill, reader, replayed = await self._lead(ask.flight, ask.call, sibling=True)
        return OwnedFill(fill, reader, joined=replayed or _never)


def _never() -> bool:
    return False


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except IndexUnavailable:
        log.debug("fill lease left to expire: the index did not answer")
    except Exception as exc:
        log.warning("fleet fill work failed: %s", type(exc).__name__)
