"""Numbered SQL migrations, applied under an advisory lock, recorded in `migrations`.

Every process checks the schema version before it works: code older than the database refuses
to start (`SchemaError`), so a rolling upgrade can never run old code on a new schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from embedq.errors import DatabaseError, ExtensionMissing, SchemaError

log = logging.getLogger("embedq.migrations")

# Advisory lock namespace (first key) shared by every embedq lock; the second key picks the duty.
LOCK_NAMESPACE = 0x656D6271  # "embq"
MIGRATION_LOCK = 1
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def shipped() -> list[Migration]:
    """The migrations in this package, in order."""
    found = []
    for entry in resources.files(__name__).iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


CODE_VERSION = shipped()[-1].version


def render(text: str, schema: str) -> sql.Composed:
    """SQL text with {schema} and {channel} filled in safely."""
    return sql.SQL(text).format(
        schema=sql.Identifier(schema), channel=sql.Literal(f"{schema}_jobs")
    )


def canonical_schema() -> str:
    return (resources.files("embedq") / "schema.sql").read_text()


@dataclass(frozen=True)
class Status:
    code_version: int
    database_version: int
    applied: list[dict[str, Any]]
    pending: list[int]

    @property
    def current(self) -> bool:
        return self.database_version == self.code_version


async def _schema_exists(conn: Conn, schema: str) -> bool:
    cur = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AS present", (f'"{schema}".migrations',)
    )
    row = await cur.fetchone()
    return bool(_first(row))


def _first(row: Any) -> Any:
    if row is None:
        return None
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


async def status(conn: Conn, schema: str) -> Status:
    """Which migrations the database has and which it lacks."""
    applied: list[dict[str, Any]] = []
    if await _schema_exists(conn, schema):
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            sql.SQL(
                "SELECT version, name, checksum, applied_at FROM {}.migrations ORDER BY version"
            ).format(sql.Identifier(schema))
        )
        applied = list(await cur.fetchall())
    db_version = max((int(r["version"]) for r in applied), default=0)
    done = {int(r["version"]) for r in applied}
    pending = [m.version for m in shipped() if m.version not in done]
    return Status(CODE_VERSION, db_version, applied, pending)


async def check_current(conn: Conn, schema: str) -> Status:
    """Raise SchemaError unless the database schema is exactly what this code needs."""
    st = await status(conn, schema)
    if st.database_version > st.code_version:
        raise SchemaError(
            f"the database schema {schema!r} is at version {st.database_version}, newer than "
            f"this embedq (knows up to {st.code_version}). Upgrade embedq on this host "
            "(pip install -U embedq) before starting it."
        )
    if st.pending:
        raise SchemaError(
            f"the database schema {schema!r} lacks migrations {st.pending}. "
            "Run `embedq db upgrade` (workers do this at start unless --no-migrate)."
        )
    return st


async def ensure_vector(conn: Conn, where: str) -> None:
    """Create pgvector if needed; a server without it gets one clear message."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT installed_version FROM pg_available_extensions WHERE name = 'vector'")
    row = await cur.fetchone()
    if row is None:
        raise ExtensionMissing(
            f"PostgreSQL at {where} has no pgvector extension. Install pgvector 0.5 or newer on "
            "that server (Debian: apt install postgresql-NN-pgvector; Docker: the "
            "pgvector/pgvector image), or unset EMBEDQ_DATABASE_URL to use the embedded server."
        )
    if row["installed_version"] is None:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege:
            raise ExtensionMissing(
                f"pgvector is available on {where} but not installed in this database, and "
                "this user may not create it. Ask an administrator to run "
                "'CREATE EXTENSION vector;' in the database."
            ) from None


async def upgrade(
    conn: Conn, schema: str, *, where: str = "the database", lock_timeout_s: float = 120.0
) -> list[Migration]:
    """Apply every pending migration; safe to call from many processes at once.

    The first process takes the advisory lock and migrates; the others wait for it and then
    find nothing left to do. Returns the migrations this call applied.
    """
    deadline = time.monotonic() + lock_timeout_s
    while True:
        cur = await conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, MIGRATION_LOCK)
        )
        if _first(await cur.fetchone()):
            break
        if time.monotonic() > deadline:
            raise DatabaseError(
                f"another process has held the migration lock for over {lock_timeout_s:.0f} s. "
                "Look for a stuck `embedq db upgrade` (pg_stat_activity) and stop it."
            )
        await asyncio.sleep(0.1)
    try:
        await ensure_vector(conn, where)
        ident = sql.Identifier(schema)
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, checksum text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        st = await status(conn, schema)
        if st.database_version > st.code_version:
            await check_current(conn, schema)
        applied = []
        for m in shipped():
            if m.version not in st.pending:
                continue
            async with conn.transaction():
                await conn.execute(render(m.text, schema))
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {}.migrations (version, name, checksum) VALUES (%s, %s, %s)"
                    ).format(ident),
                    (m.version, m.name, m.checksum),
                )
            log.info("applied migration %04d_%s to schema %s", m.version, m.name, schema)
            applied.append(m)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, MIGRATION_LOCK))


_SNAPSHOT_QUERIES = {
    "columns": """
        SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
               || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
               || CASE WHEN a.attidentity <> '' THEN ' IDENTITY ' || a.attidentity::text ELSE '' END
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %(s)s AND c.relkind IN ('r', 'p', 'v') AND a.attnum > 0
          AND NOT a.attisdropped AND c.relname <> 'migrations'""",
    "indexes": """
        SELECT indexdef FROM pg_indexes WHERE schemaname = %(s)s AND tablename <> 'migrations'""",
    "constraints": """
        SELECT c.relname || ' ' || pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(s)s AND c.relname <> 'migrations'""",
    "functions": """
        SELECT pg_get_functiondef(p.oid) FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(s)s""",
    "triggers": """
        SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(s)s AND NOT t.tgisinternal""",
    "types": """
        SELECT t.typname || ' ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %(s)s
        GROUP BY t.typname""",
}


async def snapshot(conn: Conn, schema: str) -> dict[str, list[str]]:
    """A schema's tables, indexes, constraints, functions, triggers and types, as sorted text
    with the schema's own name replaced, so two schemas can be compared."""
    out: dict[str, list[str]] = {}
    for kind, query in _SNAPSHOT_QUERIES.items():
        cur = await conn.execute(query, {"s": schema})
        rows = [str(_first(r)) for r in await cur.fetchall()]
        out[kind] = sorted(
            r.replace(f'"{schema}"', "{schema}").replace(schema, "{schema}")
            for r in rows
            if not _DATA_INDEX.search(r)
        )
    return out


# Each vector space gets its own HNSW index when it is created: data, not schema.
_DATA_INDEX = re.compile(r"chunks_space_\d+_hnsw")


async def verify(conn: Conn, schema: str) -> list[str]:
    """Differences between the live schema and the canonical one; empty when they agree.

    Also reports applied migrations whose file changed since they ran.
    """
    problems = []
    st = await status(conn, schema)
    by_version = {m.version: m for m in shipped()}
    for row in st.applied:
        m = by_version.get(int(row["version"]))
        if m is not None and m.checksum != row["checksum"]:
            problems.append(
                f"migration {m.version:04d}_{m.name} changed since it was applied "
                f"(checksum {row['checksum']} in the database, {m.checksum} shipped)"
            )
    if st.pending:
        problems.append(f"migrations not applied: {st.pending}; run `embedq db upgrade`")
        return problems
    live = await snapshot(conn, schema)
    scratch = f"{schema}_verify_{secrets.token_hex(4)}"
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(scratch)))
            await conn.execute(render(canonical_schema(), scratch))
            expected = await snapshot(conn, scratch)
    except psycopg.Error as exc:
        raise DatabaseError(f"could not build the canonical schema to compare: {exc}") from exc
    for kind in expected:
        for item in sorted(set(expected[kind]) - set(live[kind])):
            problems.append(f"missing {kind[:-1]}: {item}")
        for item in sorted(set(live[kind]) - set(expected[kind])):
            problems.append(f"unexpected {kind[:-1]}: {item}")
    return problems
