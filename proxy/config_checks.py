"""Settings that parse but cannot work: checks within and across keys, each a one-line error."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from proxy.contracts import speak_contracts
from proxy.settings import ConfigError, Settings

# A token guessed at the throttle's pace (admin/guard.py) must outlast any attacker: 32 characters.
MIN_ADMIN_TOKEN_CHARS = 32


def validate(settings: Settings) -> None:
    """Raise ConfigError (one line naming the key) for settings that cannot work together."""
    server, upstream, tts, cache = settings.server, settings.upstream, settings.tts, settings.cache
    if not 0 <= server.port <= 65535:
        raise ConfigError("server.port", f"must be between 0 and 65535, got {server.port}")
    _check_url("upstream.url", upstream.url)
    _check_url("upstream.replicate_base_url", upstream.replicate_base_url)
    _check_url("upstream.deepgram_base_url", upstream.deepgram_base_url)
    if upstream.fallback and upstream.fallback == upstream.kind:
        raise ConfigError("upstream.fallback", "must differ from upstream.kind")
    if not all(
        re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in upstream.command_env_unset
    ):
        raise ConfigError("upstream.command_env_unset", "must be environment variable names")
    if upstream.fallback not in {"", "replicate", "deepgram"}:
        raise ConfigError(
            "upstream.fallback", f"must be '', 'replicate' or 'deepgram', got {upstream.fallback!r}"
        )
    positive = {
        "server.shutdown_timeout_seconds": server.shutdown_timeout_seconds,
        "upstream.timeout_seconds": upstream.timeout_seconds,
        "upstream.connect_timeout_seconds": upstream.connect_timeout_seconds,
        "upstream.max_connections": upstream.max_connections,
        "upstream.max_streams": upstream.max_streams,
        "upstream.slot_wait_seconds": upstream.slot_wait_seconds,
        "upstream.websocket_max_message_bytes": upstream.websocket_max_message_bytes,
        "server.body_idle_timeout_seconds": server.body_idle_timeout_seconds,
        "tts.body_timeout_seconds": tts.body_timeout_seconds,
        "upstream.provider_timeout_seconds": upstream.provider_timeout_seconds,
        "upstream.start_timeout_seconds": upstream.start_timeout_seconds,
        "upstream.stop_seconds": upstream.stop_seconds,
        "tts.max_body_bytes": tts.max_body_bytes,
        "cache.max_entry_bytes": cache.max_entry_bytes,
        "cache.volume.timeout_seconds": cache.volume.timeout_seconds,
        "cache.volume.lookup_budget_ms": cache.volume.lookup_budget_ms,
        "cache.volume.failure_threshold": cache.volume.failure_threshold,
        "cache.volume.cooldown_seconds": cache.volume.cooldown_seconds,
        "cache.volume.max_concurrent_calls": cache.volume.max_concurrent_calls,
        "cache.volume.max_calls_per_second": cache.volume.max_calls_per_second,
        "index.timeout_seconds": settings.index.timeout_seconds,
        "cache.min_uses": cache.min_uses,
        "cache.janitor_interval_seconds": cache.janitor_interval_seconds,
        "cache.janitor_batch_size": cache.janitor_batch_size,
        "index.pool_max_size": settings.index.pool_max_size,
        "fleet.confirm_timeout_seconds": settings.fleet.confirm_timeout_seconds,
        "fleet.owner_timeout_seconds": settings.fleet.owner_timeout_seconds,
        "fleet.wait_seconds": settings.fleet.wait_seconds,
    }
    for key, number in positive.items():
        if number <= 0:
            raise ConfigError(key, f"must be greater than 0, got {number}")
    for key, number in {
        "cache.memory.max_bytes": cache.memory.max_bytes,
        "cache.memory.ttl_seconds": cache.memory.ttl_seconds,
        "cache.volume.retries": cache.volume.retries,
        "index.ownership_cache_seconds": settings.index.ownership_cache_seconds,
        "cache.max_text_chars": cache.max_text_chars,
        "cache.volume.max_bytes": cache.volume.max_bytes,
        "cache.volume.ttl_seconds": cache.volume.ttl_seconds,
        "cache.volume.user_max_bytes": cache.volume.user_max_bytes,
        "cache.volume.min_free_bytes": cache.volume.min_free_bytes,
        "server.max_requests_per_client": server.max_requests_per_client,
        "cache.volume.verify_max_bytes": cache.volume.verify_max_bytes,
    }.items():
        if number < 0:
            raise ConfigError(key, f"must be 0 (off) or more, got {number}")
    if upstream.max_streams >= upstream.max_connections:
        # Streams are capped apart so that ordinary requests always keep some connections.
        raise ConfigError(
            "upstream.max_streams",
            f"must be less than upstream.max_connections ({upstream.max_connections}), "
            f"got {upstream.max_streams}",
        )
    if not tts.speak_paths or not all(p.startswith("/") for p in tts.speak_paths):
        raise ConfigError("tts.speak_paths", "must be a non-empty list of paths starting with /")
    if not tts.default_voice:
        raise ConfigError("tts.default_voice", "must not be empty")
    for key, cidrs in (
        ("identity.trusted_proxies", settings.identity.trusted_proxies),
        ("admin.allowed_networks", settings.admin.allowed_networks),
    ):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(key, f"not an address or CIDR: {cidr!r}") from None
    if settings.admin.token and len(settings.admin.token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            "admin.token",
            f"must be at least {MIN_ADMIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)",
        )
    if settings.identity.mode != "none" and not settings.identity.user_header:
        raise ConfigError("identity.user_header", "must name a header")
    if cache.volume.kind != "none" and not cache.volume.path:
        raise ConfigError("cache.volume.path", "must be set when cache.volume.kind is not 'none'")
    index = settings.index
    if index.dsn and not index.dsn.startswith(("postgres://", "postgresql://")):
        raise ConfigError("index.dsn", "must start with postgresql:// or postgres://")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", index.schema):
        raise ConfigError(
            "index.schema", f"must be a lower-case SQL identifier, got {index.schema!r}"
        )
    if "$1" not in index.ownership_query or "$2" not in index.ownership_query:
        raise ConfigError("index.ownership_query", "must use $1 (message id) and $2 (user)")
    if cache.volume.kind == "databricks" and not cache.volume.path.startswith("/Volumes/"):
        raise ConfigError(
            "cache.volume.path",
            "must be /Volumes/<catalog>/<schema>/<volume> for databricks (or DATABRICKS_VOLUME)",
        )
    speak_contracts(settings)  # each route's declaration, checked as the app will build it


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL, got {url!r}")
    try:
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise ConfigError(key, f"bad port in URL {url!r}") from None
