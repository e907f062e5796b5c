"""One JSON line per request (logger `proxy.access`), written after the response by aiohttp."""

from __future__ import annotations

import logging
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.config import Settings
from proxy.headers import (
    CACHE_STATUS,
    REASON_OF_STATUS,
    X_REQUEST_ID,
    X_TTS_CACHE,
    X_TTS_CACHE_TIER,
)
from proxy.log_lines import LineWriter
from proxy.request_context import CACHE_KEY, REQUEST_ID, UPSTREAM_SECONDS
from proxy.speak import CacheKey
from proxy.state import STATS
from proxy.stats import CacheStats

ACCESS_LOGGER: Final = "proxy.access"
AUDIO_PREFIX: Final = "/_proxy/audio/"
# Our own routes whose paths carry ids: logged as their template, never with the ids.
OWN_PREFIX: Final = "/_proxy/"

log = logging.getLogger(__name__)


class AccessLogger(AbstractAccessLogger):
    """Logs a request without its text, token or ids, and times speak responses by outcome.

    aiohttp makes one per connection and calls `log` once per request, after the response: it
    takes the line's plain values and hands them to the writer thread, which makes the line
    (`access_line`) with the rest of its batch: a few microseconds on the event loop.
    """

    __slots__ = ("_app", "_stats", "_writer")

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        # The CLI's writer takes the line's values directly: a LogRecord per request costs more
        # than the rest of the line.
        handlers = logger.handlers
        direct = len(handlers) == 1 and not logger.propagate
        self._writer = handlers[0] if direct and isinstance(handlers[0], LineWriter) else None
        # What the app holds, looked up once per connection rather than per request.
        self._app: web.Application | None = None
        self._stats: CacheStats | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Called by aiohttp once the response is sent."""
        try:
            self._log(request, response, time)
        except Exception as exc:  # a log line must never break serving
            log.debug("access log failed: %s", type(exc).__name__)

    def _log(self, request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> None:
        app: web.Application | None = getattr(request, "app", None)
        if app is not self._app:
            self._app = app
            self._stats = None if app is None else app.get(STATS)
        headers = response.headers
        outcome = headers.get(X_TTS_CACHE)
        stats = self._stats
        # Speak calls are POSTs; the audio URLs (GET, also X-TTS-Cache: hit) are not timed.
        if outcome is not None and stats is not None and request.method == "POST":
            timed = stats.request_seconds.get(outcome)
            if timed is not None:
                timed.observe(seconds)
        writer = self._writer
        if writer is None and not self.logger.isEnabledFor(logging.INFO):
            return
        if outcome == "hit":
            # Nothing went upstream, and the id the client was given is the only one there is.
            upstream = None
            request_id = headers.get(X_REQUEST_ID) or request.get(REQUEST_ID)
        else:
            upstream = request.get(UPSTREAM_SECONDS)
            request_id = request.get(REQUEST_ID) or headers.get(X_REQUEST_ID)
        # Plain values, taken now; the line is made from them by the writer thread when there
        # is one (a formatted line costs several times its values between two requests).
        values = (
            time.time(),
            request_id,
            request.method,
            logged_path(request),
            response.status,
            outcome,
            # Only a disabled line says why (a dict lookup of its Cache-Status: hits pay nothing).
            REASON_OF_STATUS.get(headers.get(CACHE_STATUS, "")) if outcome == "disabled" else None,
            headers.get(X_TTS_CACHE_TIER),
            key_parts(request),
            upstream,
            seconds,
        )
        if writer is not None:
            writer.defer(access_line, values)
        else:
            self.logger.info(access_line(*values))


def access_line(
    at: float,
    request_id: str | None,
    method: str,
    path: str,
    status: int,
    outcome: str | None,
    reason: str | None,
    tier: str | None,
    key: KeyParts | None,
    upstream: float | None,
    seconds: float,
) -> str:
    """The access log's JSON line. Built by hand: a dict through json's encoder costs several
    times more. Only a disabled line has a "reason"."""
    reason_field = "" if reason is None else f'"reason":{_text(reason)},'
    return (
        f'{{"ts":{at:.3f},'
        f'"request_id":{_text(request_id)},'
        f'"method":{_text(method)},'
        f'"path":{_text(path)},'
        f'"status":{status},'
        f'"cache":{_text(outcome)},'
        f"{reason_field}"
        f'"tier":{_text(tier)},'
        f'"key":{_text(None if key is None else _digest(*key))},'
        f'"upstream_ms":{"null" if upstream is None else f"{upstream * 1000:.2f}"},'
        f'"total_ms":{seconds * 1000:.2f}}}'
    )


def _text(value: str | None) -> str:
    """A JSON string (escaped, ASCII) or null."""
    return "null" if value is None else encode_basestring_ascii(value)


def logged_path(request: web.BaseRequest) -> str:
    """The path without its query; our own id-carrying routes as their template."""
    path = request.path
    if not path.startswith(OWN_PREFIX):
        return path
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    if isinstance(canonical, str) and canonical.startswith(OWN_PREFIX):
        return canonical
    return path


# The ids of the key a response concerns: user, thread, message, voice.
KeyParts = tuple[str, str, str, str]


def key_parts(request: web.BaseRequest) -> KeyParts | None:
    """The parts of the cache key the response concerns; None when it concerns none.

    Never logged as such: the line carries their digest (`_digest`)."""
    key = request.get(CACHE_KEY)
    if key is not None:  # set by the speak handler and the audio URL
        user, thread, message, voice = key
        return user, thread, message, voice
    info: Any = getattr(request, "match_info", None)
    if info is not None and "user" in info and "voice" in info and "message" in info:
        # The admin audio URL names the user.
        return info["user"], info["thread"], info["message"], info["voice"]
    return None


_DIGESTS: dict[tuple[str, ...], str] = {}
_MAX_DIGESTS: Final = 4096


def _digest(*parts: str) -> str:
    """CacheKey(...).digest(), remembered for the keys seen lately (a hit repeats its key).

    Called by the writer thread (or the loop when there is none), under the GIL either way."""
    known = _DIGESTS.get(parts)
    if known is None:
        user, thread, message, voice = parts
        known = CacheKey(user, thread, message, voice).digest()
        if len(_DIGESTS) >= _MAX_DIGESTS:
            _DIGESTS.clear()
        _DIGESTS[parts] = known
    return known


def access_log_options(settings: Settings, *, standalone: bool = True) -> dict[str, Any]:
    """The `access_log` / `access_log_class` arguments of run_app and AppRunner.

    `server.access_log = false` gives no logger at all. `standalone` (the CLI) writes the lines
    to stderr as bare JSON, from a thread, not through the root logger's prefixed format.
    """
    if not settings.server.access_log:
        return {"access_log": None, "access_log_class": AccessLogger}
    logger = logging.getLogger(ACCESS_LOGGER)
    if standalone and not logger.handlers:
        write_from_a_thread(logger)
    return {"access_log": logger, "access_log_class": AccessLogger}


def write_from_a_thread(logger: logging.Logger) -> None:
    """Send `logger`'s lines to stderr, bare, from a writer thread: never from the event loop."""
    writer = LineWriter(sys.stderr)
    writer.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(writer)
    logger.setLevel(logging.INFO)
    logger.propagate = False
