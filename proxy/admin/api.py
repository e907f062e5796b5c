"""The admin API: purge entries, read statistics."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.admin.auth import refuse
from proxy.admin.guard import AdminGuard
from proxy.fill import Flights
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.view import GroupSample, GroupView, Sampler
from proxy.index.entries import PostgresIndex
from proxy.index.pool import IndexUnavailable
from proxy.janitor import Janitor
from proxy.ownership import OwnershipCheck
from proxy.purge import PurgeResult, purge
from proxy.routes.responses import json_error
from proxy.stats import CacheStats
from proxy.storage.disk import DiskGuard
from proxy.storage.scope import BadScope, Scope
from proxy.storage.tiered import TieredCache
from proxy.walk_ledger import VolumeSummary

log = logging.getLogger(__name__)

API_PREFIX = "/_proxy/admin/api"


@dataclass(frozen=True)
class AdminApi:
    """What the admin endpoints read and change."""

    token: str
    cache: TieredCache
    flights: Flights
    index: PostgresIndex | None
    stats: CacheStats
    guard: AdminGuard
    ownership: OwnershipCheck | None = None
    janitor: Janitor | None = None
    disk_guard: DiskGuard | None = None
    # Entries, bytes and largest users from a brief-cached Volume scan, for when no index knows
    # them (None where a walk for them costs too much).
    volume_totals: Callable[[], Awaitable[VolumeSummary | None]] | None = None
    # The other workers and replicas: told of purges, and summed into the statistics.
    broadcast: Broadcast | None = None
    view: GroupView | None = None

    async def purge_entries(self, request: web.Request) -> web.Response:
        """DELETE /_proxy/admin/api/entries?user=&thread=&message=&voice= (or all=true)."""
        if (refused := refuse(request, self.token, self.guard)) is not None:
            return refused
        query = request.query
        try:
            scope = Scope.parse(
                user=query.get("user"),
                thread_id=query.get("thread"),
                message_id=query.get("message"),
                voice=query.get("voice"),
                everything=query.get("all", "").lower() == "true",
            )
        except BadScope as exc:
            return json_error(400, str(exc))
        result = await self.purge(scope)
        return web.json_response(result.to_json())

    async def purge(self, scope: Scope) -> PurgeResult:
        """Remove `scope` here, from the Volume and the index, and from every other process."""
        return await purge(
            scope,
            cache=self.cache,
            flights=self.flights,
            index=self.index,
            ownership=self.ownership,
            broadcast=self.broadcast,
        )

    async def read_stats(self, request: web.Request) -> web.Response:
        """GET /_proxy/admin/api/stats: entries and bytes per tier, outcomes, top users."""
        if (refused := refuse(request, self.token, self.guard)) is not None:
            return refused
        return web.json_response(await self.snapshot())

    async def group_sample(self, *, detail: bool = False) -> GroupSample:
        """The counters of every worker of this `serve` (this process alone without workers)."""
        view = self.view or GroupView(Sampler(self.stats, self.cache, self.index, self.janitor))
        return await view.sample(detail=detail)

    async def snapshot(self, group: GroupSample | None = None) -> dict[str, Any]:
        """The statistics as JSON-ready data (also what the dashboard shows): counters and
        memory summed over the workers, the Volume (shared) read once."""
        if group is None:
            group = await self.group_sample()
        sample = group.sample
        tiers: dict[str, Any] = {
            "memory": {"entries": sample.memory_entries, "bytes": sample.memory_bytes}
        }
        top_users: list[dict[str, Any]] = []
        if self.index is not None:
            try:
                summary = await self.index.stats()
            except IndexUnavailable:
                tiers["volume"] = {"entries": None, "bytes": None, "source": "unavailable"}
            else:
                tiers["volume"] = {
                    "entries": summary.entries,
                    "bytes": summary.bytes,
                    "source": "index",
                }
                top_users = [
                    {"user": u.user, "entries": u.entries, "bytes": u.bytes}
                    for u in summary.top_users
                ]
        if "volume" not in tiers and self.janitor is not None and self.janitor.last_walk:
            walk = self.janitor.last_walk
            tiers["volume"] = {"entries": walk.entries, "bytes": walk.bytes, "source": "walk"}
            top_users = [
                {"user": user, "entries": entries, "bytes": size}
                for user, entries, size in walk.top_users
            ]
        if tiers.get("volume", {}).get("source") in (None, "walk") and self.volume_totals:
            # Without an index the janitor walks every few minutes; the totals everyone reads
            # (stats, metrics, dashboard) come from the same scan, at most seconds old.
            totals = await self.volume_totals()
            if totals is not None:
                scanned = {"entries": totals.entries, "bytes": totals.bytes, "source": "scan"}
                tiers["volume"] = scanned
                top_users = [
                    {"user": user, "entries": entries, "bytes": size}
                    for user, entries, size in totals.top_users
                ]
        return {
            "processes": group.describe(),
            "tiers": tiers,
            "requests": {
                "hits": dict(sample.hits),
                "misses": sample.misses,
                "coalesced": sample.coalesced,
                "disabled": sample.disabled,
                "stored": sample.stored,
                "upstream_calls": sample.upstream_calls,
            },
            "errors": {kind: n for kind, n in sample.errors.items() if n},
            "top_users": top_users,
            "janitor": self._janitor_json(),
            "disk": None
            if self.disk_guard is None or not self.disk_guard.enabled
            else {
                "free_bytes": self.disk_guard.free_bytes,
                "admitting": self.disk_guard.admitting(),
            },
        }

    def _janitor_json(self) -> dict[str, Any] | None:
        if self.janitor is None:
            return None
        report = self.janitor.last_report
        return {
            "runs": self.janitor.runs,
            "errors": self.janitor.errors,
            "last_run": None if report is None else dataclasses.asdict(report),
        }
