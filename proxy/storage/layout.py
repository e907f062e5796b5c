"""The Volume layout every Volume shares: paths, object names, and the sidecar codec.

`{base}/{user}/{thread}/{message}/{voice}.{ext}` beside `{voice}.meta.json`; a content key's
entry is `{base}/{user}/_text/{text sha256}/{variant}.{ext}` (under `_shared` in the shared
scope), so purging a user, the janitor's walks and the index treat both alike. Every segment is
checked (`valid_id`, or one of the key's own "_" segments in its place) before it becomes a
path; the object name is rebuilt from the key and the content type, never read from a file, so
a tampered sidecar cannot point outside its folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Final

from proxy.speak import CacheKey, valid_id, valid_thread_segment, valid_user_segment
from proxy.storage.entry import EntryMeta

_EXTENSIONS: Final = {
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/flac": "flac",
    "audio/aac": "aac",
    "audio/webm": "webm",
}
OBJECT_EXTENSIONS: Final = frozenset({*_EXTENSIONS.values(), "bin"})
SIDECAR_SUFFIX: Final = ".meta.json"
TMP_PREFIX: Final = ".tmp-"
# A sidecar is a few hundred bytes; anything far larger is not one of ours.
MAX_SIDECAR_BYTES: Final = 1_048_576


def extension_for(content_type: str) -> str:
    """The object file extension for a content type ("bin" when unknown)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(media_type, "bin")


def object_name(key: CacheKey, content_type: str) -> str:
    """The object's file name in its message folder."""
    return f"{key.voice}.{extension_for(content_type)}"


def sidecar_name(voice: str) -> str:
    """The sidecar's file name in its message folder."""
    return f"{voice}{SIDECAR_SUFFIX}"


def object_names(voice: str) -> list[str]:
    """Every name an object of `voice` may have, one per known format."""
    return [f"{voice}.{extension}" for extension in sorted(OBJECT_EXTENSIONS)]


def is_object_of(name: str, voice: str) -> bool:
    """True when `name` is an object of `voice` in some format."""
    stem, dot, extension = name.rpartition(".")
    return bool(dot) and stem == voice and extension in OBJECT_EXTENSIONS


def voice_of(name: str) -> str:
    """The voice a sidecar or object name belongs to."""
    if name.endswith(SIDECAR_SUFFIX):
        return name[: -len(SIDECAR_SUFFIX)]
    return name.rpartition(".")[0]


def require_valid(key: CacheKey) -> None:
    """ValueError unless every part of `key` is a valid id (the message names no id: logs)."""
    if not key.valid():
        raise ValueError("invalid cache key")


def prefix_parts(user: str, thread_id: str | None, message_id: str | None) -> list[str]:
    """The path segments of a user's, a thread's or a message's folder; ValueError if invalid."""
    if message_id is not None and thread_id is None:
        raise ValueError("message_id needs thread_id")
    if not valid_user_segment(user):
        raise ValueError("invalid id")
    if thread_id is not None and not valid_thread_segment(thread_id):
        raise ValueError("invalid id")
    if message_id is not None and not valid_id(message_id):
        raise ValueError("invalid id")
    return [part for part in (user, thread_id, message_id) if part is not None]


def prefix_segments(prefix: str) -> list[str]:
    """The Volume prefix's segments; ValueError unless each is a valid id."""
    segments = prefix.split("/")
    if not all(valid_id(segment) for segment in segments):
        raise ValueError(f"invalid volume prefix: {prefix!r}")
    return segments


def key_json(key: CacheKey) -> dict[str, str]:
    """The key as the sidecar records it."""
    return {
        "user": key.user,
        "thread_id": key.thread_id,
        "message_id": key.message_id,
        "voice": key.voice,
    }


def encode_sidecar(key: CacheKey, meta: EntryMeta) -> tuple[str, bytes]:
    """(object name, sidecar bytes) of an entry stored under `key`."""
    name = object_name(key, meta.content_type)
    sidecar = {**meta.to_json(), "object": name, "key": key_json(key)}
    return name, json.dumps(sidecar, separators=(",", ":")).encode()


def parse_sidecar(raw: bytes, key: CacheKey) -> tuple[EntryMeta, str] | None:
    """The metadata and object name a sidecar records, or None when it is malformed."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            return None
        meta = EntryMeta.from_json(data)
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    name = object_name(key, meta.content_type)
    if data.get("object") != name or data.get("key") != key_json(key):
        return None
    return meta, name


def split_names(
    names: Iterable[str],
) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """One message folder's names: sidecars by voice, objects by voice, and temporary files.

    Names that are none of these, or whose voice is not a valid id, are not ours and are left out.
    """
    sidecars: dict[str, str] = {}
    objects: dict[str, list[str]] = {}
    temporary: list[str] = []
    for name in names:
        if name.startswith(TMP_PREFIX):
            temporary.append(name)
        elif name.endswith(SIDECAR_SUFFIX):
            voice = name[: -len(SIDECAR_SUFFIX)]
            if valid_id(voice):
                sidecars[voice] = name
        else:
            voice, dot, extension = name.rpartition(".")
            if dot and extension in OBJECT_EXTENSIONS and valid_id(voice):
                objects.setdefault(voice, []).append(name)
    return sidecars, objects, sorted(temporary)


def changed_before(changed: float | None, than: float) -> bool:
    """Last changed before `than` (an unknown time is never old)."""
    return changed is not None and changed < than


def stale_names(mtimes: Mapping[str, float | None], older_than: float) -> list[str]:
    """What a crash left in one message folder, judged by names and times alone.

    Temporary files, objects without a sidecar and sidecars without any object, each only once
    last changed before `older_than` (an unknown time is never old).
    """

    def old(name: str) -> bool:
        return changed_before(mtimes[name], older_than)

    sidecars, objects, temporary = split_names(mtimes)
    stale = [name for name in temporary if old(name)]
    for voice, names in objects.items():
        if voice not in sidecars:
            stale.extend(name for name in names if old(name))
    stale.extend(
        sidecar for voice, sidecar in sidecars.items() if voice not in objects and old(sidecar)
    )
    return stale
