"""The settings as TOML text, for `check-config`: each value with a note of where it came from."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def to_toml(
    tree: Mapping[str, Any], prefix: str = "", notes: Mapping[str, str] | None = None
) -> str:
    """Render a nested settings dict as TOML (values, then sub-tables); `notes` as comments."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for name, value in tree.items():
        if isinstance(value, Mapping):
            tables.append((f"{prefix}{name}", value))
        else:
            note = (notes or {}).get(f"{prefix}{name}")
            lines.append(f"{name} = {_toml_value(value)}" + (f"  # {note}" if note else ""))
    out = ""
    if prefix and lines:
        out += f"[{prefix.rstrip('.')}]\n"
    if lines:
        out += "\n".join(lines) + "\n\n"
    for dotted, table in tables:
        out += to_toml(table, dotted + ".", notes)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, Mapping):  # an inline table (a route of [[tts.routes]], its defaults)
        pairs = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name)
