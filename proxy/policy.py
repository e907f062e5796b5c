"""The caching rules, pure and without I/O: what is cacheable, what is storable, what matches.

Each rule takes plain values (the parsed speak call, the upstream's head, a stored entry's
metadata) and answers yes or no; the handler and the fill ask, and do the I/O themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final

from cachetools import TTLCache

from proxy.contracts import Contract, legacy_contract
from proxy.headers import X_TTS_FALLBACK, X_TTS_PROVIDER
from proxy.reasons import Reason
from proxy.settings import Settings
from proxy.speak import SHARED_USER, CacheKey, SpeakRequest, valid_id
from proxy.storage.entry import EntryMeta

# How long a request counts towards cache.min_uses, and how many keys are counted at once.
USE_WINDOW_SECONDS: Final = 86_400.0
MAX_COUNTED_KEYS: Final = 100_000
# The legacy contract with the default settings: what `cacheable_key` judges by.
_LEGACY: Final = legacy_contract("/api/tts/speak", Settings())


def cacheable_key(
    speak: SpeakRequest, user: str | None, *, max_text_chars: int = 0
) -> CacheKey | None:
    """The message key of a legacy call that may be cached, else None (`decide` says why)."""
    if not user:
        return None
    decided = decide(
        _LEGACY, speak, user, text_sha256=speak.text_sha256(), max_text_chars=max_text_chars
    )
    return None if isinstance(decided, Reason) or decided.is_content else decided


def decide(
    contract: Contract,
    speak: SpeakRequest,
    user: str,
    *,
    text_sha256: str,
    max_text_chars: int,
) -> CacheKey | Reason:
    """The key of a speak call from a believed `user`, or the reason it may not be cached.

    Cacheable: the save flag `true` (or no such field and the route's `save_by_default`; any
    other value present is a refusal, and always wins), a body the contract can key, a text
    that is not blank and not longer than `max_text_chars` (0: no limit; long texts such as
    LLM replies are rarely replayed), and every key part a safe path segment. With both ids the
    key is the message's (as the legacy plan keys it; one id alone is refused); with neither,
    the content key:
    (user, or the shared scope, text sha256, voice plus a hash of the route, the provider named
    and every other declared field). The checks run in the order `Reason` lists them.
    """
    if speak.save_said:
        if not speak.save_to_volume:
            return Reason.SAVE_OFF
    elif not contract.save_by_default:
        return Reason.SAVE_DEFAULT_OFF
    if speak.problem is not None:
        return speak.problem
    if not speak.text.strip():
        return Reason.NO_TEXT
    if max_text_chars > 0 and len(speak.text) > max_text_chars:
        return Reason.TEXT_TOO_LONG
    if speak.message_id is not None or speak.thread_id is not None:
        if not (speak.message_id and speak.thread_id):
            return Reason.INVALID_ID  # one id without the other names no message
        key = CacheKey(user, speak.thread_id, speak.message_id, speak.voice)
        # The thread strictly a valid id: "_text" is the content keys' folder, not a thread.
        return key if key.valid() and valid_id(speak.thread_id) else Reason.INVALID_ID
    owner = SHARED_USER if contract.scope == "shared" else user
    key = CacheKey.content(owner, text_sha256, contract.variant(speak))
    return key if key.valid() else Reason.INVALID_ID


def storable_head(
    status: int,
    headers: Mapping[str, str],
    *,
    wanted_provider: str | None,
    max_entry_bytes: int,
) -> bool:
    """True when an upstream answer with this status and these headers may become an entry.

    Only a clean 200 of audio is stored: no content coding (RFC 9110 8.4: the entry is replayed as
    is to clients that may not accept it), a declared length within `max_entry_bytes`, never a
    stand-in (another provider's or another voice's audio, `X-TTS-Fallback`), and, when the call
    named a provider, audio from that provider. The body's own end is judged by the fill.
    """
    content_type = headers.get("Content-Type", "").lower()
    encoding = headers.get("Content-Encoding", "identity").lower()
    length = headers.get("Content-Length")
    if status != 200 or not content_type.startswith("audio/"):
        return False
    if encoding != "identity":
        return False
    if length is not None and (not length.isdigit() or int(length) > max_entry_bytes):
        return False
    if X_TTS_FALLBACK in headers:
        return False
    used = headers.get(X_TTS_PROVIDER, "").strip().lower() or None
    return not (wanted_provider is not None and used != wanted_provider)


def entry_matches(meta: EntryMeta, text_sha256: str, provider: str | None) -> bool:
    """True when a stored entry was made from this text, and by the provider asked for, if any.

    An edited message (another text under the same key) is another recording: a miss.
    """
    return recording_matches(meta.text_sha256, meta.provider, text_sha256, provider)


def recording_matches(
    stored_text_sha256: str, stored_provider: str | None, text_sha256: str, provider: str | None
) -> bool:
    """entry_matches on the two fields it reads, wherever they were read from (the index)."""
    if stored_text_sha256 != text_sha256:
        return False
    return provider is None or stored_provider == provider


class Admission:
    """Counts requests per key and text; a fill may store from the `min_uses`-th within a day."""

    def __init__(self, *, min_uses: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_uses = min_uses
        self._uses: TTLCache[tuple[CacheKey, str], int] | None = (
            TTLCache(maxsize=MAX_COUNTED_KEYS, ttl=USE_WINDOW_SECONDS, timer=clock)
            if min_uses > 1
            else None
        )

    def count_use(self, key: CacheKey, text_sha256: str) -> bool:
        """Count one more request; True once it has been asked for `min_uses` times."""
        if self._uses is None:
            return True
        pair = (key, text_sha256)
        uses = self._uses.get(pair, 0) + 1
        self._uses[pair] = uses
        return uses >= self.min_uses
