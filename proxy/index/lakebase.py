"""The Lakebase password: the app's Databricks OAuth token, fetched anew in a thread, kept fresh."""

from __future__ import annotations

from typing import Any

from proxy.index.rotating_password import IssuedToken, RotatingPassword
from proxy.storage.databricks import auth


class DatabricksToken:
    """A TokenSource: a new token from databricks-sdk's unified auth on every call (blocking).

    In a Databricks App that is OAuth M2M with the app's service principal (`DATABRICKS_HOST`,
    `DATABRICKS_CLIENT_ID`, `DATABRICKS_CLIENT_SECRET`), whose token Lakebase takes as the
    password. Credentials that give no expiry (a personal access token) are re-read on a timer.
    """

    def __init__(self, **config_options: Any) -> None:
        self._options = config_options
        self._config: Any = None

    def __call__(self) -> IssuedToken:
        """A freshly issued token and its expiry; raises what the SDK raised."""
        config = self._config
        if config is None:
            config = self._config = _new_config(self._options)
        else:
            # A new credentials provider: the SDK's cached token would come back otherwise,
            # and the point of refreshing early is a token with its whole life ahead.
            config.init_auth()
        try:
            token = config.oauth_token()
        except ValueError:
            # Not an OAuth credential, or its token endpoint refused: the header says which.
            return IssuedToken(_bearer(config.authenticate()), None)
        expiry = token.expiry.timestamp() if token.expiry is not None else None
        return IssuedToken(str(token.access_token), expiry)


def _new_config(options: dict[str, Any]) -> Any:
    try:
        from databricks.sdk.core import Config
    except ImportError as exc:  # pragma: no cover - databricks-sdk is a dependency
        raise RuntimeError("install databricks-sdk to use Databricks authentication") from exc
    return Config(**{"retry_timeout_seconds": auth.SDK_RETRY_SECONDS, **options})


def _bearer(headers: dict[str, str]) -> str:
    value = str(headers.get("Authorization", ""))
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RuntimeError("Databricks authentication gave no bearer token")
    return token


def lakebase_password(**options: Any) -> RotatingPassword:
    """The app's OAuth token as a RotatingPassword (start it; the index pool does)."""
    return RotatingPassword(DatabricksToken(), **options)
