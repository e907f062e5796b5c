"""Every header name the proxy reads or writes, and the builders of its cache headers."""

from __future__ import annotations

import time
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDict, istr

from proxy.speak import CacheKey
from proxy.storage.entry import EntryMeta

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
# RFC 9110 7.6.3: the protocol and name this proxy adds to Via, both ways.
VIA: Final = "1.1 tts-cache-proxy"

DISABLED: Final[dict[str, str]] = {
    X_TTS_CACHE: "disabled",
    CACHE_STATUS: f"{CACHE_NAME}; fwd=bypass",
}


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
    headers.update(cache_headers(key, "hit", hit_status(tier)))
    return headers
