"""Versioned SQL migrations for the audit database (`actors/outbox/sql/NNNN_name.sql`, applied in order).

Each file runs once, in its own transaction, and is recorded in `schema_migrations`. Migrations
only ever add: a file that has been applied is never edited or dropped, and no migration drops data.
Several instances may start at once: a PostgreSQL advisory lock serialises them.
"""

from __future__ import annotations

from importlib import resources

import asyncpg

# Arbitrary constant shared by every Kairos instance: "only one migrator at a time".
_LOCK_ID = 0x4B414952  # "KAIR"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     TEXT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def available() -> list[tuple[str, str]]:
    """(version, sql) of every migration shipped in the package, in version order."""
    folder = resources.files("actors.outbox") / "sql"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


async def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now (empty when up to date)."""
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate_connection(conn)
    finally:
        await conn.close()


async def migrate_connection(conn: asyncpg.Connection) -> list[str]:
    """`migrate` on an open connection (the audit worker reuses its own)."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(_CREATE_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in available():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now


async def applied(database_url: str) -> list[str]:
    """Versions recorded as applied, in order (for `kairos migrate --status` and tests)."""
    conn = await asyncpg.connect(database_url)
    try:
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            return []
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r["version"] for r in rows]
    finally:
        await conn.close()
