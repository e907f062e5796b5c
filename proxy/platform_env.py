"""What Databricks Apps' environment sets for the proxy: the app's port, the legacy Volume."""

from __future__ import annotations

from typing import Any

from proxy.settings import ConfigError

# Set by Databricks Apps: the port the app must listen on, on every interface.
PLATFORM_PORT = "DATABRICKS_APP_PORT"
# The legacy backend's own setting for its Volume.
LEGACY_VOLUME = "DATABRICKS_VOLUME"


def legacy_volume(tree: dict[str, Any], legacy: str) -> dict[str, Any]:
    """DATABRICKS_VOLUME, as the legacy backend read it, where no path (or other kind) is set."""
    volume = tree.get("cache", {}).get("volume", {})
    if not legacy.strip() or not isinstance(volume, dict) or "path" in volume:
        return {}
    if volume.get("kind", "databricks") != "databricks":
        return {}
    derived = {"cache.volume.path": legacy.strip().rstrip("/")}
    if "kind" not in volume:
        derived["cache.volume.kind"] = "databricks"
    return derived


def platform_port(tree: dict[str, Any], port: str) -> dict[str, Any]:
    """DATABRICKS_APP_PORT: port and host 0.0.0.0, each where file and environment are silent."""
    server = tree.get("server", {})
    if not port.strip() or not isinstance(server, dict):
        return {}
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(PLATFORM_PORT, f"expected a port number, got {port!r}") from None
    platform = {"server.port": number, "server.host": "0.0.0.0"}
    return {key: value for key, value in platform.items() if key.split(".")[1] not in server}
