"""Many processes starting at once on one database: migrations are applied exactly once and
every process comes up; a process whose code is older than the schema refuses, in one line.

Real `embedq` subprocesses against the real embedded PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
from tests.conftest import cli_env, run_cli

from embedq import migrations


def launch(
    n: int, args: list[str], env: dict[str, str], tmp_path: Path
) -> list[tuple[int, str, str]]:
    """Start `n` copies of `embedq *args` at once; (exit code, stdout, stderr) of each."""
    procs = []
    for i in range(n):
        out = (tmp_path / f"p{i}.out").open("w+")
        err = (tmp_path / f"p{i}.err").open("w+")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "embedq", *args],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    text=True,
                ),
                out,
                err,
            )
        )
    results = []
    try:
        for p, out, err in procs:
            code = p.wait(240)
            out.seek(0)
            err.seek(0)
            results.append((code, out.read(), err.read()))
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
            out.close()
            err.close()
    return results


def migration_rows(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT version, name FROM embedq.migrations ORDER BY version"
        ).fetchall()


def shipped() -> list[tuple[int, str]]:
    return [(m.version, m.name) for m in migrations.shipped()]


def test_eight_upgrades_at_once_apply_each_migration_exactly_once(
    empty_db_url: str, tmp_path: Path
) -> None:
    env = cli_env(empty_db_url)
    results = launch(8, ["db", "upgrade", "--json"], env, tmp_path)
    for code, out, err in results:
        assert code == 0, (out, err)
        assert "Traceback" not in err, err
    reports = [json.loads(out) for _, out, _ in results]
    everything = [f"{v:04d}_{name}" for v, name in shipped()]
    assert everything[0] == "0001_queue"
    applied = sorted((r["applied"] for r in reports), key=len, reverse=True)
    assert applied == [everything] + [[]] * 7, reports
    assert {r["version"] for r in reports} == {migrations.CODE_VERSION}
    assert migration_rows(empty_db_url) == shipped()

    verify = run_cli("db", "verify", env=env)
    assert verify.returncode == 0, (verify.stdout, verify.stderr)
    status = run_cli("db", "status", "--json", env=env)
    assert status.returncode == 0, (status.stdout, status.stderr)
    assert json.loads(status.stdout)["current"] is True


def test_four_workers_started_at_once_on_an_empty_database_all_come_up(
    empty_db_url: str, tmp_path: Path
) -> None:
    env = cli_env(empty_db_url)
    results = launch(4, ["worker", "--exit-when-idle"], env, tmp_path)
    for code, out, err in results:
        assert code == 0, (out, err)
        assert "does not exist" not in err and "Traceback" not in err, err
        assert "queue drained" in err, err
    assert migration_rows(empty_db_url) == shipped()
    with psycopg.connect(empty_db_url) as conn:
        states = conn.execute("SELECT state FROM embedq.workers").fetchall()
    assert states == [("stopped",)] * 4
    verify = run_cli("db", "verify", env=env)
    assert verify.returncode == 0, (verify.stdout, verify.stderr)


def test_code_older_than_the_schema_refuses_to_start(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO embedq.migrations (version, name, checksum) "
            "VALUES (9999, 'from_the_future', 'feedfacefeedface')"
        )
    env = cli_env(db_url)
    for args in (["worker", "--exit-when-idle"], ["worker", "--exit-when-idle", "--no-migrate"]):
        r = run_cli(*args, env=env, timeout=60)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
        assert "newer" in r.stderr and "9999" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    # It refused before doing anything: no worker registered, nothing applied or removed.
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM embedq.workers").fetchone() == (0,)
        versions = conn.execute("SELECT version FROM embedq.migrations ORDER BY 1").fetchall()
    assert versions == [(v,) for v, _ in shipped()] + [(9999,)]

    status = run_cli("db", "status", env=env)
    assert status.returncode == 1, (status.stdout, status.stderr)
    assert "newer" in status.stdout + status.stderr
    assert "Traceback" not in status.stdout + status.stderr
    status_json = run_cli("db", "status", "--json", env=env)
    assert status_json.returncode == 1
    report = json.loads(status_json.stdout)
    assert report["database_version"] == 9999 and report["current"] is False

    upgrade = run_cli("db", "upgrade", env=env)
    assert upgrade.returncode == 1, (upgrade.stdout, upgrade.stderr)
    assert "newer" in upgrade.stderr and "Traceback" not in upgrade.stderr


def test_worker_with_no_migrate_on_an_empty_database_refuses_in_one_line(
    empty_db_url: str,
) -> None:
    r = run_cli("worker", "--no-migrate", "--exit-when-idle", env=cli_env(empty_db_url), timeout=60)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "embedq db upgrade" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with psycopg.connect(empty_db_url) as conn:
        schema = conn.execute("SELECT to_regclass('embedq.migrations')").fetchone()
    assert schema == (None,)  # nothing was created
