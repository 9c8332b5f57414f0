"""The CLI as a user runs it (subprocesses): --json output, settings with sources and
encrypted secrets, and bad input of every kind answered by one clear line, never a traceback."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import psycopg
import pytest
from tests.conftest import cli_env, run_cli


def ok(result: object) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    return result.stdout  # type: ignore[attr-defined,no-any-return]


def failed_cleanly(result: object, *needles: str) -> str:
    r = result
    assert r.returncode != 0, r.stdout  # type: ignore[attr-defined]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in r.stderr, r.stderr  # type: ignore[attr-defined]
    return r.stderr  # type: ignore[attr-defined,no-any-return]


def test_queue_commands_print_valid_json(db_url: str) -> None:
    env = cli_env(db_url)
    ok(run_cli("queue", "enqueue", "embedq.echo", "--args", '{"a": 1}', "--count", "3", env=env))
    ok(run_cli("queue", "enqueue", "embedq.fail", "--args", '{"permanent": true}', env=env))
    ok(run_cli("worker", "--exit-when-idle", env=env))
    status = json.loads(ok(run_cli("queue", "status", "--json", env=env)))
    assert status["overview"]["dead"] == 1 and status["queues"]["default"]["succeeded_1h"] == 3
    for args in (
        ["stats"],
        ["recent", "--limit", "5"],
        ["failed", "--details"],
        ["stuck"],
        ["workers"],
        ["metrics"],
        ["cleanup", "--days", "30"],
        ["health"],
    ):
        out = json.loads(ok(run_cli("queue", *args, "--json", env=env)))
        assert out is not None
    failed = json.loads(ok(run_cli("queue", "failed", "--json", env=env)))
    assert [f["task"] for f in failed] == ["embedq.fail"]
    recent = json.loads(ok(run_cli("queue", "recent", "--json", env=env)))
    assert len(recent) == 4
    shown = json.loads(ok(run_cli("queue", "show", str(failed[0]["id"]), "--json", env=env)))
    assert [e["event"] for e in shown["events"]][-1] == "dead"
    retried = json.loads(ok(run_cli("queue", "retry", "--all-dead", "--yes", "--json", env=env)))
    assert retried == {"retried": [failed[0]["id"]]}


def test_metrics_are_prometheus_text(db_url: str) -> None:
    env = cli_env(db_url)
    ok(run_cli("queue", "enqueue", "embedq.noop", "--queue", "high", env=env))
    text = ok(run_cli("queue", "metrics", env=env))
    assert 'embedq_jobs{queue="high",state="pending"} 1' in text
    assert "# TYPE embedq_workers_alive gauge" in text


def test_health_fails_when_due_jobs_have_no_worker(db_url: str) -> None:
    env = cli_env(db_url)
    assert run_cli("queue", "health", env=env).returncode == 0
    ok(run_cli("queue", "enqueue", "embedq.noop", env=env))
    result = run_cli("queue", "health", "--json", env=env)
    assert result.returncode == 1
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert not checks["workers"]["ok"] and "embedq worker" in checks["workers"]["detail"]


def test_pause_resume_and_clear(db_url: str) -> None:
    env = cli_env(db_url)
    ok(run_cli("queue", "enqueue", "embedq.noop", "--queue", "low", "--count", "2", env=env))
    assert json.loads(ok(run_cli("queue", "pause", "low", "--json", env=env)))["paused"] is True
    ok(run_cli("worker", "--exit-when-idle", env=env, timeout=60))
    status = json.loads(ok(run_cli("queue", "status", "--json", env=env)))
    assert status["queues"]["low"] == {**status["queues"]["low"], "paused": True, "pending": 2}
    ok(run_cli("queue", "resume", "low", env=env))
    failed_cleanly(run_cli("queue", "clear", env=env), "--yes")
    assert json.loads(ok(run_cli("queue", "clear", "--confirm", "--json", env=env))) == {
        "cleared": 2
    }
    back = json.loads(
        ok(run_cli("queue", "retry", "--cancelled", "--queue", "low", "--yes", "--json", env=env))
    )
    assert len(back["retried"]) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["queue", "enqueue", "no.such.task"], "no task named 'no.such.task'"),
        (["queue", "enqueue", "embedq.echo", "--args", "{bad"], "--args is not valid JSON"),
        (["queue", "enqueue", "embedq.echo", "--args", "[1]"], "must be a dict"),
        (["queue", "enqueue", "embedq.echo", "--priority", "-1"], "priority -1"),
        (["queue", "enqueue", "embedq.echo", "--queue", "bad queue"], "queue name"),
        (["queue", "pause", "nosuch"], "queue 'nosuch' is not known"),
        (["queue", "retry"], "name job ids, or --all-dead"),
        (["queue", "show", "987654"], "no job with id 987654"),
        (["settings", "set", "worker_concurrency", "lots"], "worker_concurrency"),
        (["settings", "set", "lease_s", "1"], "greater than or equal to 2"),
        (["settings", "set", "heartbeat_s", "--", "-5"], "heartbeat_s"),
        (["settings", "set", "no_such_setting", "1"], "unknown setting 'no_such_setting'"),
        (["settings", "set", "database_url", "postgresql://x"], "cannot be stored there"),
        (["settings", "get", "nope"], "unknown setting 'nope'"),
        (["worker", "--app", "no_such_module:app", "--exit-when-idle"], "cannot import the app"),
        (["worker", "--app", "json:dumps", "--exit-when-idle"], "is not an embedq.App"),
    ],
)
def test_bad_input_gets_one_clear_line(db_url: str, args: list[str], needle: str) -> None:
    failed_cleanly(run_cli(*args, env=cli_env(db_url)), needle)


def test_bad_flag_values_are_refused_by_the_parser(db_url: str) -> None:
    result = run_cli("worker", "--concurrency", "0", env=cli_env(db_url))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "concurrency" in result.stderr


def test_bad_environment_names_the_variable(db_url: str) -> None:
    env = cli_env(db_url, EMBEDQ_LEASE_S="soon")
    failed_cleanly(run_cli("queue", "status", env=env), "EMBEDQ_LEASE_S")


def test_cancel_of_unknown_job_says_so(db_url: str) -> None:
    result = run_cli("queue", "cancel", "424242", "--yes", env=cli_env(db_url))
    assert result.returncode == 1 and "424242" in result.stdout


def test_settings_show_sources_and_keep_secrets_secret(db_url: str) -> None:
    key = ok(run_cli("settings", "gen-key", env=cli_env(db_url))).strip()
    env = cli_env(db_url, EMBEDQ_SECRET_KEY=key, EMBEDQ_POLL_INTERVAL_S="7")
    ok(run_cli("settings", "set", "worker_concurrency", "25", env=env))
    ok(run_cli("settings", "set", "worker_queues", "high,default", env=env))
    ok(run_cli("settings", "set", "openai_api_key", "sk-very-secret-value", env=env))
    rows = {r["name"]: r for r in json.loads(ok(run_cli("settings", "list", "--json", env=env)))}
    assert (rows["worker_concurrency"]["value"], rows["worker_concurrency"]["source"]) == (
        25,
        "database",
    )
    assert rows["worker_queues"]["value"] == ["high", "default"]
    assert (rows["poll_interval_s"]["value"], rows["poll_interval_s"]["source"]) == (7, "env")
    assert (rows["lease_s"]["source"]) == "default"
    assert rows["openai_api_key"]["value"] == "********"
    assert rows["secret_key"]["value"] == "********"
    got = json.loads(ok(run_cli("settings", "get", "worker_concurrency", "--json", env=env)))
    assert got["value"] == 25
    # a flag beats the environment
    flagged = run_cli("--log-level", "warning", "settings", "get", "log_level", env=env)
    assert "WARNING" in ok(flagged) and "cli" in flagged.stdout
    everything = (
        run_cli("settings", "list", env=env).stdout
        + run_cli("settings", "list", "--json", env=env).stdout
    )
    assert "sk-very-secret-value" not in everything and key not in everything
    with psycopg.connect(db_url) as conn:
        [(stored, encrypted)] = conn.execute(
            "SELECT value::text, encrypted FROM embedq.settings WHERE name = 'openai_api_key'"
        ).fetchall()
    assert encrypted and "sk-very-secret" not in stored
    ok(run_cli("settings", "unset", "worker_concurrency", env=env))
    got = json.loads(ok(run_cli("settings", "get", "worker_concurrency", "--json", env=env)))
    assert (got["value"], got["source"]) == (10, "default")


def test_secrets_need_a_key_and_the_right_key(db_url: str) -> None:
    env = cli_env(db_url)
    failed_cleanly(
        run_cli("settings", "set", "openai_api_key", "sk-1", env=env),
        "EMBEDQ_SECRET_KEY is not set",
        "embedq settings gen-key",
    )
    failed_cleanly(
        run_cli(
            "settings",
            "set",
            "openai_api_key",
            "sk-1",
            env=cli_env(db_url, EMBEDQ_SECRET_KEY="short"),
        ),
        "not a valid Fernet key",
    )
    key1 = run_cli("settings", "gen-key", env=env).stdout.strip()
    key2 = run_cli("settings", "gen-key", env=env).stdout.strip()
    ok(
        run_cli(
            "settings", "set", "openai_api_key", "sk-1", env=cli_env(db_url, EMBEDQ_SECRET_KEY=key1)
        )
    )
    err = failed_cleanly(
        run_cli("settings", "list", env=cli_env(db_url, EMBEDQ_SECRET_KEY=key2)),
        "cannot be decrypted",
    )
    assert "sk-1" not in err


def test_stored_settings_reach_the_worker(db_url: str) -> None:
    env = cli_env(db_url)
    ok(run_cli("settings", "set", "worker_queues", "only-this", env=env))
    ok(run_cli("queue", "enqueue", "embedq.noop", "--queue", "other", env=env))
    ok(run_cli("worker", "--exit-when-idle", env=env, timeout=60))
    # the worker served only 'only-this' (from the settings table), so 'other' is untouched
    status = json.loads(ok(run_cli("queue", "status", "--json", env=env)))
    assert status["queues"]["other"]["pending"] == 1
    assert "only-this" in status["queues"]


def test_unreachable_server_is_one_line(db_url: str) -> None:
    env = cli_env("postgresql://app:pw@127.0.0.1:1/app", EMBEDQ_CONNECT_TIMEOUT_S="2")
    err = failed_cleanly(
        run_cli("queue", "status", env=env), "cannot reach PostgreSQL at app@127.0.0.1:1/app"
    )
    assert "pw" not in err.replace("password", "")


@pytest.fixture
def fake_pg_rejecting_password() -> Iterator[int]:
    """A local server speaking the PostgreSQL wire protocol that rejects every password."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def read_exact(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    length, code = struct.unpack("!ii", read_exact(conn, 8))
                    if code in (80877103, 80877104):  # SSLRequest / GSSENCRequest
                        conn.sendall(b"N")
                        continue
                    read_exact(conn, length - 8)  # the StartupMessage
                    break
                conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # cleartext password, please
                kind = read_exact(conn, 1)
                (plen,) = struct.unpack("!i", read_exact(conn, 4))
                read_exact(conn, plen - 4)
                assert kind == b"p"
                fields = (
                    b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "app"\0\0'
                )
                conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
            except (ConnectionError, OSError, AssertionError):
                pass

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_wrong_password_is_one_line(fake_pg_rejecting_password: int) -> None:
    url = f"postgresql://app:wrong-pw@127.0.0.1:{fake_pg_rejecting_password}/app?sslmode=disable"
    err = failed_cleanly(
        run_cli("db", "upgrade", env=cli_env(url)),
        "rejected the credentials",
        "EMBEDQ_DATABASE_URL",
    )
    assert "wrong-pw" not in err
