"""Listening: an address the proxy cannot take is a one-line start-up error naming the key."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from typing import Final

from proxy.settings import ConfigError

# What to name in the error for the proxy's own port under `serve`.
SERVE_PORT: Final = ("server.port", "--port or server.port")

# bind() failures the operator fixes by choosing another address or port.
BIND_ERRNOS: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def bind_error(exc: OSError, host: str, port: int, key: str, change: str) -> ConfigError | None:
    """The start-up error for a failed bind on host:port, or None for any other OSError."""
    if exc.errno not in BIND_ERRNOS:
        return None
    reason = os.strerror(exc.errno).lower()
    message = f"cannot listen on {host}:{port}: {reason}; choose another with {change}"
    return ConfigError(key, message)


@contextlib.contextmanager
def listening(host: str, port: int, key: str, change: str) -> Iterator[None]:
    """Turn a failed bind inside the block into a `ConfigError` naming `key` (exit 2)."""
    try:
        yield
    except OSError as exc:
        error = bind_error(exc, host, port, key, change)
        if error is None:
            raise
        raise error from None


def check_free(host: str, port: int, key: str, change: str, *, reuse_port: bool = False) -> None:
    """Bind host:port once and let go, so a taken address stops start-up before any fork."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with listening(host, port, key, change), socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
