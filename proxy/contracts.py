"""Speak routes as declarative contracts: where a JSON body keeps what the cache keys on.

A contract names, for one POST path, the fields holding the text, the voice, the provider, the
message and thread ids and the save flag, the other fields that change the audio (and so belong
in a content key), the fields that do not, and how the caller is identified. `legacy` is the
chat app's `/api/tts/speak`, `openai` is `POST /v1/audio/speech`, `custom` is declared whole in
`[[tts.routes]]`. Reading a body is pure: no I/O, no settings beyond the contract.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from proxy.reasons import Reason
from proxy.settings import ConfigError, RouteSettings, Settings
from proxy.speak import SpeakRequest, text_digest

FieldPath = tuple[str, ...]
Scope = Literal["user", "shared"]
_ABSENT: Final = object()

# The built-in contracts' declarations, as a route table would spell them; None: see contract_of.
_BUILT_IN: Final[dict[str, dict[str, Any]]] = {
    "legacy": {
        "text": "text",
        "voice": "voice",
        "provider": "provider",
        "message_id": "message_id",
        "thread_id": "thread_id",
        "save": "save_to_volume",
        "key_fields": [],
        "key_defaults": {},
        "ignore_fields": [],
        # The legacy backend reads these six fields and no other (the seed plan's endpoint).
        "undeclared": "ignore",
        # ... and speaks the text stripped of surrounding space.
        "strip_text": True,
    },
    "openai": {
        "text": "input",
        "voice": "voice",
        "default_voice": "",
        "provider": "",
        "message_id": "",
        "thread_id": "",
        "save": "",
        "key_fields": ["model", "response_format", "speed", "instructions"],
        # The defaults the OpenAI API documents for an absent field (create speech): mp3, 1.0.
        "key_defaults": {"response_format": "mp3", "speed": 1.0},
        "ignore_fields": [],
        # The API grows fields (stream_format, ...): one this proxy does not know is not keyed.
        "undeclared": "bypass",
        "strip_text": False,
        "identity": "api-key",
        # The body has no save flag: declaring the route is the operator's choice to cache it.
        "save_by_default": True,
    },
    "custom": {
        "text": "",
        "voice": "",
        "default_voice": "",
        "provider": "",
        "message_id": "",
        "thread_id": "",
        "save": "",
        "key_fields": [],
        "key_defaults": {},
        "ignore_fields": [],
        "undeclared": "bypass",
        "strip_text": False,
    },
}


@dataclass(frozen=True, slots=True)
class Contract:
    """One speak route: its path, how its bodies are read and keyed, and who may be cached."""

    name: str
    path: str
    scope: Scope
    identity: str
    text: FieldPath
    voice: FieldPath | None
    default_voice: str | None
    provider: FieldPath | None = None
    message_id: FieldPath | None = None
    thread_id: FieldPath | None = None
    save: FieldPath | None = None
    save_by_default: bool = False
    key_fields: tuple[FieldPath, ...] = ()
    key_defaults: tuple[tuple[FieldPath, Any], ...] = ()
    ignored: tuple[FieldPath, ...] = ()
    undeclared: Literal["bypass", "ignore"] = "bypass"
    strip_text: bool = False
    # Who answers a miss: the configured synthesizer (upstream.kind) speaks the legacy contract
    # only; every other contract's misses go to upstream.url as the client sent them.
    synthesizer: Literal["configured", "http"] = "http"
    _declared: frozenset[FieldPath] = field(default=frozenset(), init=False, repr=False)
    _containers: frozenset[FieldPath] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        roles = (self.text, self.voice, self.provider, self.message_id, self.thread_id, self.save)
        declared = {p for p in (*roles, *self.key_fields, *self.ignored) if p}
        object.__setattr__(self, "_declared", frozenset(declared))
        object.__setattr__(
            self, "_containers", frozenset(p[:n] for p in declared for n in range(1, len(p)))
        )

    def read(self, body: Mapping[str, Any]) -> SpeakRequest:
        """What `body` asks for; a body this contract cannot key safely says so in `problem`."""
        text = _get(body, self.text)
        voice = _get(body, self.voice) if self.voice else _ABSENT
        provider = _get(body, self.provider) if self.provider else _ABSENT
        message_id = _get(body, self.message_id) if self.message_id else _ABSENT
        thread_id = _get(body, self.thread_id) if self.thread_id else _ABSENT
        saved = _get(body, self.save) if self.save else _ABSENT
        problem: Reason | None = None
        if self.undeclared == "bypass" and self._undeclared_in(body, ()):
            problem = Reason.UNDECLARED_FIELD
        if not (isinstance(voice, str) and voice):
            if self.default_voice is None:
                problem = problem or Reason.INVALID_FIELD
                voice = ""
            else:
                voice = self.default_voice
        try:
            params = self._params(body) if self.key_fields else ""
        except RecursionError:
            params, problem = "", problem or Reason.INVALID_FIELD
        return SpeakRequest(
            text=text if isinstance(text, str) else "",
            voice=voice,
            provider=provider.lower() if isinstance(provider, str) and provider else None,
            message_id=message_id if isinstance(message_id, str) else None,
            thread_id=thread_id if isinstance(thread_id, str) else None,
            save_to_volume=saved is True,
            save_said=saved is not _ABSENT,
            params=params,
            problem=problem,
        )

    def text_sha256(self, text: str) -> str:
        """The digest of the text as this contract's upstream speaks it."""
        return text_digest(text.strip() if self.strip_text else text)

    def variant(self, speak: SpeakRequest) -> str:
        """A content key's last segment: the voice, and a hash of everything else that changes
        the audio (this route's path, the provider named, the other declared fields)."""
        raw = "\0".join((self.path, speak.provider or "", speak.params))
        tag = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"{speak.voice}.{tag}"

    def upstream_body(self, body: bytes, document: dict[str, Any], *, keep_save: bool) -> bytes:
        """The body to send upstream for a cacheable call: the save flag taken out (a top-level
        one), unless `keep_save`; the bytes as they came otherwise."""
        save = self.save
        if keep_save or save is None or len(save) != 1 or save[0] not in document:
            return body
        trimmed = {k: v for k, v in document.items() if k != save[0]}
        try:
            return json.dumps(trimmed, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate: only its \u escape is valid UTF-8
            return json.dumps(trimmed).encode()

    def _params(self, body: Mapping[str, Any]) -> str:
        defaults = dict(self.key_defaults)
        values: dict[str, Any] = {}
        for path in self.key_fields:
            value = _get(body, path)
            if value is _ABSENT:
                value = defaults.get(path, _ABSENT)
            if value is not _ABSENT:
                values[".".join(path)] = canonical(value)
        return json.dumps(values, sort_keys=True, separators=(",", ":"))

    def _undeclared_in(self, node: Mapping[str, Any], prefix: FieldPath) -> bool:
        for name, value in node.items():
            path = (*prefix, name)
            if path in self._declared:
                continue
            if path in self._containers and isinstance(value, dict):
                if self._undeclared_in(value, path):
                    return True
                continue
            return True
        return False


def canonical(value: Any) -> Any:
    """A JSON value with its numbers in one form: 1, 1.0 and 1e0 are the same speed."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        try:
            number = float(value)
        except OverflowError:
            return value
        return number if number == value else value
    if isinstance(value, list):
        return [canonical(item) for item in value]
    if isinstance(value, dict):
        return {name: canonical(item) for name, item in value.items()}
    return value


def _get(body: Mapping[str, Any], path: FieldPath) -> Any:
    node: Any = body
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def legacy_contract(path: str, settings: Settings) -> Contract:
    """The legacy contract on `path`, as `tts.speak_paths` declares it."""
    return contract_of(RouteSettings(path=path, contract="legacy"), settings, "tts.speak_paths")


def speak_contracts(settings: Settings) -> list[Contract]:
    """Every speak route: `tts.speak_paths` (legacy) and `[[tts.routes]]`, which wins on a path.

    Raises ConfigError naming the route's key when a declaration is wrong.
    """
    declared = [
        contract_of(route, settings, f"tts.routes[{n}]")
        for n, route in enumerate(settings.tts.routes)
    ]
    seen: set[str] = set()
    for n, contract in enumerate(declared):
        if not contract.path.startswith("/") or contract.path.startswith("/_proxy/"):
            raise ConfigError(f"tts.routes[{n}].path", "must start with / and not with /_proxy/")
        if contract.path in seen:
            raise ConfigError(f"tts.routes[{n}].path", f"{contract.path!r} is declared twice")
        seen.add(contract.path)
    legacy = [legacy_contract(p, settings) for p in settings.tts.speak_paths if p not in seen]
    return legacy + declared


def contract_of(route: RouteSettings, settings: Settings, key: str) -> Contract:
    """The contract a route table declares: its named contract, with what the table changes."""
    given = {name: getattr(route, name) for name in _BUILT_IN["custom"]}
    base = _BUILT_IN[route.contract]
    spec = {**base, **{name: value for name, value in given.items() if value is not None}}
    for name in ("identity", "save_by_default", "default_voice"):
        value = getattr(route, name)
        spec[name] = base.get(name) if value is None else value
    paths = {name: _path(f"{key}.{name}", spec[name]) for name in _ROLES}
    if paths["text"] is None:
        raise ConfigError(f"{key}.text", "must name the field holding the text")
    default_voice = spec["default_voice"]
    if default_voice is None:
        default_voice = settings.tts.default_voice
    if paths["voice"] is None and not default_voice:
        raise ConfigError(f"{key}.voice", "name the voice field, or set default_voice")
    key_fields = _paths(f"{key}.key_fields", spec["key_fields"])
    ignored = _paths(f"{key}.ignore_fields", spec["ignore_fields"])
    _no_field_twice(key, [*((n, p) for n, p in paths.items()), *_named(key_fields, ignored)])
    defaults = tuple(
        (_required_path(f"{key}.key_defaults", name), canonical(value))
        for name, value in dict(spec["key_defaults"]).items()
    )
    for path, _ in defaults:
        if path not in key_fields:
            raise ConfigError(f"{key}.key_defaults", f"{'.'.join(path)} is not in key_fields")
    identity = spec["identity"] or settings.identity.mode
    if identity == "api-key" and len(settings.identity.api_key_secret) < 32:
        raise ConfigError(
            "identity.api_key_secret",
            f"must be at least 32 characters: {key} identifies callers by API key"
            " (e.g. `openssl rand -hex 32`)",
        )
    return Contract(
        name=route.contract,
        path=route.path,
        scope=route.scope,
        identity=identity,
        text=paths["text"],
        voice=paths["voice"],
        default_voice=default_voice or None,
        provider=paths["provider"],
        message_id=paths["message_id"],
        thread_id=paths["thread_id"],
        save=paths["save"],
        save_by_default=(
            settings.tts.save_by_default
            if spec["save_by_default"] is None
            else bool(spec["save_by_default"])
        ),
        key_fields=key_fields,
        key_defaults=defaults,
        ignored=ignored,
        undeclared=spec["undeclared"],
        strip_text=bool(spec["strip_text"]),
        synthesizer="configured" if route.contract == "legacy" else "http",
    )


_ROLES: Final = ("text", "voice", "provider", "message_id", "thread_id", "save")


def _path(key: str, dotted: str) -> FieldPath | None:
    """A field path from its dotted form; "" is no field."""
    return _required_path(key, dotted) if dotted else None


def _required_path(key: str, dotted: str) -> FieldPath:
    parts = tuple(dotted.split("."))
    if not all(parts):
        raise ConfigError(key, f"not a field path: {dotted!r} (dotted names, e.g. options.voice)")
    return parts


def _paths(key: str, dotted: Iterable[str]) -> tuple[FieldPath, ...]:
    return tuple(_required_path(key, name) for name in dotted)


def _named(
    key_fields: tuple[FieldPath, ...], ignored: tuple[FieldPath, ...]
) -> list[tuple[str, FieldPath | None]]:
    named: list[tuple[str, FieldPath | None]] = [("key_fields", p) for p in key_fields]
    return named + [("ignore_fields", p) for p in ignored]


def _no_field_twice(key: str, roles: list[tuple[str, FieldPath | None]]) -> None:
    """Each field has one role: a field both keyed and ignored is a mistake worth a stop."""
    seen: dict[FieldPath, str] = {}
    for role, path in roles:
        if path is None:
            continue
        if path in seen:
            raise ConfigError(f"{key}.{role}", f"{'.'.join(path)} is also the {seen[path]} field")
        seen[path] = role
        for other in seen:
            if other != path and (other[: len(path)] == path or path[: len(other)] == other):
                raise ConfigError(f"{key}.{role}", f"{'.'.join(path)} overlaps {'.'.join(other)}")
