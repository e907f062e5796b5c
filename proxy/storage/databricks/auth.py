"""Files API credentials: the app's (databricks-sdk unified auth) or the request's user token."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

from proxy.identity import CURRENT_TOKEN
from proxy.storage.tiers import VolumeUnavailable

if TYPE_CHECKING:
    # Imported when used: the SDK costs ~45 MiB and most of a second, and a local Volume
    # never needs it.
    from databricks.sdk.config import Config

# The SDK refreshes its tokens itself; reusing its headers briefly saves a thread hop per call.
_AUTH_CACHE_SECONDS: Final = 30.0
# How long databricks-sdk retries a call it makes (host metadata, tokens) unless told otherwise.
# Its default, 300 s, would keep a thread busy past any shutdown's grace (15 s on Databricks Apps)
# while the workspace is unreachable, and the process waits for its threads on exit.
SDK_RETRY_SECONDS = 10
# Config options and environment variables whose values must never reach a log line.
_SECRET_OPTIONS: Final = ("token", "client_secret", "password", "azure_client_secret")
_SECRET_ENV: Final = ("DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_PASSWORD")

logger = logging.getLogger(__name__)


class Credentials:
    """The workspace URL and auth headers for each Files API operation.

    `auth = "app"`: databricks-sdk's unified auth, its `Config` built once in a thread and its
    headers reused for a short while. `auth = "user"`: the on-behalf-of token of the request
    being served (`CURRENT_TOKEN`), never stored.
    """

    def __init__(
        self,
        auth: Literal["app", "user"],
        *,
        host: str | None = None,
        config: Config | None = None,
        config_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.auth = auth
        self._config = config
        self._config_options = dict(config_options or {})
        explicit_host = host or (config.host if config is not None else None)
        self._host = normalise_host(explicit_host) if explicit_host else None
        self._config_build: asyncio.Task[Config] | None = None
        self._auth_lock = asyncio.Lock()
        self._app_headers: dict[str, str] | None = None
        self._app_headers_until = 0.0

    def usable(self) -> bool:
        """False when each call needs a user's token and the current request carries none."""
        return self.auth != "user" or bool(CURRENT_TOKEN.get())

    def forget(self) -> None:
        """Drop the cached app headers (the API refused them); the next call fetches fresh ones."""
        self._app_headers = None

    async def for_call(self, deadline: float) -> tuple[str, dict[str, str]]:
        """The workspace URL and the auth headers for one operation."""
        if self.auth == "user":
            token = CURRENT_TOKEN.get()
            if not token:
                raise VolumeUnavailable("no on-behalf-of token for this request")
            host = self._host or _env_host()
            if host is None:
                host = normalise_host((await self._app_config(deadline)).host or "")
            if not host:
                raise VolumeUnavailable("no Databricks host is configured")
            self._host = host
            return host, {"Authorization": f"Bearer {token}"}
        config = await self._app_config(deadline)
        host = self._host or normalise_host(config.host or "")
        if not host:
            raise VolumeUnavailable("no Databricks host is configured")
        self._host = host
        loop = asyncio.get_running_loop()
        headers = self._app_headers
        if headers is None or loop.time() >= self._app_headers_until:
            # One refresh at a time; the others reuse what it fetched.
            async with self._auth_lock:
                headers = self._app_headers
                if headers is None or loop.time() >= self._app_headers_until:
                    headers = await self._refresh_app_headers(config, deadline)
        return host, headers

    async def _refresh_app_headers(self, config: Config, deadline: float) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                fresh = await asyncio.to_thread(config.authenticate)
        except TimeoutError:
            raise VolumeUnavailable("Databricks authentication timed out") from None
        except Exception as exc:
            logger.warning("databricks volume: authentication failed: %s", type(exc).__name__)
            raise VolumeUnavailable("Databricks authentication failed") from None
        headers = dict(fresh)
        if config.workspace_id:
            headers["X-Databricks-Workspace-Id"] = str(config.workspace_id)
        self._app_headers = headers
        self._app_headers_until = loop.time() + _AUTH_CACHE_SECONDS
        return headers

    async def _app_config(self, deadline: float) -> Config:
        """databricks-sdk's unified auth Config, built once in a thread (it may call the host).

        The build outlives a caller whose deadline runs out (a lookup's budget is short, and the
        first build imports the SDK): the next caller awaits the same build, not a new one.
        """
        if self._config is not None:
            return self._config
        if self._config_build is None:
            self._config_build = asyncio.get_running_loop().create_task(self._build_config())
            self._config_build.add_done_callback(_retrieve)
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(remaining):
                return await asyncio.shield(self._config_build)
        except TimeoutError:
            raise VolumeUnavailable("Databricks configuration timed out") from None

    async def _build_config(self) -> Config:
        options = dict(self._config_options)
        if self._host and "host" not in options:
            options["host"] = self._host
        try:
            self._config = await asyncio.to_thread(_build_config, options)
        except Exception as exc:
            self._config_build = None  # the next caller tries again
            # The SDK masks secrets in its messages; scrub known ones all the same.
            message = scrub(str(exc), options)
            logger.warning("databricks volume: configuration failed: %s", message)
            raise VolumeUnavailable("Databricks configuration failed") from None
        return self._config


def _retrieve(build: asyncio.Task[Config]) -> None:
    # Every caller may have left on its deadline: nobody else would look at a failed build.
    if not build.cancelled():
        build.exception()


def normalise_host(host: str) -> str:
    """The workspace URL with a scheme (https by default) and no trailing slash."""
    host = host.strip().rstrip("/")
    if host and "://" not in host:
        host = f"https://{host}"
    return host


def scrub(message: str, options: Mapping[str, Any]) -> str:
    """`message` with every known secret (config options, environment) replaced by ***."""
    secrets = [str(options[name]) for name in _SECRET_OPTIONS if options.get(name)]
    secrets += [os.environ[name] for name in _SECRET_ENV if os.environ.get(name)]
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


def _env_host() -> str | None:
    host = os.environ.get("DATABRICKS_HOST", "").strip()
    return normalise_host(host) if host else None


def _build_config(options: Mapping[str, Any]) -> Config:
    try:
        from databricks.sdk.config import Config
    except ImportError as exc:  # pragma: no cover - databricks-sdk is a dependency
        raise VolumeUnavailable(
            "install databricks-sdk to use cache.volume.kind = databricks"
        ) from exc
    return Config(**{"retry_timeout_seconds": SDK_RETRY_SECONDS, **options})
