"""LocalVolume: entries as files in a local folder, written atomically, verified on read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import threading
from pathlib import Path

from proxy.speak import CacheKey, valid_id
from proxy.storage.base import Entry, EntryMeta

_EXTENSIONS = {
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
OBJECT_EXTENSIONS = frozenset({*_EXTENSIONS.values(), "bin"})
SIDECAR_SUFFIX = ".meta.json"
TMP_PREFIX = ".tmp-"
# A sidecar is a few hundred bytes; anything far larger is not one of ours.
_MAX_SIDECAR_BYTES = 1_048_576
_LOCK_STRIPES = 64


def extension_for(content_type: str) -> str:
    """The object file extension for a content type ("bin" when unknown)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(media_type, "bin")


class LocalVolume:
    """The durable tier on a local folder.

    Layout: `{root}/{prefix}/{user}/{thread}/{message}/{voice}.{ext}` beside `{voice}.meta.json`.
    Ids are validated before they become path segments, and every path is checked to stay under
    the root. The sidecar is written after its object, so it never names an incomplete object.
    """

    name = "volume"

    def __init__(self, root: str | Path, prefix: str = "tts_audio") -> None:
        segments = prefix.split("/")
        if not all(valid_id(segment) for segment in segments):
            raise ValueError(f"invalid volume prefix: {prefix!r}")
        self.root = Path(root).resolve()
        self.prefix = prefix
        self.base = self.root.joinpath(*segments)
        # Striped thread locks, taken inside the worker thread, serialise operations on one key
        # in this process: a reader must not see an old sidecar beside a new object (and then
        # remove both as corrupt), and a cancelled await does not release a lock a thread holds.
        self._stripes = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))

    def location(self, key: CacheKey, content_type: str) -> str:
        """Where the object for `key` lives (what the index and legacy metadata record)."""
        _require_valid(key)
        folder = self._folder(key.user, key.thread_id, key.message_id)
        return str(folder / f"{key.voice}.{extension_for(content_type)}")

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry under `key`, or None; a corrupt or malformed entry is removed and missed."""
        _require_valid(key)
        return await asyncio.to_thread(self._get_sync, key)

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`: object first, sidecar last, each replaced atomically."""
        _require_valid(key)
        await asyncio.to_thread(self._put_sync, key, entry)

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        _require_valid(key)
        await asyncio.to_thread(self._delete_sync, key)

    async def delete_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Remove a user's, a thread's or a message's entries; return how many entries went."""
        if message_id is not None and thread_id is None:
            raise ValueError("message_id needs thread_id")
        parts = [part for part in (user, thread_id, message_id) if part is not None]
        if not all(valid_id(part) for part in parts):
            raise ValueError("invalid id")
        return await asyncio.to_thread(self._delete_tree_sync, parts)

    async def clean_leftovers(self) -> int:
        """Remove temporary files a crash left behind; return how many."""
        return await asyncio.to_thread(self._clean_leftovers_sync)

    async def aclose(self) -> None:
        """Nothing stays open between operations."""

    # Everything below runs in a worker thread.

    def _folder(self, *parts: str) -> Path:
        path = self.base.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError("path escapes the volume root")
        return path

    def _lock(self, key: CacheKey) -> threading.Lock:
        return self._stripes[hash(key) % _LOCK_STRIPES]

    def _get_sync(self, key: CacheKey) -> Entry | None:
        folder = self._folder(key.user, key.thread_id, key.message_id)
        with self._lock(key):
            try:
                raw = _read_bounded(folder / f"{key.voice}{SIDECAR_SUFFIX}", _MAX_SIDECAR_BYTES)
            except (FileNotFoundError, NotADirectoryError):
                return None
            parsed = _parse_sidecar(raw, key) if raw is not None else None
            if parsed is None:
                _remove_entry(folder, key.voice)
                return None
            meta, object_name = parsed
            try:
                body = _read_bounded(folder / object_name, meta.length)
            except FileNotFoundError:
                body = None
            entry = Entry(meta, body) if body is not None else None
            if entry is None or not entry.intact():
                _remove_entry(folder, key.voice)
                return None
            return entry

    def _put_sync(self, key: CacheKey, entry: Entry) -> None:
        if not entry.intact():
            raise ValueError("entry body disagrees with its metadata")
        folder = self._folder(key.user, key.thread_id, key.message_id)
        extension = extension_for(entry.meta.content_type)
        object_name = f"{key.voice}.{extension}"
        sidecar = {
            **entry.meta.to_json(),
            "object": object_name,
            "key": _key_json(key),
        }
        sidecar_bytes = json.dumps(sidecar, separators=(",", ":")).encode()
        with self._lock(key):
            folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(folder / object_name, entry.body)
            # The object's rename must be durable before a sidecar can point at it.
            _fsync_dir(folder)
            _write_atomic(folder / f"{key.voice}{SIDECAR_SUFFIX}", sidecar_bytes)
            _fsync_dir(folder)
            for other in OBJECT_EXTENSIONS - {extension}:
                (folder / f"{key.voice}.{other}").unlink(missing_ok=True)

    def _delete_sync(self, key: CacheKey) -> None:
        folder = self._folder(key.user, key.thread_id, key.message_id)
        with self._lock(key):
            _remove_entry(folder, key.voice)

    def _delete_tree_sync(self, parts: list[str]) -> int:
        target = self._folder(*parts)
        if not target.is_dir():
            return 0
        removed = sum(
            1
            for _, _, files in os.walk(target)
            for name in files
            if name.endswith(SIDECAR_SUFFIX) and not name.startswith(TMP_PREFIX)
        )
        shutil.rmtree(target)
        return removed

    def _clean_leftovers_sync(self) -> int:
        removed = 0
        for folder, _, files in os.walk(self.base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                        removed += 1
        return removed


def _require_valid(key: CacheKey) -> None:
    # The message names no id: it may reach a log.
    if not key.valid():
        raise ValueError("invalid cache key")


def _key_json(key: CacheKey) -> dict[str, str]:
    return {
        "user": key.user,
        "thread_id": key.thread_id,
        "message_id": key.message_id,
        "voice": key.voice,
    }


def _parse_sidecar(raw: bytes, key: CacheKey) -> tuple[EntryMeta, str] | None:
    """The metadata and object name a sidecar records, or None when it is malformed."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            return None
        meta = EntryMeta.from_json(data)
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    # The object name is rebuilt from the key, never taken from the file, so a tampered
    # sidecar cannot point outside its folder.
    object_name = f"{key.voice}.{extension_for(meta.content_type)}"
    if data.get("object") != object_name or data.get("key") != _key_json(key):
        return None
    return meta, object_name


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than `limit`."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size > limit:
            return None
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def _remove_entry(folder: Path, voice: str) -> None:
    # Sidecar first: from then on a reader sees a miss, whatever objects remain.
    with contextlib.suppress(NotADirectoryError):
        (folder / f"{voice}{SIDECAR_SUFFIX}").unlink(missing_ok=True)
        for extension in OBJECT_EXTENSIONS:
            (folder / f"{voice}.{extension}").unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}")
    try:
        with tmp.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        # Some filesystems refuse fsync on a directory; the rename itself has happened.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
