"""build_volume: the durable tier the configuration names (a local folder, Databricks, or none)."""

from __future__ import annotations

from proxy.config import VolumeSettings
from proxy.storage.breaker import CircuitBreaker
from proxy.storage.tiers import DurableTier


def build_volume(settings: VolumeSettings) -> DurableTier | None:
    """The Volume for `settings`, or None when `cache.volume.kind` is "none"."""
    if settings.kind == "local":
        from proxy.storage.local import LocalVolume

        return LocalVolume(
            settings.path,
            settings.prefix,
            lookup_budget_seconds=settings.lookup_budget_ms / 1000,
            timeout_seconds=settings.timeout_seconds,
            breaker=CircuitBreaker(settings.failure_threshold, settings.cooldown_seconds),
        )
    if settings.kind == "databricks":
        from proxy.storage.databricks import DatabricksVolume

        return DatabricksVolume(settings)
    return None


def backstop_seconds(settings: VolumeSettings) -> float:
    """TieredCache's bound on a Volume call, a second past the Volume's own.

    Each Volume bounds its calls (a lookup's answer, then a body; a write) and counts an overrun
    on its breaker; the backstop only ends a call that a Volume failed to bound.
    """
    return settings.lookup_budget_ms / 1000 + settings.timeout_seconds + 1.0
