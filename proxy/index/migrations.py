"""The index's schema: its migrations in order, and the migrate step each replica runs at start."""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, Final

from proxy.config import ConfigError

log = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Each migration runs once, in order, inside the transaction that holds the advisory lock;
# add new ones at the end and never edit an applied one.
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS {schema}.tts_cache_entries (
            user_id      text        NOT NULL,
            thread_id    text        NOT NULL,
            message_id   text        NOT NULL,
            voice        text        NOT NULL,
            provider     text,
            path         text        NOT NULL,
            content_type text        NOT NULL,
            bytes        bigint      NOT NULL,
            body_sha256  text        NOT NULL,
            text_sha256  text        NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            last_hit_at  timestamptz NOT NULL DEFAULT now(),
            hits         bigint      NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, thread_id, message_id, voice)
        );
        CREATE INDEX IF NOT EXISTS tts_cache_entries_last_hit_at
            ON {schema}.tts_cache_entries (last_hit_at);
        CREATE INDEX IF NOT EXISTS tts_cache_entries_user_created_at
            ON {schema}.tts_cache_entries (user_id, created_at DESC);
        """,
    ),
    (
        2,
        # Leases by name (the janitor's): held by `holder` until `expires_at`, server time.
        # A table, not a session advisory lock, so that leadership survives a transaction-mode
        # pooler, which hands one server session to many clients in turn.
        """
        CREATE TABLE IF NOT EXISTS {schema}.leases (
            name        text        PRIMARY KEY,
            holder      text        NOT NULL,
            expires_at  timestamptz NOT NULL,
            acquired_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        3,
        # Whether the entries table names everything one Volume holds (proxy/index/coverage.py):
        # covered = generation when a walk that started at that generation reached its end.
        """
        CREATE TABLE IF NOT EXISTS {schema}.tts_cache_volumes (
            volume      text        PRIMARY KEY,
            generation  bigint      NOT NULL DEFAULT 0,
            covered     bigint,
            walked_at   timestamptz
        );
        """,
    ),
    (
        4,
        # One fill per key across replicas (proxy/index/fill_leases.py): the replica filling a
        # key holds its row until the recording is on the Volume. UNLOGGED: a lease outlives
        # nothing (a crash of PostgreSQL, or Lakebase's compute restart, empties the table, and
        # the cost is at most one synthesis more), so its two writes a miss skip the WAL.
        """
        CREATE UNLOGGED TABLE IF NOT EXISTS {schema}.fill_leases (
            flight      text        PRIMARY KEY,
            holder      text        NOT NULL,
            expires_at  timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS fill_leases_expires_at ON {schema}.fill_leases (expires_at);
        """,
    ),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
MIGRATION_LOCK_NAMESPACE: Final = "tts-cache-proxy"


def quote_schema(name: str) -> str:
    """`name` as a quoted SQL identifier; ConfigError unless it is a plain identifier."""
    if _IDENTIFIER.fullmatch(name) is None:
        raise ConfigError(
            "index.schema", f"must be letters, digits and _ (at most 63), got {name!r}"
        )
    return '"' + name + '"'


def entries_table(schema: str) -> str:
    """The qualified name of the entries table in `schema` (ConfigError on a bad schema name)."""
    return f"{quote_schema(schema)}.tts_cache_entries"


def volumes_table(schema: str) -> str:
    """The qualified name of the table saying which Volumes the entries table covers."""
    return f"{quote_schema(schema)}.tts_cache_volumes"


def lock_id(namespace: str, schema: str) -> int:
    """A 64-bit advisory lock id for `namespace` within `schema`."""
    # Per schema, so two proxies sharing a database with different schemas do not serialize.
    digest = hashlib.sha256(f"{namespace}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(con: Any, schema: str) -> None:
    """Bring `schema` to SCHEMA_VERSION on connection `con`, one replica at a time."""
    quoted = quote_schema(schema)
    async with con.transaction():
        # Transaction-scoped, so a replica that dies mid-migration releases it with its
        # connection; the second replica waits, then finds the work done.
        await con.execute(
            "SELECT pg_advisory_xact_lock($1)", lock_id(MIGRATION_LOCK_NAMESPACE, schema)
        )
        # CREATE SCHEMA needs CREATE on the database even when the schema exists, which a
        # role given only a pre-made schema (common on Lakebase) does not have.
        exists = await con.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
        if not exists:
            await con.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await con.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}.schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await con.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {quoted}.schema_version"
        )
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            await con.execute(sql.format(schema=quoted))
            await con.execute(f"INSERT INTO {quoted}.schema_version (version) VALUES ($1)", version)
            log.info("index schema %s migrated to version %d", schema, version)
        if current > SCHEMA_VERSION:
            log.warning(
                "index schema %s is at version %d, newer than this proxy's %d",
                schema,
                current,
                SCHEMA_VERSION,
            )
