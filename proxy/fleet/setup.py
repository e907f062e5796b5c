"""This process's place in the fleet, from its settings: its name, its buses, its broadcast."""

from __future__ import annotations

import os

from proxy.fill import Flights
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.group import Siblings, WorkerGroup, new_token, process_name
from proxy.fleet.local import LocalInvalidations
from proxy.fleet.postgres import PostgresBus
from proxy.fleet.view import GroupView, Sampler
from proxy.index.entries import PostgresIndex
from proxy.settings import Settings
from proxy.storage.tiered import TieredCache

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
