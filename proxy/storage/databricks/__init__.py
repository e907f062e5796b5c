"""The Volume on a Databricks Unity Catalog Volume, reached through the Files API."""

from proxy.storage.databricks.volume import DatabricksVolume

__all__ = ["DatabricksVolume"]
