"""The app's typed state: the keys its parts are kept under, and `get_state`."""

from __future__ import annotations

from typing import Final, TypeVar

from aiohttp import web

from proxy.admin.api import AdminApi
from proxy.admin.entries import EntryBrowser
from proxy.admin.history import History
from proxy.config import Settings
from proxy.contracts import Contract
from proxy.fill import Flights
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.fills import FleetFills
from proxy.fleet.group import WorkerGroup
from proxy.fleet.view import GroupView
from proxy.identity import IdentityResolver
from proxy.index.backfill import IndexBackfill
from proxy.index.entries import PostgresIndex
from proxy.index.legacy import LegacyMessages
from proxy.index.lookup import IndexLookup
from proxy.index.recorder import EntryRecorder
from proxy.janitor import Janitor
from proxy.limits import ClientLimit, UpstreamSlots
from proxy.metrics import Metrics
from proxy.readiness import Readiness
from proxy.request_context import Handler
from proxy.routes.audio import AudioUrl
from proxy.routes.passthrough import Passthrough
from proxy.routes.speak import SpeakHandler
from proxy.stats import CacheStats
from proxy.storage.disk import DiskGuard
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import DurableTier
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.providers import ProviderChain

SETTINGS: Final = web.AppKey("settings", Settings)
IDENTITY: Final = web.AppKey("identity", IdentityResolver)
STATS: Final = web.AppKey("stats", CacheStats)
FLIGHTS: Final = web.AppKey("flights", Flights)
UPSTREAM: Final = web.AppKey("upstream", HttpUpstream)
PASSTHROUGH: Final = web.AppKey("passthrough", Passthrough)
CACHE: Final = web.AppKey("cache", TieredCache)
INDEX: Final = web.AppKey("index", PostgresIndex)
LEGACY: Final = web.AppKey("legacy", LegacyMessages)
VOLUME: Final = web.AppKey("volume", DurableTier)
SPEAK_HANDLER: Final = web.AppKey("speak_handler", SpeakHandler)
AUDIO_URL: Final = web.AppKey("audio_url", AudioUrl)
ADMIN_API: Final = web.AppKey("admin_api", AdminApi)
ENTRY_BROWSER: Final = web.AppKey("entry_browser", EntryBrowser)
SYNTHESIZER: Final = web.AppKey("synthesizer", ProviderChain)
JANITOR: Final = web.AppKey("janitor", Janitor)
DISK_GUARD: Final = web.AppKey("disk_guard", DiskGuard)
HISTORY: Final = web.AppKey("history", History)
METRICS: Final = web.AppKey("metrics", Metrics)
READINESS: Final = web.AppKey("readiness", Readiness)
SLOTS: Final = web.AppKey("slots", UpstreamSlots)
CLIENT_LIMIT: Final = web.AppKey("client_limit", ClientLimit)
RECORDER: Final = web.AppKey("recorder", EntryRecorder)
INDEX_LOOKUP: Final = web.AppKey("index_lookup", IndexLookup)
BACKFILL: Final = web.AppKey("backfill", IndexBackfill)
GROUP: Final = web.AppKey("group", WorkerGroup)
BROADCAST: Final = web.AppKey("broadcast", Broadcast)
GROUP_VIEW: Final = web.AppKey("group_view", GroupView)
FLEET_FILLS: Final = web.AppKey("fleet_fills", FleetFills)

T = TypeVar("T")


def get_state(app: web.Application, key: web.AppKey[T]) -> T:
    """The app's state under `key`, or a clear error when its setup did not run."""
    try:
        return app[key]
    except KeyError:
        raise RuntimeError(f"{key!r} is not set up: was the app built by create_app?") from None


class SpeakRoute:
    """The speak routes' handler: the speak handler, which is built at start (see lifecycles)."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: SpeakHandler | None = None

    def handler_for(self, contract: Contract) -> Handler:
        """The handler of one speak route: the speak handler, told the route's contract."""

        async def handle(request: web.Request) -> web.StreamResponse:
            target = self.target
            if target is None:
                raise RuntimeError("the speak handler is not set up: did the app start?")
            return await target.handle(request, contract)

        return handle


SPEAK_ROUTE: Final = web.AppKey("speak_route", SpeakRoute)
