"""Typed settings: defaults, then a TOML file, then `TTS_PROXY_*` environment overrides."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from proxy.config_checks import validate
from proxy.config_toml import to_toml
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
    validate(settings)
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
