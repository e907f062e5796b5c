"""The durable tier on a local folder: the Volume, its I/O threads and its maintenance walks."""

from proxy.storage.local.volume import LocalVolume

__all__ = ["LocalVolume"]
