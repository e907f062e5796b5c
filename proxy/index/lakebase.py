"""The Lakebase password: the app's Databricks OAuth token, fetched off the event loop."""

from __future__ import annotations

import asyncio
from functools import cache
from typing import Any


@cache
def _config() -> Any:
    try:
        from databricks.sdk.core import Config
    except ImportError as exc:  # pragma: no cover - databricks-sdk is a dependency
        raise RuntimeError("install databricks-sdk to use Databricks authentication") from exc
    return Config()


def _bearer_token() -> str:
    headers = _config().authenticate()
    value = str(headers.get("Authorization", ""))
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RuntimeError("Databricks authentication gave no bearer token")
    return token


async def lakebase_password() -> str:
    """The app's current Databricks OAuth token, the password Lakebase accepts; SDK-refreshed."""
    return await asyncio.to_thread(_bearer_token)
