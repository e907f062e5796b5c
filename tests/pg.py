"""A real PostgreSQL for the tests: a throwaway cluster (or TTS_PROXY_TEST_DSN), a database a test.

The cluster is started with initdb and pg_ctl on a free loopback port. PostgreSQL refuses to run as
root, so under root the binaries run as the `postgres` system user (runuser); otherwise as the user
running the tests. Register the fixtures by importing them into a test module (or conftest):
`from tests.pg import postgres_dsn, postgres_server  # noqa: F401`.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from glob import glob
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DSN_VARIABLE = "TTS_PROXY_TEST_DSN"
# The one role pg_hba.conf checks a password for (scram-sha-256); every other role is trusted.
PASSWORD_ROLE = "tts_password_role"

CHAT_MESSAGES_DDL = """
    CREATE TABLE IF NOT EXISTS chat_messages (
        message_id text PRIMARY KEY,
        user_id    text NOT NULL,
        thread_id  text NOT NULL,
        content    text NOT NULL DEFAULT '',
        metadata   jsonb
    )
"""

_HBA = f"""\
local all all trust
host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""

# Durability is pointless for a throwaway cluster and costs seconds of fsync.
_FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"

_databases = itertools.count(1)


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb and pg_ctl, else the one on PATH."""

    def major(path: str) -> int:
        version = Path(path).parent.name
        return int(version) if version.isdigit() else 0

    for candidate in sorted(glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if Path(candidate, "initdb").is_file() and Path(candidate, "pg_ctl").is_file():
            return Path(candidate)
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        # Distributions link pg_ctl into PATH but keep initdb beside the real binary.
        bindir = Path(on_path).resolve().parent
        if (bindir / "initdb").is_file():
            return bindir
    return None


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def with_user(dsn: str, user: str) -> str:
    """`dsn` logging in as `user`, with no password in it."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests may use; `owned` when this session started it."""

    admin_dsn: str
    owned: bool = False
    bindir: Path | None = None
    root: Path | None = None
    port: int = 0
    run_as: list[str] = field(default_factory=list)
    running: bool = True

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        assert self.root is not None
        return self.root / "data"

    def start(self) -> None:
        """Start the cluster again on the same port (after `stop`)."""
        self._require_owned()
        root = self.data_dir.parent
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {root} {_FAST}"
        self._pg_ctl("-l", str(root / "postgres.log"), "-o", options, "-w", "-t", "30", "start")
        self.running = True

    def stop(self) -> None:
        """Stop the cluster at once, closing every connection (`pg_ctl stop -m fast`)."""
        self._require_owned()
        self._pg_ctl("-m", "fast", "-w", "-t", "30", "stop")
        self.running = False

    def pause(self) -> None:
        """Freeze every server process (SIGSTOP): connections stay open and nothing answers."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let the frozen server processes run again (SIGCONT)."""
        for pid in reversed(self._processes()):
            os.kill(pid, signal.SIGCONT)

    def _processes(self) -> list[int]:
        # The postmaster first, so it cannot fork a new backend while its children are frozen.
        self._require_owned()
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        found = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == postmaster:
                found.append(int(stat.parent.name))
        return found

    def ensure_running(self) -> None:
        """Start the cluster if a test left it stopped."""
        if self.owned and not self.running:
            self.start()

    def remove(self) -> None:
        """Stop the cluster if it runs and delete its folder."""
        if not self.owned or self.root is None:
            return
        if self.running:
            try:
                self.stop()
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        """What the server wrote to its log so far."""
        if self.root is None:
            return ""
        path = self.root / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _pg_ctl(self, *args: str) -> None:
        assert self.bindir is not None
        _run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args])

    def _require_owned(self) -> None:
        if not self.owned:
            pytest.skip(f"the server from {DSN_VARIABLE} cannot be stopped by the tests")


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def start_cluster() -> PostgresServer:
    """initdb a cluster in a temporary folder and start it on a free port."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL binaries found; set {DSN_VARIABLE} to use a server")
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="tts-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root without a postgres system user to run PostgreSQL as")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer("", owned=True, bindir=bindir, root=root, run_as=run_as)
    try:
        _run(
            [
                *run_as,
                str(bindir / "initdb"),
                "-D",
                str(server.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ]
        )
        hba = server.data_dir / "pg_hba.conf"
        hba.write_text(_HBA)
        for attempt in range(3):
            server.port = free_port()
            try:
                server.start()
                break
            except subprocess.CalledProcessError:
                # Another process may have taken the port between the probe and the start.
                if attempt == 2:
                    raise
    except subprocess.CalledProcessError as exc:
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace"
        )
        log = server.log()
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {output}\n{log}") from exc
    server.admin_dsn = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL: TTS_PROXY_TEST_DSN when set, else a cluster started for it."""
    external = os.environ.get(DSN_VARIABLE)
    if external:
        yield PostgresServer(external)
        return
    server = start_cluster()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def postgres_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A DSN of a new, empty database, dropped after the test."""
    postgres_server.ensure_running()
    name = f"test_{os.getpid()}_{next(_databases)}"
    admin = await asyncpg.connect(postgres_server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(postgres_server.admin_dsn, name)
    finally:
        postgres_server.ensure_running()
        admin = await asyncpg.connect(postgres_server.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass(frozen=True)
class ChatMessage:
    """A row of the legacy backend's chat_messages table."""

    message_id: str
    user_id: str
    thread_id: str
    content: str = ""
    metadata: dict[str, Any] | None = None


async def create_chat_messages(dsn: str, rows: Iterable[ChatMessage] = ()) -> None:
    """Create the legacy chat_messages table (if missing) and insert `rows`."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(CHAT_MESSAGES_DDL)
        await con.executemany(
            "INSERT INTO chat_messages (message_id, user_id, thread_id, content, metadata)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            [
                (
                    row.message_id,
                    row.user_id,
                    row.thread_id,
                    row.content,
                    None if row.metadata is None else json.dumps(row.metadata),
                )
                for row in rows
            ],
        )
    finally:
        await con.close()


async def message_metadata(dsn: str, message_id: str) -> dict[str, Any] | None:
    """The metadata column of one chat_messages row, parsed (None when NULL)."""
    con = await asyncpg.connect(dsn)
    try:
        raw = await con.fetchval(
            "SELECT metadata::text FROM chat_messages WHERE message_id = $1", message_id
        )
    finally:
        await con.close()
    return None if raw is None else dict(json.loads(raw))


async def set_password_role(dsn: str, password: str, valid_until: float | None = None) -> str:
    """Create or update PASSWORD_ROLE with `password`, allowed to migrate in the database of `dsn`.

    `valid_until` (epoch seconds) makes PostgreSQL refuse the password at login from then on,
    as Lakebase refuses an expired token. Returns a DSN for that role with no password in it:
    the password must come from elsewhere.
    """
    database = urlsplit(dsn).path.lstrip("/")
    literal = "'" + password.replace("'", "''") + "'"
    until = (
        "infinity" if valid_until is None else datetime.fromtimestamp(valid_until, UTC).isoformat()
    )
    con = await asyncpg.connect(dsn)
    try:
        exists = await con.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PASSWORD_ROLE)
        verb = "ALTER" if exists else "CREATE"
        await con.execute(
            f"{verb} ROLE {PASSWORD_ROLE} LOGIN PASSWORD {literal} VALID UNTIL '{until}'"
        )
        await con.execute(f'GRANT CREATE ON DATABASE "{database}" TO {PASSWORD_ROLE}')
    finally:
        await con.close()
    return with_user(dsn, PASSWORD_ROLE)
