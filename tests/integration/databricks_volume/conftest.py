"""Fixtures for the DatabricksVolume tests: a clean SDK environment, the emulator, a factory."""

from tests.databricks_volume_support import (  # noqa: F401 - fixtures for these tests
    _no_ambient_databricks_config,
    emulator,
    make_volume,
)
