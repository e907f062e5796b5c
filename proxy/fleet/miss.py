"""FleetMiss: one new fill of this process, opened where the fleet says, committed where made.

An `Upstream` for the fill the speak handler leads (`SpeakHandler.lead`): `open` hands the miss
to the key's owner among the workers (proxy/fleet/owner.py), else takes the recording's lease
or follows the replica that holds it (proxy/fleet/follow.py), else synthesizes here; `commit`
stores what this process synthesized and copies into memory what another process made. A lease
this miss holds goes back once its recording is on the Volume (or at once without one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.fill import Fill, FlightKey
from proxy.fleet.follow import Follow, VolumeResponse
from proxy.fleet.owner import OwnerUnavailable, ask_owner
from proxy.fleet.wire import FillAsk
from proxy.identity import CURRENT_TOKEN
from proxy.index.fill_leases import flight_name
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.upstreams.base import ClosingResponse, SpeakCall, Upstream, UpstreamResponse

if TYPE_CHECKING:
    from proxy.fleet.fills import FleetFills

log = logging.getLogger(__name__)

Commit = Callable[[CacheKey, Entry], None]
MayStore = Callable[[CacheKey, str], bool]


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
        return ClosingResponse(response, self._ended)

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
