"""A real PgBouncer in transaction mode in front of the session's PostgreSQL, as Lakebase runs it.

Started once a session on a free loopback port; every database name maps to the same server.
PgBouncer refuses to run as root, so under root it runs as the `postgres` system user, like the
cluster. Skips (naming how to install it) when the binary is missing. Register the fixture by
importing it: `from tests.pgbouncer import pgbouncer_fixture  # noqa: F401`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.pg import PostgresServer, free_port

# A small server pool, so that a client's consecutive transactions land on different sessions.
SERVER_POOL_SIZE = 2


@dataclass
class PgBouncer:
    """A running PgBouncer: `dsn_for(dsn)` is the same database, reached through it."""

    port: int

    def dsn_for(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by PgBouncer's."""
        parts = urlsplit(dsn)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))


def find_pgbouncer() -> str | None:
    """The pgbouncer binary on PATH or where Debian puts it."""
    found = shutil.which("pgbouncer")
    if found is None and Path("/usr/sbin/pgbouncer").is_file():
        found = "/usr/sbin/pgbouncer"
    return found


def _wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen on {port} within {within}s")


@pytest.fixture(scope="session", name="pgbouncer")
def pgbouncer_fixture(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer with `pool_mode = transaction` in front of the session's PostgreSQL."""
    binary = find_pgbouncer()
    if binary is None:
        pytest.skip("pgbouncer is not installed (scripts/system-deps.sh installs it on Debian)")
    server = urlsplit(postgres_server.admin_dsn)
    root = Path(tempfile.mkdtemp(prefix="tts-pgbouncer-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root without a postgres system user to run pgbouncer as")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""\
[databases]
* = host={server.hostname} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
pool_mode = transaction
default_pool_size = {SERVER_POOL_SIZE}
max_client_conn = 200
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
"""
    )
    if run_as:
        for path in (root, *root.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
    process = subprocess.Popen(
        [*run_as, binary, str(root / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, process)
        yield PgBouncer(port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
