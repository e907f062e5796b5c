"""The entries pages: browse, one entry with its audio, purge with a confirmation step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from proxy.admin.api import AdminApi
from proxy.admin.entries import EntryBrowser
from proxy.admin.pages import ADMIN, SECURITY_HEADERS, AdminPages, see_other
from proxy.routes.audio import serve_entry
from proxy.speak import CacheKey
from proxy.storage.scope import BadScope, Scope

ADMIN_AUDIO_ROUTE = f"{ADMIN}/audio/{{user}}/{{thread}}/{{message}}/{{voice}}"


def admin_audio_url(key: CacheKey) -> str:
    """Where the dashboard plays an entry from."""
    parts = (key.user, key.thread_id, key.message_id, key.voice)
    return f"{ADMIN}/audio/" + "/".join(quote(part, safe="@+") for part in parts)


def entry_url(key: CacheKey) -> str:
    """The page of one entry."""
    query = {"user": key.user, "thread": key.thread_id, "message": key.message_id}
    return f"{ADMIN}/entry?" + urlencode({**query, "voice": key.voice})


def purge_url(scope: Scope) -> str:
    """The confirmation page for purging `scope`."""
    return f"{ADMIN}/purge?" + urlencode(scope.query())


@dataclass
class EntryPages:
    """Entries, one entry, purge (confirm, then POST with CSRF) and the admin audio URL."""

    pages: AdminPages
    api: AdminApi
    browser: EntryBrowser

    async def entries(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/entries?user=&thread=&message=&voice=&page=."""
        session = self.pages.guard(request)
        wanted = Scope.from_query(request.query)
        # Pages are numbered from 1 in the URL, as on the page; the browser counts from 0.
        page_text = request.query.get("page", "1")
        page = max(int(page_text) - 1, 0) if page_text.isdigit() and len(page_text) < 7 else 0
        found = await self.browser.page(wanted, page)
        removed = request.query.get("removed", "")
        confirmed = request.query.get("confirmed", "")
        expected = request.query.get("expected", "")
        context = {
            "page": "entries",
            "filter": wanted,
            "found": found,
            "entry_url": entry_url,
            "purge_url": purge_url,
            "scope_of": _scope_of,
            "removed": int(removed) if removed.isdigit() and len(removed) < 10 else None,
            # How many processes confirmed the purge, of how many ("?" when unknown).
            "confirmed": int(confirmed) if confirmed.isdigit() and len(confirmed) < 6 else None,
            "expected": expected
            if expected == "?" or (expected.isdigit() and len(expected) < 6)
            else None,
            "purge_user": purge_url(Scope(wanted.user)) if wanted.user else None,
            "purge_thread": (
                purge_url(Scope(wanted.user, wanted.thread_id))
                if wanted.user and wanted.thread_id
                else None
            ),
            "page_url": lambda n: (
                f"{ADMIN}/entries?" + urlencode({**wanted.query(), "page": n + 1})
            ),
        }
        return self.pages.render(request, "entries.html", context, session=session)

    async def entry(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/entry?user=&thread=&message=&voice=: details and the audio."""
        session = self.pages.guard(request)
        key = _key_from(request.query)
        row = await self.browser.find(key) if key is not None else None
        if key is None or row is None:
            missing = {"page": "entries", "row": None}
            return self.pages.render(request, "entry.html", missing, session=session, status=404)
        context: dict[str, Any] = {
            "page": "entries",
            "row": row,
            "audio_url": admin_audio_url(key),
            "purge_url": purge_url,
            "scope_of": _scope_of,
        }
        return self.pages.render(request, "entry.html", context, session=session)

    async def confirm_purge(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/purge?user=...: what would go, and a button to confirm."""
        session = self.pages.guard(request)
        scope = self._scope(dict(request.query))
        context = {"page": "entries", "scope": scope, "filter": scope}
        return self.pages.render(request, "purge.html", context, session=session)

    async def purge(self, request: web.Request) -> web.StreamResponse:
        """POST /_proxy/admin/purge (CSRF): remove the scope everywhere, back to the entries."""
        session = self.pages.guard(request)
        form = await self.pages.form(request, session)
        scope = self._scope(form)
        result = await self.api.purge(scope)
        self.browser.forget_scan()
        back = {"user": scope.user} if scope.thread_id is not None and scope.user else {}
        told: dict[str, int | str] = {}
        processes = result.processes
        if processes is not None and processes.expected != 1:
            # Other workers or replicas: say how many confirmed ("?" when unknown).
            expected = "?" if processes.expected is None else processes.expected
            told = {"confirmed": processes.confirmed, "expected": expected}
        query = urlencode({**back, "removed": result.removed, **told})
        return see_other(f"{ADMIN}/entries?{query}")

    async def audio(self, request: web.Request) -> web.StreamResponse:
        """GET/HEAD /_proxy/admin/audio/{user}/{thread}/{message}/{voice}, with Range and ETag."""
        self.pages.require_on()
        if self.pages.session(request) is None:
            raise web.HTTPNotFound(text="404: Not Found")
        info = request.match_info
        key = CacheKey(info["user"], info["thread"], info["message"], info["voice"])
        found = await self.api.cache.get(key) if key.valid() else None
        if found is None:
            raise web.HTTPNotFound(text="404: no such audio")
        entry, tier = found
        return serve_entry(request, entry, tier)

    def _scope(self, values: Mapping[str, str]) -> Scope:
        try:
            return Scope.parse(
                user=values.get("user") or None,
                thread_id=values.get("thread") or None,
                message_id=values.get("message") or None,
                voice=values.get("voice") or None,
            )
        except BadScope as exc:
            raise web.HTTPBadRequest(text=f"400: {exc}", headers=SECURITY_HEADERS) from None


def _key_from(values: Mapping[str, str]) -> CacheKey | None:
    get = values.get
    key = CacheKey(get("user", ""), get("thread", ""), get("message", ""), get("voice", ""))
    return key if key.valid() else None


def _scope_of(key: CacheKey, depth: str) -> Scope:
    """The purge scope of an entry's user, thread, message or voice (the entry itself)."""
    keep = {"user": 1, "thread": 2, "message": 3, "voice": 4}[depth]
    return Scope(
        key.user,
        key.thread_id if keep > 1 else None,
        key.message_id if keep > 2 else None,
        key.voice if keep > 3 else None,
    )
