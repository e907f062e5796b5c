"""The speak handler: serve cacheable speak calls from the tiers, fill misses once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from aiohttp import hdrs, web

from proxy.config import Settings
from proxy.contracts import Contract, speak_contracts
from proxy.fill import Fill, FillReader, FlightKey, Flights
from proxy.fleet.fills import FleetFills
from proxy.headers import (
    disabled_headers,
)
from proxy.identity import CURRENT_TOKEN, IdentityResolver
from proxy.index.entries import PostgresIndex
from proxy.index.lookup import IndexLookup
from proxy.janitor import Janitor
from proxy.ownership import OwnershipCheck
from proxy.policy import Admission, decide, entry_matches
from proxy.reasons import Reason
from proxy.request_context import (
    CACHE_KEY,
    request_id,
)
from proxy.routes.bodies import BodyTimedOut, BodyTooLarge, body_timed_out, read_request_body
from proxy.routes.hits import HitReplay, send_stream
from proxy.routes.miss import stream_fill
from proxy.routes.passthrough import Passthrough
from proxy.routes.responses import json_error
from proxy.speak import CacheKey, SpeakRequest, parse_json_object
from proxy.stats import CacheStats
from proxy.storage.disk import DiskGuard
from proxy.storage.entry import Entry, EntryMeta
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import EntryStream
from proxy.upstreams.base import SpeakCall, Upstream
from proxy.upstreams.http import outgoing_headers

log = logging.getLogger(__name__)


# Parsed bodies remembered at once, and the largest body remembered: ~1.5 KiB each, ~2 MiB in all
# (counted in the resident memory the replay benchmark reports).
PARSED_ENTRIES: Final = 1024
PARSED_BODY_LIMIT: Final = 2048


class ParsedSpeak(NamedTuple):
    """A speak body read once: its JSON, its fields, its key for this user or why it has none."""

    document: dict[str, Any] | None
    speak: SpeakRequest | None
    key: CacheKey | Reason
    text_sha256: str

    def matches(self, meta: EntryMeta) -> bool:
        """True when a stored entry was made from this text (and by the provider asked for)."""
        provider = self.speak.provider if self.speak is not None else None
        return entry_matches(meta, self.text_sha256, provider)


@dataclass(frozen=True)
class SpeakHandler:
    """The speak handler: everything the interception needs, built once at start."""

    settings: Settings
    identity: IdentityResolver
    cache: TieredCache
    flights: Flights
    passthrough: Passthrough
    synthesizer: Upstream
    """Who answers a legacy contract's miss: upstream.kind's synthesizer."""
    stats: CacheStats
    direct: Upstream | None = None
    """Who answers any other contract's miss: upstream.url (None: the synthesizer)."""
    index: PostgresIndex | None = None
    index_lookup: IndexLookup | None = None
    ownership: OwnershipCheck | None = None
    admission: Admission | None = None
    disk_guard: DiskGuard | None = None
    janitor: Janitor | None = None
    fleet: FleetFills | None = None
    _hits: HitReplay = field(default_factory=HitReplay, init=False, repr=False)
    _parsed: dict[tuple[str, str, bytes], ParsedSpeak] = field(
        default_factory=dict, init=False, repr=False
    )
    # The routes whose misses `direct` answers (the route travels with a miss another worker
    # hands this one only as its path).
    _direct_paths: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._direct_paths.update(
            c.path for c in speak_contracts(self.settings) if c.synthesizer == "http"
        )
        if self.fleet is not None:
            self.fleet.attach(self.lead)  # the misses other workers hand this one

    async def handle(self, request: web.Request, contract: Contract) -> web.StreamResponse:
        """Answer a POST to a speak route: hit, joined or new fill, or forwarded untouched."""
        if contract.identity == "none":
            return await self._disabled(request, Reason.IDENTITY_OFF)
        # 1. the body, bounded
        limit = self.settings.tts.max_body_bytes
        content = request.content
        if content.is_eof():
            # The whole body came with the headers, as a speak call's small JSON does: take it
            # without the two awaits and the copy of request.read().
            body = content.read_nowait()
            if len(body) > limit:
                return json_error(413, f"request body is larger than {limit} bytes")
        else:
            try:
                body = await read_request_body(
                    request,
                    limit,
                    idle_seconds=self.settings.server.body_idle_timeout_seconds,
                    total_seconds=self.settings.tts.body_timeout_seconds,
                )
            except BodyTooLarge:
                return json_error(413, f"request body is larger than {limit} bytes")
            except BodyTimedOut:
                self.stats.errors["body_timeout"] += 1
                return await body_timed_out(request)
        # 2-4. what is asked, by whom, and whether it may be cached
        identity = self.identity.identify(request, mode=contract.identity)
        if isinstance(identity, Reason):
            return await self._disabled(request, identity, body)
        parsed = self._parse(contract, body, identity.user)
        key = parsed.key
        if isinstance(key, Reason):
            return await self._disabled(request, key, body)
        if (
            self.ownership is not None
            and not key.is_content
            and not await self.ownership.allows(key)
        ):
            # fail closed: what cannot be verified is neither served nor stored (a content key
            # names no message: it is the user's by construction)
            return await self._disabled(request, Reason.OWNERSHIP_UNCONFIRMED, body)
        request[CACHE_KEY] = key  # for the access log's hash of the key
        document, speak, text_sha = parsed.document, parsed.speak, parsed.text_sha256
        assert document is not None and speak is not None  # a key comes from a read body

        # 5. memory: the hot path, with no await unless an index records the hit
        entry = self.cache.get_memory(key)
        if entry is not None and parsed.matches(entry.meta):
            if self.index is None:
                self.stats.hits["memory"] += 1
                if self.janitor is not None:
                    self.janitor.record_hit(key)
            else:
                await self._note_hit(key, "memory")
            return self._hits.replay(request, key, entry, "memory")
        # 6. a fill in flight for this very call: joined without asking the Volume (what the
        # fill brings is as fresh, and a burst of one message waits on no lookup)
        flight: FlightKey = (key, text_sha, speak.provider)
        fill = self.flights.joinable(flight)
        if fill is None:
            # 7. the Volume, as this user where the Volume acts as the user; with lookups through
            # the index, only when the index does not say that no such recording is stored
            # (proxy/index/lookup.py: a wrong "absent" costs a synthesis, never wrong audio)
            CURRENT_TOKEN.set(identity.token if identity else None)
            mark = self.cache.put_mark()
            lookup = self.index_lookup
            if lookup is None or await lookup.may_be_stored(key, text_sha, speak.provider):
                found = await self.cache.open_volume(key)
                served = await self._volume_hit(request, key, parsed, found, mark)
                if served is not None:
                    return served
            fill = self.flights.joinable(flight)  # one may have started during the lookup
            if fill is None and self.cache.put_since(key, mark):
                # One fill per key: a fill that started and committed while this lookup was out
                # left the flight table with its entry readable in this process (TieredCache),
                # or, once written, in the Volume; this request is served what it stored.
                served = await self._stored_since(request, key, parsed)
                if served is not None:
                    return served
                fill = self.flights.joinable(flight)
        # 8. one fill per key (with FleetFills, one per key among the workers and replicas)
        collapsed = fill is not None
        replayed = None
        if fill is None:
            # The upstream gets plain values: the request itself stays here, at the edge.
            headers = outgoing_headers(request, self.identity.forwardable_headers(request))
            headers.popall(hdrs.CONTENT_LENGTH, None)  # the upstream frames the body it sends
            call = SpeakCall(
                raw_path=request.raw_path,
                headers=headers,
                request_id=request_id(request),
                body=contract.upstream_body(
                    body, document, keep_save=self.settings.tts.forward_save_to_volume
                ),
                speak=speak,
                identity=identity,
            )
            fill, reader, replayed = await self.lead(flight, call)
        else:
            self.stats.coalesced += 1
            log.debug("miss %s: joined a fill", key.digest())
            reader = fill.reader()
        return await stream_fill(request, fill, reader, key, collapsed=collapsed, replayed=replayed)

    async def lead(
        self, flight: FlightKey, call: SpeakCall, *, sibling: bool = False
    ) -> tuple[Fill, FillReader, Callable[[], bool] | None]:
        """A new fill for `flight`, registered and opened (through FleetFills, with a fleet): the
        fill, a reader from its first byte, and whether it replays another process's fill (known
        once its head is in). `sibling`: another worker's miss (its client is counted there)."""
        key, text_sha, _ = flight
        upstream = self._synthesizer_for(call.raw_path)
        on_commit, store_allowed, replayed, route = self._commit, True, None, None
        if self.fleet is None:
            self.stats.upstream_calls += 1
            store_allowed = self._may_store(key, text_sha)
        else:  # the upstream call and the admission count where the recording is made
            route = self.fleet.miss(
                flight,
                sibling=sibling,
                synthesizer=upstream,
                commit=self._commit,
                may_store=self._may_store,
            )
            upstream, on_commit, replayed = route, route.commit, route.replayed
        fill = Fill(
            key,
            call,
            text_sha256=text_sha,
            max_entry_bytes=self.settings.cache.max_entry_bytes,
            on_commit=on_commit,
            store_allowed=store_allowed,
        )
        if route is not None:
            route.adopt(fill)
        if not sibling:
            self.stats.misses += 1
        log.debug("miss %s: fill started", key.digest())
        # The reader first: whatever came with the head is then this client's too, even
        # when it already makes the fill too large to join.
        reader = fill.reader()
        try:
            await self.flights.lead(flight, fill, upstream)
        except BaseException:
            reader.close()
            raise
        return fill, reader, replayed

    async def _disabled(
        self, request: web.Request, reason: Reason, body: bytes | None = None
    ) -> web.StreamResponse:
        """Forward the call untouched, saying why it was not cached."""
        self.stats.disabled += 1
        log.debug("disabled: %s", reason.value)
        headers = self.identity.forwardable_headers(request)
        return await self.passthrough.forward(
            request, headers, body, extra_headers=disabled_headers(reason)
        )

    def _synthesizer_for(self, raw_path: str) -> Upstream:
        """Who answers a miss on this route: the backend as is (`direct`) for a contract whose
        synthesizer is "http", else the synthesizer (the backend or the providers)."""
        path = raw_path.partition("?")[0]
        direct = self.direct
        if direct is not None and path in self._direct_paths:
            return direct
        return self.synthesizer

    async def _volume_hit(
        self,
        request: web.Request,
        key: CacheKey,
        parsed: ParsedSpeak,
        found: Entry | EntryStream | None,
        mark: int,
    ) -> web.StreamResponse | None:
        """The Volume's answer served when it matches the request; None to go on to a fill."""
        if isinstance(found, Entry):
            if parsed.matches(found.meta):
                await self._note_hit(key, "volume")
                log.debug("hit %s in the volume", key.digest())
                return self._hits.replay(request, key, found, "volume")
        elif found is not None:
            if parsed.matches(found.meta):
                return await self._stream_hit(request, key, found, mark)
            await found.aclose()
        return None

    async def _stored_since(
        self, request: web.Request, key: CacheKey, parsed: ParsedSpeak
    ) -> web.StreamResponse | None:
        """What a fill stored during this request's Volume lookup: from memory, else the Volume."""
        entry = self.cache.get_memory(key)
        if entry is not None:
            if not parsed.matches(entry.meta):
                return None
            await self._note_hit(key, "memory")
            return self._hits.replay(request, key, entry, "memory")
        mark = self.cache.put_mark()
        return await self._volume_hit(request, key, parsed, await self.cache.open_volume(key), mark)

    async def _stream_hit(
        self, request: web.Request, key: CacheKey, stream: EntryStream, mark: int
    ) -> web.StreamResponse:
        """A Volume hit sent as it is read (`send_stream`)."""
        await self._note_hit(key, "volume")
        return await send_stream(request, key, stream, self.cache, mark)

    async def _note_hit(self, key: CacheKey, tier: str) -> None:
        """Count a hit, and tell the index (or the janitor) that the entry was used."""
        self.stats.hits[tier] += 1
        if self.index is not None:
            await self.index.touch(key)
        elif self.janitor is not None:
            self.janitor.record_hit(key)

    def _parse(self, contract: Contract, body: bytes, user: str) -> ParsedSpeak:
        """What a body asks for, from whom; remembered, since replays send the same bytes."""
        memo_key = (contract.path, user, body)
        parsed = self._parsed.get(memo_key)
        if parsed is not None:
            return parsed
        document = parse_json_object(body)
        speak = None
        key: CacheKey | Reason = Reason.NOT_JSON
        text_sha = ""
        if document is not None:
            speak = contract.read(document)
            text_sha = contract.text_sha256(speak.text)
            key = decide(
                contract,
                speak,
                user,
                text_sha256=text_sha,
                max_text_chars=self.settings.cache.max_text_chars,
            )
        parsed = ParsedSpeak(document, speak, key, text_sha)
        if len(body) <= PARSED_BODY_LIMIT:
            if len(self._parsed) >= PARSED_ENTRIES:
                self._parsed.clear()
            self._parsed[memo_key] = parsed
        return parsed

    def _may_store(self, key: CacheKey, text_sha: str) -> bool:
        """Whether a new fill may be stored: admitted (which counts a use), and disk to spare."""
        if self.admission is not None and not self.admission.count_use(key, text_sha):
            return False
        if self.disk_guard is not None and not self.disk_guard.admitting():
            self.stats.errors["disk_full"] += 1  # low disk: serve, do not fill it further
            return False
        return True

    def _commit(self, key: CacheKey, entry: Entry) -> None:
        self.stats.stored += 1
        self.cache.put(key, entry)
        log.debug("stored %s (%d bytes)", key.digest(), entry.meta.length)
