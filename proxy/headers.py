"""Every header name the proxy reads or writes, and the builders of its cache headers."""

from __future__ import annotations

import time
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.reasons import Reason
from proxy.speak import CacheKey
from proxy.storage.entry import EntryMeta, stored_header

# What the cache did (hit, miss, disabled), and which tier answered a hit.
X_TTS_CACHE: Final = istr("X-TTS-Cache")
X_TTS_CACHE_TIER: Final = istr("X-TTS-Cache-Tier")
# RFC 9211: the standard form of the same facts, under this cache's name.
CACHE_STATUS: Final = istr("Cache-Status")
CACHE_NAME: Final = "tts-cache-proxy"
# Set by providers: who synthesized, in which voice, and whether the audio is a stand-in.
X_TTS_PROVIDER: Final = istr("X-TTS-Provider")
X_TTS_VOICE: Final = istr("X-TTS-Voice")
X_TTS_FALLBACK: Final = istr("X-TTS-Fallback")
X_REQUEST_ID: Final = istr("X-Request-Id")
X_FORWARDED_FOR: Final = istr("X-Forwarded-For")
X_FORWARDED_PROTO: Final = istr("X-Forwarded-Proto")
X_FORWARDED_HOST: Final = istr("X-Forwarded-Host")
# The caller's address, as a trusted gateway names it (behind one, every request shares its own).
X_REAL_IP: Final = istr("X-Real-Ip")
# RFC 9110 7.6.3: the protocol and name this proxy adds to Via, both ways.
VIA: Final = "1.1 tts-cache-proxy"


def disabled_status(reason: Reason) -> str:
    """Cache-Status of a call forwarded without the cache (RFC 9211 2.2, 2.8): why, as a token."""
    return f"{CACHE_NAME}; fwd=bypass; detail={reason.value}"


# Built once per reason: a disabled answer copies one of these.
_DISABLED: Final[dict[Reason, dict[str, str]]] = {
    reason: {X_TTS_CACHE: "disabled", CACHE_STATUS: disabled_status(reason)} for reason in Reason
}
# The reason a disabled answer's Cache-Status names, for the access log (a lookup, no parsing).
REASON_OF_STATUS: Final[dict[str, str]] = {
    disabled_status(reason): reason.value for reason in Reason
}


def disabled_headers(reason: Reason) -> dict[str, str]:
    """The headers of a speak call forwarded without the cache, saying why."""
    return _DISABLED[reason]


def cache_headers(key: CacheKey, outcome: str, cache_status: str) -> dict[str, str]:
    """The headers that tell the client what the cache did, and where the audio lives."""
    return {
        X_TTS_CACHE: outcome,
        CACHE_STATUS: cache_status,
        hdrs.CONTENT_LOCATION: key.audio_path(),
    }


def miss_status(*, collapsed: bool, stored: bool) -> str:
    """Cache-Status of a miss (RFC 9211 2.2, 2.5, 2.6): forwarded, joined, and to be stored."""
    status = f"{CACHE_NAME}; fwd=uri-miss"
    if collapsed:
        status += "; collapsed"
    if stored:
        status += "; stored"
    return status


def hit_status(tier: str) -> str:
    """Cache-Status of a hit, naming the tier that answered."""
    return f"{CACHE_NAME}; hit; detail={tier}"


def age_of(meta: EntryMeta) -> str:
    """The Age header value of an entry, in whole seconds (RFC 9111 5.1)."""
    return str(max(0, int(time.time() - meta.created_at)))


def meta_headers(meta: EntryMeta, tier: str, *, age: bool = True) -> CIMultiDict[str]:
    """The stored headers of an entry plus its validators (and its age, unless told not to)."""
    headers: CIMultiDict[str] = CIMultiDict(meta.headers)
    headers[hdrs.CONTENT_TYPE] = meta.content_type
    headers[hdrs.ETAG] = meta.etag
    if age:
        headers[hdrs.AGE] = age_of(meta)
    headers[X_TTS_CACHE_TIER] = tier
    return headers


def hit_headers(key: CacheKey, meta: EntryMeta, tier: str) -> CIMultiDict[str]:
    """The headers of a replayed entry, without Age (which changes every second)."""
    headers = meta_headers(meta, tier, age=False)
    headers.add(hdrs.VIA, VIA)  # as on a miss: the answer came through this proxy
    headers.update(cache_headers(key, "hit", hit_status(tier)))
    make_private(headers)
    return headers


def make_private(headers: CIMultiDict[str]) -> None:
    """Mark a per-user answer `private` (RFC 9111 5.2.2.7): no shared cache may reuse it for
    another user, whatever the backend said (`public` is dropped, other directives kept)."""
    directives = [
        part.strip()
        for value in headers.getall(hdrs.CACHE_CONTROL, ())
        for part in value.split(",")
        if part.strip() and part.strip().lower() not in ("public", "private")
    ]
    headers[hdrs.CACHE_CONTROL] = ", ".join(["private", *directives])


def origin_bound(headers: CIMultiDict[str]) -> bool:
    """True when the stored CORS answer holds only for one origin (anything but `*` without
    credentials), so it may be replayed only to that origin (Fetch standard, CORS protocol)."""
    allowed = headers.get(hdrs.ACCESS_CONTROL_ALLOW_ORIGIN)
    if allowed is None:
        return False
    credentials = headers.get(hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS, "").strip().lower()
    return allowed.strip() != "*" or credentials == "true"


def for_origin(headers: CIMultiDict[str], origin: str | None) -> CIMultiDict[str]:
    """Origin-bound headers as this request may see them: the CORS headers only when `origin`
    is the one they were made for, and `Vary: Origin` either way (RFC 9110 12.5.5)."""
    out = headers.copy()
    if origin is None or origin != headers.get(hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, "").strip():
        for name in [n for n in out if n.lower().startswith("access-control-")]:
            out.popall(name, None)
    if hdrs.VARY not in out or "origin" not in out[hdrs.VARY].lower():
        out.add(hdrs.VARY, "Origin")
    return out


def replay_only(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """What a hit replays of an upstream answer: the stored headers, nothing of the exchange
    with its first client (Set-Cookie and the like)."""
    return CIMultiDict((name, value) for name, value in headers.items() if stored_header(name))
