"""Typed settings: defaults, then a TOML file, then `TTS_PROXY_*` environment overrides."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from proxy.config_toml import to_toml
from proxy.contracts import speak_contracts
from proxy.platform_env import LEGACY_VOLUME, PLATFORM_PORT, legacy_volume, platform_port
from proxy.settings import (
    AdminSettings,
    CacheSettings,
    ConfigError,
    FleetSettings,
    IdentitySettings,
    IndexSettings,
    MemorySettings,
    ServerSettings,
    Settings,
    TtsSettings,
    UpstreamSettings,
    VolumeSettings,
)

__all__ = [
    "AdminSettings",
    "CacheSettings",
    "ConfigError",
    "FleetSettings",
    "IdentitySettings",
    "IndexSettings",
    "MemorySettings",
    "ServerSettings",
    "Settings",
    "TtsSettings",
    "UpstreamSettings",
    "VolumeSettings",
    "load_settings",
    "redacted",
    "to_toml",
]

ENV_PREFIX = "TTS_PROXY_"
SECRET_KEYS = frozenset({"admin.token", "index.dsn", "index.password", "identity.api_key_secret"})
# A token guessed at the throttle's pace (admin/guard.py) must outlast any attacker: 32 characters.
MIN_ADMIN_TOKEN_CHARS = 32


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> Settings:
    """Load defaults, then the TOML file, then the environment, then `overrides`; validate."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        tree = _read_toml(Path(path))
        origin.update(dict.fromkeys(_leaves(tree), "file"))
    environ = os.environ if env is None else env
    for dotted, raw in _env_values(environ).items():
        _set_dotted(tree, dotted, EnvText(raw))
        origin[dotted] = f"environment ({ENV_PREFIX}{dotted.replace('.', '_').upper()})"
    for source, derived in (
        (f"environment ({LEGACY_VOLUME})", legacy_volume(tree, environ.get(LEGACY_VOLUME, ""))),
        (f"platform ({PLATFORM_PORT})", platform_port(tree, environ.get(PLATFORM_PORT, ""))),
    ):
        for dotted, value in derived.items():
            _set_dotted(tree, dotted, value)
            origin[dotted] = source
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
        origin[dotted] = "command line"
    if sources is not None:
        sources.update({key: origin.get(key, "default") for key in all_keys()})
    settings = typing.cast(Settings, _build(Settings, tree, ""))
    _validate(settings)
    return settings


class EnvText(str):
    """A value from the environment: text by nature, so it may spell a number or a boolean.

    A file's values are typed by TOML; only an `EnvText` is parsed into another type.
    """


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("--config", f"is a directory: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None


def all_keys(cls: type[Any] = Settings, prefix: str = "") -> dict[str, type[Any]]:
    """Every dotted key of the settings tree, with its declared type."""
    keys: dict[str, type[Any]] = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        dotted = f"{prefix}{item.name}"
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind):
            keys.update(all_keys(typing.cast(type[Any], kind), dotted + "."))
        else:
            keys[dotted] = kind
    return keys


def _env_values(environ: Mapping[str, str]) -> dict[str, str]:
    by_env_name = {ENV_PREFIX + k.replace(".", "_").upper(): k for k in all_keys()}
    found = {by_env_name[name]: value for name, value in environ.items() if name in by_env_name}
    unknown = sorted(
        name for name in environ if name.startswith(ENV_PREFIX) and name not in by_env_name
    )
    if unknown:
        raise ConfigError(unknown[0], "unknown setting in the environment")
    return found


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a TOML tree sets (tables flattened)."""
    keys: list[str] = []
    for name, value in tree.items():
        if isinstance(value, Mapping):
            keys.extend(_leaves(value, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{part} is not a table")
        node = child
    node[leaf] = value


def _build(cls: type[Any], table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(prefix.rstrip("."), "expected a table")
    hints = typing.get_type_hints(cls)
    names = {item.name for item in dataclasses.fields(cls)}
    for name in table:
        if name not in names:
            raise ConfigError(f"{prefix}{name}", "unknown setting")
    for item in dataclasses.fields(cls):
        required = (
            item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        )
        if required and item.name not in table:
            raise ConfigError(f"{prefix}{item.name}", "is required")
    values: dict[str, Any] = {}
    for name, raw in table.items():
        kind = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            values[name] = _build(typing.cast(type[Any], kind), raw, dotted + ".")
        else:
            values[name] = _coerce(dotted, kind, raw)
    return cls(**values)


def _coerce(key: str, kind: Any, raw: Any) -> Any:
    """Turn a TOML value or an environment string into `kind`, or say why not."""
    from_env = isinstance(raw, EnvText)
    origin = get_origin(kind)
    if origin in (types.UnionType, typing.Union):  # `T | None`: TOML has no null: a T
        (inner,) = [arg for arg in get_args(kind) if arg is not type(None)]
        return _coerce(key, inner, raw)
    if origin is list and dataclasses.is_dataclass(get_args(kind)[0]):
        return _coerce_tables(key, get_args(kind)[0], raw)
    if origin is dict:
        if not isinstance(raw, dict) or not all(isinstance(name, str) for name in raw):
            raise ConfigError(key, f"expected a table, got {raw!r}")
        return dict(raw)
    if origin is Literal:
        allowed = get_args(kind)
        if raw not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(key, f"must be one of {choices}, got {raw!r}")
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and raw.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if from_env and raw.strip().lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_env:
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {raw!r}")
    if kind is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if from_env:
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {raw!r}")
    if kind is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(key, f"expected a string, got {raw!r}")
    if origin is list or isinstance(kind, types.GenericAlias):
        return _coerce_list(key, raw)
    raise ConfigError(key, f"unsupported setting type {kind!r}")  # pragma: no cover


def _coerce_tables(key: str, cls: Any, raw: Any) -> list[Any]:
    """An array of tables (`[[tts.routes]]`); from the environment, a JSON list of objects."""
    if isinstance(raw, EnvText):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(key, "expected a JSON list of objects") from None
    if not isinstance(raw, list):
        raise ConfigError(key, f"expected an array of tables, got {raw!r}")
    return [_build(cls, table, f"{key}[{n}].") for n, table in enumerate(raw)]


def _coerce_list(key: str, raw: Any) -> list[str]:
    if isinstance(raw, EnvText):
        text = raw.strip()
        if text.startswith("["):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(key, f"expected a JSON list, got {raw!r}") from None
        else:
            raw = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ConfigError(key, f"expected a list of strings, got {raw!r}")
    return list(raw)


def _validate(settings: Settings) -> None:
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


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as a nested dict, with secrets replaced by '***'."""
    tree = dataclasses.asdict(settings)
    for dotted in SECRET_KEYS:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        if node.get(leaf):
            node[leaf] = "***"
    upstream = tree["upstream"]
    upstream["url"] = _strip_userinfo(upstream["url"])
    return tree


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
