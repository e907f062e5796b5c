"""Where entries live on a Databricks Volume: its root, the base, and each key's folder."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.speak import CacheKey, valid_id, valid_thread_segment, valid_user_segment
from proxy.storage.layout import prefix_parts, prefix_segments, sidecar_name


@dataclass(frozen=True, slots=True)
class VolumePaths:
    """`{root}/{prefix}` is the base; `{base}/{user}/{thread}/{message}` holds a message's files."""

    root: str
    base: str

    @classmethod
    def of(cls, path: str, prefix: str) -> VolumePaths:
        """The paths of the Volume at `path` (/Volumes/<catalog>/<schema>/<volume>) and `prefix`."""
        root = volume_root(path)
        return cls(root, "/".join([root, *prefix_segments(prefix)]))

    def folder(self, key: CacheKey) -> str:
        """The message folder that holds `key`'s object and sidecar."""
        return f"{self.base}/{key.user}/{key.thread_id}/{key.message_id}"

    def sidecar(self, key: CacheKey) -> str:
        """The path of `key`'s sidecar."""
        return f"{self.folder(key)}/{sidecar_name(key.voice)}"

    def target(self, user: str, thread_id: str | None, message_id: str | None) -> str:
        """A user's, a thread's or a message's folder; ValueError when an id is invalid."""
        return "/".join([self.base, *prefix_parts(user, thread_id, message_id)])

    def under(self, user: str | None, thread_id: str | None, message_id: str | None) -> str:
        """The base when `user` is None, else `target`; ValueError for ids without a user."""
        if user is not None:
            return self.target(user, thread_id, message_id)
        if thread_id is not None or message_id is not None:
            raise ValueError("thread_id and message_id need user")
        return self.base

    def ids_of(self, folder: str) -> tuple[str, str, str] | None:
        """(user, thread, message) when `folder` is a message folder, else None."""
        if not folder.startswith(self.base + "/"):
            return None
        parts = folder[len(self.base) + 1 :].split("/")
        if len(parts) != 3:
            return None
        user, thread, message = parts
        if not (valid_user_segment(user) and valid_thread_segment(thread) and valid_id(message)):
            return None
        return parts[0], parts[1], parts[2]


def volume_root(path: str) -> str:
    """`path` without a trailing slash; ValueError unless it names a Unity Catalog Volume."""
    root = path.rstrip("/")
    segments = root.split("/")
    if (
        not root.startswith("/Volumes/")
        or len(segments) < 5
        or any(segment in ("", ".", "..") for segment in segments[1:])
        or any(ord(character) < 32 for character in root)
    ):
        raise ValueError(
            f"cache.volume.path must be /Volumes/<catalog>/<schema>/<volume>, got {path!r}"
        )
    return root
