"""This process's place in the fleet, from its settings: its name, its buses, its fills."""

from __future__ import annotations

import os
from collections.abc import Callable

from proxy.fill import Flights
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.fills import FleetFills
from proxy.fleet.group import Siblings, SiblingServer, WorkerGroup, new_token, process_name
from proxy.fleet.local import LocalInvalidations
from proxy.fleet.postgres import PostgresBus
from proxy.fleet.view import GroupView, Sampler
from proxy.index.entries import PostgresIndex
from proxy.index.fill_leases import FillLeases
from proxy.index.recorder import EntryRecorder
from proxy.settings import Settings
from proxy.speak import CacheKey
from proxy.stats import CacheStats
from proxy.storage.entry import Entry
from proxy.storage.tiered import AfterVolumeWrite, TieredCache

GAP_REASON = "the PostgreSQL invalidation channel was down, so invalidations may have been missed"


async def start_broadcast(
    settings: Settings,
    *,
    cache: TieredCache,
    flights: Flights,
    group: WorkerGroup | None,
    index: PostgresIndex | None,
) -> Broadcast:
    """The broadcast of this process: to its group's workers over their sockets, and, with an
    index, to every process on it over PostgreSQL (listening before this returns, or retrying
    in the background after `index.timeout_seconds`)."""
    pid = os.getpid()
    process = group.name_of(pid) if group is not None else process_name(new_token(), pid)
    local = LocalInvalidations(cache, flights, index=index)
    bus: PostgresBus | None = None
    if index is not None:

        async def gap() -> None:
            await local.flush(GAP_REASON)

        bus = PostgresBus(index.pool, process=process, on_message=local.apply, on_gap=gap)
        await bus.start(wait_seconds=settings.index.timeout_seconds)
    return Broadcast(
        local,
        process=process,
        confirm_timeout_seconds=settings.fleet.confirm_timeout_seconds,
        group=group,
        siblings=Siblings(group) if group is not None else None,
        bus=bus,
    )


def group_view(settings: Settings, sampler: Sampler, broadcast: Broadcast) -> GroupView:
    """The numbers of this process's group (this process alone without one)."""
    return GroupView(
        sampler,
        group=broadcast.group,
        siblings=broadcast.siblings,
        timeout_seconds=settings.fleet.confirm_timeout_seconds,
    )


def after_volume_write(
    broadcast: Callable[[], Broadcast | None], recorder: EntryRecorder | None
) -> AfterVolumeWrite:
    """After a Volume write: a notice to the other processes, which drop an older recording of
    the key they may hold (and to this one's fills, which give the key's lease back), then the
    index row (`EntryRecorder`)."""

    async def record(key: CacheKey, entry: Entry) -> None:
        told = broadcast()
        if told is not None:  # first: an index that fails must not keep the notice back
            told.stored(key, entry.meta.body_sha256)
        if recorder is not None:
            await recorder(key, entry)

    return record


def fleet_fills(
    settings: Settings,
    *,
    cache: TieredCache,
    flights: Flights,
    stats: CacheStats,
    broadcast: Broadcast,
    index: PostgresIndex | None,
) -> FleetFills | None:
    """One fill per key for this process's workers (their sockets) and replicas (a lease in
    PostgreSQL, with a Volume to read the leader's recording from); None when neither applies."""
    fleet = settings.fleet
    group = broadcast.group if fleet.worker_fills and broadcast.siblings is not None else None
    bus = broadcast.bus
    leases = None
    if fleet.replica_fills and index is not None and bus is not None and cache.volume is not None:
        # Named as the process's invalidation session names itself: alive while it listens.
        leases = FillLeases(index.pool, holder=bus.application_name)
    if group is None and leases is None:
        return None
    fills = FleetFills(
        cache=cache,
        flights=flights,
        stats=stats,
        group=group,
        siblings=broadcast.siblings if group is not None else None,
        owner_timeout_seconds=fleet.owner_timeout_seconds,
        leases=leases,
        wait_seconds=fleet.wait_seconds,
    )
    broadcast.local.stored_listeners.append(fills.stored)
    return fills


def serve_group(
    server: SiblingServer, broadcast: Broadcast, view: GroupView, fills: FleetFills | None
) -> None:
    """The routes a worker answers its siblings on: invalidations, its numbers, its keys' fills."""
    broadcast.serve_on(server)
    view.serve_on(server)
    if fills is not None and fills.group is not None:
        fills.serve_on(server)
