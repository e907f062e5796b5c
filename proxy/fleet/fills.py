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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.fill import Fill, FillReader, FlightKey, Flights
from proxy.fleet.follow import Follow, StoredNotices, VolumeResponse
from proxy.fleet.group import Siblings, SiblingServer, WorkerGroup
from proxy.fleet.owner import OwnedFill, OwnerRoute, OwnerUnavailable, ask_owner
from proxy.fleet.wire import FillAsk
from proxy.identity import CURRENT_TOKEN
from proxy.index.fill_leases import FillLeases, flight_name
from proxy.index.pool import IndexUnavailable
from proxy.policy import entry_matches
from proxy.speak import CacheKey
from proxy.stats import CacheStats
from proxy.storage.entry import Entry
from proxy.storage.tiered import TieredCache
from proxy.upstreams.base import SpeakCall, Upstream, UpstreamResponse

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

Commit = Callable[[CacheKey, Entry], None]
MayStore = Callable[[CacheKey, str], bool]


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


class FleetMiss:
    """One new fill of this process, opened where the fleet says (an `Upstream`), and committed
    where it was made: stored here when this process synthesized it, else copied into memory."""

    def __init__(
        self,
        fills: FleetFills,
        flight: FlightKey,
        *,
        sibling: bool,
        synthesizer: Upstream,
        commit: Commit,
        may_store: MayStore,
    ) -> None:
        self.fills = fills
        self.flight = flight
        self.key = flight[0]
        # A sibling's miss is never handed on: this worker is (or was taken for) the owner.
        self.sibling = sibling
        self._synthesizer = synthesizer
        self._commit_here = commit
        self._may_store = may_store
        self._fill: Fill | None = None
        # Memory copies are checked against invalidations since this point (TieredCache).
        self._mark = fills.cache.put_mark()
        self.source = ""
        self.joined = False
        self._committed = False
        self._lease: str | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._backstop: asyncio.TimerHandle | None = None

    def adopt(self, fill: Fill) -> None:
        """The fill this miss opens (created with store_allowed, which this miss may lower)."""
        self._fill = fill

    def replayed(self) -> bool:
        """True when the fill replays another request's (the owner's or another replica's):
        its clients get what a joined client gets."""
        return self.joined

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """The response of the key's owner, of another replica's fill, or of the upstream."""
        if not self.sibling:
            answered = await self._ask_owner(call)
            if answered is not None:
                return answered
        if self.fills.leases is not None:
            followed = await self._lead_or_follow(call)
            if followed is not None:
                return followed
        return await self._synthesize(call)

    def commit(self, key: CacheKey, entry: Entry) -> None:
        """Store what this process synthesized; copy into memory what another one made."""
        if self.source == "upstream":
            self._committed = True
            self._commit_here(key, entry)
        else:
            self.fills.cache.promote(key, entry, since=self._mark)

    def written(self) -> None:
        """This process's recording of the key is on the Volume: the lease goes back."""
        if self._committed:
            self._give_back()

    async def _ask_owner(self, call: SpeakCall) -> UpstreamResponse | None:
        fills = self.fills
        owner = fills.owner_of(self.key)
        if owner is None or fills.siblings is None:
            return None
        try:
            response = await ask_owner(
                fills.siblings.session(owner),
                FillAsk(self.flight, call),
                timeout_seconds=fills.owner_timeout,
            )
        except OwnerUnavailable as exc:
            fills.count("owner_fallback")
            log.warning(
                "key %s: its owner (worker %d) did not take the miss (%s); filled here",
                self.key.digest(),
                owner,
                exc,
            )
            return None
        fills.count("owner")
        self._answered("owner", response.head.joined, stored=response.head.stored)
        return response

    async def _lead_or_follow(self, call: SpeakCall) -> UpstreamResponse | None:
        """None to synthesize here (holding the lease, or without one); a response when
        another replica's recording came."""
        fills = self.fills
        leases = fills.leases
        assert leases is not None
        key, text_sha256, provider = self.flight
        name = flight_name(key, text_sha256, provider)
        try:
            if await leases.take(name):
                fills.count("lease")
                self._hold(name)
                return None
        except IndexUnavailable:
            fills.count("lease_unavailable")
            return None
        log.debug("key %s: another replica fills it; waiting", key.digest())
        identity = call.identity
        CURRENT_TOKEN.set(identity.token if identity is not None else None)
        follow = Follow(
            key,
            text_sha256,
            provider,
            name,
            cache=fills.cache,
            leases=leases,
            notices=fills.notices,
        )
        followed = await follow.wait(fills.wait_seconds)
        fills.count(followed.outcome)
        if followed.leased:
            self._hold(name)
        if followed.found is None:
            return None
        if followed.leased:
            self._give_back()  # stored meanwhile: nothing to fill
        self._answered("volume", joined=True, stored=True)
        return VolumeResponse(followed.found)

    async def _synthesize(self, call: SpeakCall) -> UpstreamResponse:
        self.source = "upstream"
        self.fills.stats.upstream_calls += 1
        if not self._may_store(self.key, self.flight[1]):
            self._forbid_store()
        try:
            response = await self._synthesizer.open(call)
        except BaseException:
            self._give_back()
            raise
        if self._lease is None:
            return response
        return _EndWatched(response, self._ended)

    def _answered(self, source: str, joined: bool, *, stored: bool) -> None:
        self.source = source
        self.joined = joined
        if not stored:
            self._forbid_store()

    def _forbid_store(self) -> None:
        if self._fill is not None:
            self._fill.forbid_store()

    def _hold(self, name: str) -> None:
        self._lease = name
        self.fills.hold(self)
        self._renewal = asyncio.get_running_loop().create_task(self._renew(name))

    def _ended(self) -> None:
        """The fill closed its response: a lease without a recording coming goes back now;
        one whose recording is being written goes back once written, or after the write's
        bound (a failed write must not hold followers to fleet.wait_seconds)."""
        if self._lease is None:
            return
        if not self._committed:
            self._give_back()
            return
        loop = asyncio.get_running_loop()
        self._backstop = loop.call_later(self.fills.cache.timeout_seconds, self._give_back)

    def _give_back(self) -> None:
        name, self._lease = self._lease, None
        if name is None:
            return
        if self._renewal is not None:
            self._renewal.cancel()
        if self._backstop is not None:
            self._backstop.cancel()
        self.fills.forget(self)
        leases = self.fills.leases
        if leases is not None:
            self.fills.spawn(leases.release(name))

    async def _renew(self, name: str) -> None:
        """Keep the lease while the fill runs (its expiry only waits out a vanished holder)."""
        leases = self.fills.leases
        assert leases is not None
        while True:
            await asyncio.sleep(leases.seconds / 2)
            try:
                if not await leases.renew(name):
                    return
            except IndexUnavailable:
                return


class _EndWatched:
    """An upstream response that says when its fill closed it."""

    __slots__ = ("_on_close", "_response")

    def __init__(self, response: UpstreamResponse, on_close: Callable[[], None]) -> None:
        self._response = response
        self._on_close = on_close

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self._response.status

    @property
    def reason(self) -> str | None:
        """The reason phrase."""
        return self._response.reason

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        """The response headers."""
        return self._response.headers

    @property
    def upstream_seconds(self) -> float | None:
        """Time to the upstream's head."""
        return self._response.upstream_seconds

    def read_buffered(self) -> bytes:
        """The bytes that came with the head."""
        return self._response.read_buffered()

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body."""
        return self._response.iter_chunks()

    def close(self) -> None:
        """Close the response, then tell."""
        self._response.close()
        self._on_close()


def _never() -> bool:
    return False


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except IndexUnavailable:
        log.debug("fill lease left to expire: the index did not answer")
    except Exception as exc:
        log.warning("fleet fill work failed: %s", type(exc).__name__)
