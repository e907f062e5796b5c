"""build_volume: the durable tier the configuration names (a local folder, Databricks, or none)."""

from __future__ import annotations

from proxy.config import VolumeSettings
from proxy.storage.tiers import DurableTier


def build_volume(settings: VolumeSettings) -> DurableTier | None:
    """The Volume for `settings`, or None when `cache.volume.kind` is "none"."""
    if settings.kind == "local":
        from proxy.storage.local import LocalVolume

        return LocalVolume(settings.path, settings.prefix)
    if settings.kind == "databricks":
        from proxy.storage.databricks import DatabricksVolume

        return DatabricksVolume(settings)
    return None
