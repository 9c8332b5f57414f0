"""`embedq serve`, end to end: the real process on a real port, driven over HTTP and with
signals, as a deployment would. What it must survive: a first start on nothing, a restart, a
SIGTERM with a job running, its database refusing or hanging and coming back, and log
collectors. The database outages go through tests/tcp_proxy.py, cut or stalled at will.

Waits poll until a condition holds or a generous deadline passes. The timing assertions are
the contract of the database gate (health.py): it shuts within one probe of an outage, and
once shut, answers come at once instead of after the pool's acquire time-out each.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from tests.conftest import cli_env, run_cli
from tests.fake_servers import FakeOpenAI
from tests.served import TOKEN, ServeProc, Servers, wait_for
from tests.tcp_proxy import TcpProxy, free_port

from embedq.api.app import ACQUIRE_TIMEOUT_S
from embedq.api.health import PROBE_EVERY_S, PROBE_TIMEOUT_S

SHUTDOWN_GRACE_S = 30  # the default shutdown_grace_s: SIGTERM must end the process within it
FAKE = {"EMBEDQ_EMBEDDING_PROVIDER": "fake"}
GATE_SHUT = "the database is unreachable (for "  # the database gate's own 503


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    s.cleanup()


def admin_token() -> str:
    return "eq_" + secrets.token_urlsafe(32)


def client(server: ServeProc, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.auth(token), timeout=30)


def job_state(db_url: str, job_id: int) -> tuple[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT state::text, attempts FROM embedq.jobs WHERE id = %(id)s "
            "UNION ALL SELECT state::text, attempts FROM embedq.jobs_archive WHERE id = %(id)s",
            {"id": job_id},
        ).fetchone()
    assert row is not None, f"job {job_id} is gone"
    return row[0], int(row[1])


def assert_clean_exit(server: ServeProc, rc: int) -> None:
    assert rc == 0, f"exit status {rc}\n{server.logs()}"
    assert "Traceback" not in server.stderr(), server.logs()


# --- 1. as the README does: a fresh data directory, nothing configured -------------------


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh data directory; an embedded PostgreSQL left running there (its last `serve`
    was SIGKILLed by a failing test) is stopped at the end. Not under pytest's tmp_path: run
    as root, the server runs as the `pgserver` user, and any pytest session resets
    /tmp/pytest-of-root to mode 0700, which would lock it out of its own files."""
    base = Path(tempfile.mkdtemp(prefix="embedq-serve-"))
    base.chmod(0o755)
    data = base / "data"
    try:
        yield data
    finally:
        pid_file = data / "pgdata" / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
        shutil.rmtree(base, ignore_errors=True)


def test_first_start_prints_a_token_that_survives_a_restart(
    data_dir: Path, servers: Servers
) -> None:
    env = {k: v for k, v in cli_env("").items() if k != "EMBEDQ_DATABASE_URL"}
    first = servers.start(env, data_dir=data_dir)
    first.wait_ready(timeout=180)  # the embedded PostgreSQL is initialised first
    token = first.first_token()
    assert "first admin token" in first.stdout()

    with client(first, token) as http:
        r = http.post("/v1/collections", json={"name": "notes", "provider": "fake"})
        assert r.status_code == 201, r.text
        r = http.put(
            "/v1/collections/notes/documents/otters",
            params={"wait": "true"},
            json={"text": "Sea otters hold hands while they sleep.", "title": "Otters"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "embedded"
        r = http.post("/v1/collections/notes/search", json={"query": "otters sleep"})
        assert r.status_code == 200, r.text
        assert [h["key"] for h in r.json()["hits"]] == ["otters"]

    for check in ("--ready", "--live"):
        done = run_cli("health", check, "--url", first.url, env=env, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("ok:"), done.stdout

    nobody = f"http://127.0.0.1:{free_port()}"
    done = run_cli("health", "--ready", "--url", nobody, env=env, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAIL: {nobody}/health/ready" in done.stdout
    assert f"cannot reach {nobody}/health/ready" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr

    started = time.monotonic()
    assert_clean_exit(first, first.stop(timeout=SHUTDOWN_GRACE_S + 15))
    assert time.monotonic() - started < SHUTDOWN_GRACE_S

    again = servers.start(env, data_dir=data_dir)
    again.wait_ready(timeout=120)
    assert "first admin token" not in again.stdout()
    assert not TOKEN.search(again.stdout()), again.stdout()
    with client(again, token) as http:
        r = http.get("/v1/collections/notes/documents/otters")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["text"] == "Sea otters hold hands while they sleep."
        assert doc["status"] == "embedded", doc
        r = http.post("/v1/collections/notes/search", json={"query": "otters"})
        assert [h["key"] for h in r.json()["hits"]] == ["otters"]
    assert_clean_exit(again, again.stop(timeout=SHUTDOWN_GRACE_S + 15))
    # The last process to leave stops the embedded server.
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


# --- 2. SIGTERM with a job running -------------------------------------------------------


def test_sigterm_lets_the_running_job_finish(db_url: str, servers: Servers) -> None:
    token = admin_token()
    server = servers.start(cli_env(db_url, EMBEDQ_ADMIN_TOKEN=token, **FAKE))
    server.wait_ready()
    with client(server, token) as http:
        r = http.post("/v1/jobs", json={"task": "embedq.sleep", "args": {"seconds": 2}})
        assert r.status_code == 202, r.text
        job_id = int(r.json()["id"])
        wait_for(
            lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "running",
            30,
            f"job {job_id} to run",
            server.logs,
        )

    assert_clean_exit(server, server.stop(timeout=SHUTDOWN_GRACE_S + 15))
    assert job_state(db_url, job_id) == ("succeeded", 1)


# --- 3. the database goes away and comes back --------------------------------------------


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    p = TcpProxy.for_database(pg_url)
    yield p
    p.close()


def _timed(http: httpx.Client, method: str, path: str, **kw: Any) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    r = http.request(method, path, **kw)
    return r, time.perf_counter() - started


def assert_database_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "database_unavailable", error
    assert "unreachable" in error["message"] or "cannot reach" in error["message"], error
    assert error["request_id"] == r.headers["x-request-id"]


def test_database_outage_answers_503_at_once_and_recovers(
    db_url: str, proxy: TcpProxy, servers: Servers
) -> None:
    token = admin_token()
    server = servers.start(cli_env(proxy.url(db_url), EMBEDQ_ADMIN_TOKEN=token, **FAKE))
    server.wait_ready()
    http = client(server, token)
    r = http.post("/v1/collections", json={"name": "notes", "provider": "fake"})
    assert r.status_code == 201, r.text
    accepted = [f"before-{i}" for i in range(5)]
    for key in accepted:
        r = http.put(f"/v1/collections/notes/documents/{key}", json={"text": f"note {key}"})
        assert r.status_code == 202, r.text
    assert http.get("/v1/collections/notes").status_code == 200

    proxy.cut()
    cut_at = time.monotonic()
    # Until the first 503: what was answered, when (after the cut) and how fast.
    before: list[tuple[float, float, int]] = []
    while True:
        r, took = _timed(http, "GET", "/v1/collections/notes")
        before.append((round(time.monotonic() - cut_at, 3), round(took, 3), r.status_code))
        if r.status_code == 503:
            break
        assert r.status_code == 200, (r.text, before)
        assert time.monotonic() - cut_at < 15, f"no 503 within 15 s of the cut: {before}"
        time.sleep(0.05)
    assert_database_unavailable(r)
    first_503_s = time.monotonic() - cut_at

    # A request that raced the gate's probe (woken by that 503) may still wait out the pool's
    # acquire time-out once; the probe fails within milliseconds and shuts the gate.
    settling: list[float] = []
    while True:
        r, took = _timed(http, "GET", "/v1/collections/notes")
        assert_database_unavailable(r)
        if r.json()["error"]["message"].startswith(GATE_SHUT):
            break
        assert took < ACQUIRE_TIMEOUT_S + 0.5, took
        settling.append(round(took, 3))
        assert len(settling) < 10, f"the gate did not shut: {settling}"

    # From now on the gate is shut: every route that needs the database answers at once.
    latencies = []
    paths = ["/v1/collections/notes", "/v1/collections", "/v1/jobs", "/v1/whoami", "/v1/queues"]
    for path in paths * 4:
        r, took = _timed(http, "GET", path)
        assert_database_unavailable(r)
        assert r.json()["error"]["message"].startswith(GATE_SHUT)
        latencies.append(took)
    r, took = _timed(
        http, "PUT", "/v1/collections/notes/documents/during", json={"text": "lost, and said so"}
    )
    assert_database_unavailable(r)
    latencies.append(took)
    r, took = _timed(http, "POST", "/v1/jobs", json={"task": "embedq.noop"})
    assert_database_unavailable(r)
    latencies.append(took)
    assert max(latencies) < 1.0, latencies
    assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200
    r = httpx.get(server.url + "/health/ready", timeout=10)
    assert r.status_code == 503, r.text
    assert r.json()["status"] == "fail"
    assert [c["ok"] for c in r.json()["checks"] if c["check"] == "database"] == [False]

    proxy.restore()
    restored_at = time.monotonic()
    wait_for(
        lambda: http.get("/v1/collections/notes").status_code == 200,
        10,
        "requests to succeed again after the database came back",
        server.logs,
    )
    recovered_s = time.monotonic() - restored_at
    for key in accepted:
        r = http.get(f"/v1/collections/notes/documents/{key}")
        assert r.status_code == 200, (key, r.text)
        assert r.json()["text"] == f"note {key}"
    r = http.get("/v1/collections/notes/documents/during")
    assert r.status_code == 404, r.text
    assert sorted(
        d["key"] for d in http.get("/v1/collections/notes/documents").json()["documents"]
    ) == sorted(accepted)
    wait_for(
        lambda: httpx.get(server.url + "/health/ready", timeout=10).status_code == 200,
        30,
        "/health/ready to answer 200 again",
        server.logs,
    )
    http.close()
    assert_clean_exit(server, server.stop(timeout=SHUTDOWN_GRACE_S + 15))
    print(
        f"\noutage: answers until the first 503 (s after cut, latency s, status): {before}; "
        f"first 503 {first_503_s * 1000:.0f} ms after the cut; answers racing the gate's "
        f"probe: {settling}; then {len(latencies)} answers, "
        f"latency max {max(latencies) * 1000:.1f} ms, "
        f"mean {sum(latencies) / len(latencies) * 1000:.1f} ms; "
        f"recovered {recovered_s * 1000:.0f} ms after the restore"
    )


def test_a_hung_database_shuts_the_gate_within_a_probe(
    db_url: str, proxy: TcpProxy, servers: Servers
) -> None:
    """The database stops answering but nothing is refused (a hung server): no error tells
    a request, so the gate's own probe must notice, within one interval and its time-out."""
    token = admin_token()
    server = servers.start(cli_env(proxy.url(db_url), EMBEDQ_ADMIN_TOKEN=token, **FAKE))
    server.wait_ready()
    http = client(server, token)
    assert http.post("/v1/collections", json={"name": "notes", "provider": "fake"}).is_success

    proxy.stall()
    stalled_at = time.monotonic()
    # Until the gate shuts: (s after the stall, what came back). A request that took a
    # pooled connection waits for the database; one that found none answers 503 after
    # the pool's acquire time-out.
    answers: list[tuple[float, str]] = []
    while True:
        try:
            r = http.get("/v1/collections/notes", timeout=2)
        except httpx.TimeoutException:
            answers.append((round(time.monotonic() - stalled_at, 2), "no answer in 2 s"))
            continue
        answers.append((round(time.monotonic() - stalled_at, 2), str(r.status_code)))
        if r.status_code == 503:
            assert_database_unavailable(r)
            if r.json()["error"]["message"].startswith(GATE_SHUT):
                break
        assert time.monotonic() - stalled_at < 20, f"the gate did not shut: {answers}"
    # The probe runs every PROBE_EVERY_S and gives up after PROBE_TIMEOUT_S.
    assert answers[-1][0] < PROBE_EVERY_S + PROBE_TIMEOUT_S + 2, answers
    latencies = []
    for _ in range(10):
        r, took = _timed(http, "PUT", "/v1/collections/notes/documents/hung", json={"text": "x"})
        assert_database_unavailable(r)
        assert r.json()["error"]["message"].startswith(GATE_SHUT)
        latencies.append(took)
    assert max(latencies) < 1.0, latencies
    assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200

    proxy.restore()
    wait_for(
        lambda: http.get("/v1/collections/notes").status_code == 200,
        10,
        "requests to succeed again after the database answered again",
        server.logs,
    )
    assert http.get("/v1/collections/notes/documents/hung").status_code == 404
    http.close()
    assert_clean_exit(server, server.stop(timeout=SHUTDOWN_GRACE_S + 15))
    print(
        f"\nhung database: answers after the stall (s, status): {answers}; then "
        f"{len(latencies)} answers, latency max {max(latencies) * 1000:.1f} ms"
    )


# --- 4. logs: JSON lines, request ids, no secrets ----------------------------------------


def test_json_logs_carry_request_ids_and_no_secrets(db_url: str, servers: Servers) -> None:
    token, wrong = admin_token(), admin_token()
    api_key = "sk-proj-" + secrets.token_urlsafe(32)
    env = cli_env(db_url, EMBEDQ_ADMIN_TOKEN=token, EMBEDQ_OPENAI_API_KEY=api_key, **FAKE)
    server = servers.start(env, "--log-format", "json")
    server.wait_ready()
    with FakeOpenAI(dims=8, api_key=api_key) as openai, client(server, token) as http:
        r = http.get("/v1/whoami", headers={"X-Request-ID": "trace-me-1"})
        assert r.status_code == 200, r.text
        r = http.get("/v1/settings")
        assert r.status_code == 200, r.text
        assert api_key not in r.text
        # The token in a query string (a client's mistake) must not reach the access log.
        assert http.get("/v1/whoami", params={"token": token}).status_code == 200
        # The key in use: one embedding that works, then a 401 that quotes the key back (as
        # a misbehaving proxy might), which the worker logs as a dead job.
        r = http.post(
            "/v1/collections",
            json={"name": "remote", "provider": "openai", "base_url": openai.base_url,
                  "model": "text-embedding-3-small", "dimensions": 8},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        r = http.put(
            "/v1/collections/remote/documents/a", params={"wait": "true"}, json={"text": "one"}
        )
        assert r.json()["status"] == "embedded", r.text
        assert openai.last_headers["authorization"] == f"Bearer {api_key}"
        openai.fail_next(401, message=f"Incorrect API key provided: {api_key}.")
        r = http.put(
            "/v1/collections/remote/documents/b", params={"wait": "true"}, json={"text": "two"}
        )
        wait_for(
            lambda: "(embedq.embed) dead after attempt 1" in server.stderr(),
            30,
            "the worker to log the failed embed job",
            server.logs,
        )
    for bad in (wrong, token[:-1], "not-a-token"):
        r = httpx.get(server.url + "/v1/whoami", headers=server.auth(bad), timeout=30)
        assert r.status_code == 401, r.text
        assert bad not in r.text
    r = httpx.get(server.url + "/v1/nowhere", headers=server.auth(wrong), timeout=30)
    assert r.status_code == 404, r.text
    assert_clean_exit(server, server.stop(timeout=SHUTDOWN_GRACE_S + 15))

    log = server.stderr()
    for secret in (token, wrong, api_key, token[:-1]):
        assert secret not in log, "a secret reached the log"
    records = []
    for line in log.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    access = [r for r in records if r["logger"] == "embedq.api.access"]
    assert len(access) >= 7, access
    assert all(r.get("request_id") for r in access), access
    [mine] = [r for r in access if r["request_id"] == "trace-me-1"]
    assert mine["message"].startswith("GET /v1/whoami 200")
    assert any(" 401 " in r["message"] for r in access)


def test_a_port_in_use_is_a_one_line_error(db_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", str(port), env=cli_env(db_url), timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr and "Traceback" not in done.stderr
