"""Chaos, end to end: real worker processes (`python -m embedq worker --app chaos_app:app`)
against the real embedded PostgreSQL, killed, signalled, outnumbered and cut off from their
database. Every assertion reads rows: the queue's own tables (jobs, jobs_archive, job_events,
workers) and the side table `chaos_runs` the tasks of tests/chaos_app.py write as they run.

No assertion is about wall-clock speed: waits poll the database until a condition holds or a
generous deadline passes, then assert on what the rows say.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from tests.chaos_app import SIDE_TABLE_DDL
from tests.conftest import cli_env, run_cli

import embedq
from embedq import embedded
from embedq.jobs import JobSpec

T = TypeVar("T")

# --- helpers -----------------------------------------------------------------------------


@dataclass
class WorkerProc:
    """A worker subprocess; its stderr (the log) goes to a file so it can never block."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    label: str
    _log: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.label} (pid {self.pid}) did not exit within {timeout:g} s; "
                f"its log:\n{self.log()[-4000:]}"
            ) from None


class Workers:
    """Starts worker processes and, at teardown, kills whichever of them still run."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[WorkerProc] = []

    def start(
        self, db_url: str, *args: str, env: dict[str, str] | None = None, label: str = ""
    ) -> WorkerProc:
        label = label or f"w{len(self.started)}"
        log_path = self.tmp_path / f"worker-{label}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "embedq", "worker", "--app", "chaos_app:app", *args],
            # the full audit trail is what these tests read
            env=cli_env(db_url, **{"EMBEDQ_JOB_EVENTS": "all", **(env or {})}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        w = WorkerProc(popen, log_path, label, log)
        self.started.append(w)
        return w

    def logs(self) -> str:
        return "\n".join(f"--- {w.label} (pid {w.pid}):\n{w.log()[-3000:]}" for w in self.started)

    def cleanup(self) -> None:
        for w in self.started:
            if w.popen.poll() is None:
                os.kill(w.pid, signal.SIGKILL)
                w.popen.wait(30)
            w._log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    ws = Workers(tmp_path)
    yield ws
    ws.cleanup()


def rows(
    url: str, query: str, params: Sequence[Any] | dict[str, Any] = ()
) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def scalar(url: str, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
    [(value,)] = rows(url, query, params)
    return value


def wait_for(
    check: Callable[[], T],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
    every: float = 0.1,
) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}\n{diagnostics()}"
            )
        time.sleep(every)


def enqueue(url: str, specs: Sequence[JobSpec]) -> list[int]:
    """Enqueue in one round trip, as a producer would, on our own connection."""
    app = embedq.App(database_url=url, job_events="all")
    with psycopg.connect(url, autocommit=True) as conn:
        return [t.id for t in app.enqueue_sync(specs, connection=conn)]


def side_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SIDE_TABLE_DDL)


def worker_id(url: str, proc: WorkerProc) -> int:
    """The id a worker process registered under (embedq.workers.pid)."""
    return int(
        wait_for(
            lambda: rows(url, "SELECT id FROM embedq.workers WHERE pid = %s", (proc.pid,)),
            60,
            f"worker {proc.label} to register",
            proc.log,
        )[0][0]
    )


def counts(url: str) -> dict[str, int]:
    """Jobs by where they are: pending/running (hot table), succeeded/dead/cancelled (archive)."""
    out = {"pending": 0, "running": 0, "succeeded": 0, "dead": 0, "cancelled": 0}
    for state, n in rows(
        url,
        "SELECT state::text, count(*) FROM embedq.jobs GROUP BY 1 "
        "UNION ALL SELECT state::text, count(*) FROM embedq.jobs_archive GROUP BY 1",
    ):
        out[state] += n
    return out


def events(url: str, job_id: int | None = None) -> dict[str, int]:
    where = "" if job_id is None else "WHERE job_id = %s"
    params = () if job_id is None else (job_id,)
    return {
        e: int(n)
        for e, n in rows(
            url, f"SELECT event, count(*) FROM embedq.job_events {where} GROUP BY 1", params
        )
    }


SHORT_LEASE = {"EMBEDQ_LEASE_S": "3", "EMBEDQ_HEARTBEAT_S": "0.5", "EMBEDQ_POLL_INTERVAL_S": "0.2"}


# --- 1. a worker SIGKILLed in the middle of a job ----------------------------------------


def test_sigkill_mid_job_is_reclaimed_and_succeeds_exactly_once(
    db_url: str, workers: Workers
) -> None:
    side_table(db_url)
    # The first attempt holds for a minute (it is killed long before); the retry holds briefly.
    [job] = enqueue(db_url, [JobSpec("chaos.record", {"hold_s": 0.5, "first_hold_s": 60})])
    a = workers.start(db_url, env=SHORT_LEASE, label="A")
    a_id = worker_id(db_url, a)
    wait_for(
        lambda: rows(
            db_url,
            "SELECT 1 FROM embedq.jobs j JOIN chaos_runs r ON r.job_id = j.id "
            "WHERE j.id = %s AND j.state = 'running' AND j.worker_id = %s AND r.pid = %s",
            (job, a_id, a.pid),
        ),
        60,
        "the job to be running on worker A",
        a.log,
    )
    os.kill(a.pid, signal.SIGKILL)
    assert a.wait(30) == -signal.SIGKILL

    b = workers.start(db_url, "--exit-when-idle", env=SHORT_LEASE, label="B")
    assert b.wait(90) == 0, b.log()
    b_id = worker_id(db_url, b)

    assert counts(db_url) == {"pending": 0, "running": 0, "succeeded": 1, "dead": 0, "cancelled": 0}
    [(state, attempts, by)] = rows(
        db_url,
        "SELECT state::text, attempts, worker_id FROM embedq.jobs_archive WHERE id = %s",
        (job,),
    )
    assert (state, attempts, by) == ("succeeded", 2, b_id)
    ev = rows(
        db_url,
        "SELECT event, attempt, worker_id FROM embedq.job_events WHERE job_id = %s ORDER BY id",
        (job,),
    )
    assert [e[0] for e in ev] == ["enqueued", "started", "reclaimed", "started", "succeeded"], ev
    assert ev[1][1:] == (1, a_id) and ev[2][1:] == (1, a_id)
    assert ev[3][1:] == (2, b_id) and ev[4][1:] == (2, b_id)
    # The side table: A started attempt 1 and never finished it; B ran attempt 2 to its end.
    runs = rows(
        db_url,
        "SELECT attempt, pid, worker_id, finished_at IS NOT NULL FROM chaos_runs "
        "WHERE job_id = %s ORDER BY id",
        (job,),
    )
    assert runs == [(1, a.pid, a_id, False), (2, b.pid, b_id, True)]
    assert "reclaimed 1 jobs" in b.log()


def test_frozen_worker_loses_its_job_and_cannot_complete_it_twice(
    db_url: str, workers: Workers
) -> None:
    """SIGSTOP (a frozen process: GC pause, swapped out, VM suspended) past the lease: another
    worker reclaims and finishes the job; when the frozen one wakes, its heartbeat finds the job
    gone and stops its copy; the job completed once."""
    side_table(db_url)
    [job] = enqueue(db_url, [JobSpec("chaos.record", {"hold_s": 0.5, "first_hold_s": 60})])
    a = workers.start(db_url, env=SHORT_LEASE, label="A")
    a_id = worker_id(db_url, a)
    wait_for(
        lambda: rows(
            db_url, "SELECT 1 FROM chaos_runs WHERE job_id = %s AND pid = %s", (job, a.pid)
        ),
        60,
        "the job to be running on worker A",
        a.log,
    )
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = workers.start(db_url, "--exit-when-idle", env=SHORT_LEASE, label="B")
        assert b.wait(90) == 0, b.log()
    finally:
        os.kill(a.pid, signal.SIGCONT)
    b_id = worker_id(db_url, b)
    wait_for(
        lambda: "cancelled or reclaimed elsewhere" in a.log(),
        60,
        "the woken worker A to stop its stale copy of the job",
        a.log,
    )
    assert a.alive(), a.log()
    a.popen.send_signal(signal.SIGTERM)
    assert a.wait(60) == 0, a.log()

    assert counts(db_url) == {"pending": 0, "running": 0, "succeeded": 1, "dead": 0, "cancelled": 0}
    assert rows(
        db_url, "SELECT attempts, worker_id FROM embedq.jobs_archive WHERE id = %s", (job,)
    ) == [(2, b_id)]
    assert events(db_url, job) == {"enqueued": 1, "started": 2, "reclaimed": 1, "succeeded": 1}
    runs = rows(
        db_url,
        "SELECT attempt, worker_id, finished_at IS NOT NULL FROM chaos_runs "
        "WHERE job_id = %s ORDER BY id",
        (job,),
    )
    assert runs == [(1, a_id, False), (2, b_id, True)]
    # A released nothing at its shutdown: the job was no longer its to hand back.
    assert "released" not in a.log()


def test_a_healthy_worker_never_runs_its_job_twice_at_once(db_url: str, workers: Workers) -> None:
    """A lease shorter than the heartbeat: the worker must refuse the setting, or keep its lease
    (heartbeat often enough). Either way no job runs twice while its worker is healthy."""
    side_table(db_url)
    [job] = enqueue(db_url, [JobSpec("chaos.record", {"hold_s": 6})])
    w = workers.start(db_url, "--exit-when-idle", env={"EMBEDQ_LEASE_S": "3"}, label="lease")
    code = w.wait(120)
    if code != 0:  # refused: one clear line naming the settings, and nothing touched
        assert "heartbeat" in w.log() and "Traceback" not in w.log(), w.log()
        assert rows(db_url, "SELECT state::text, attempts FROM embedq.jobs") == [("pending", 0)]
        return
    runs = rows(db_url, "SELECT attempt, finished_at IS NOT NULL FROM chaos_runs ORDER BY id")
    assert runs == [(1, True)], (runs, w.log())
    assert rows(db_url, "SELECT attempts FROM embedq.jobs_archive WHERE id = %s", (job,)) == [(1,)]
    assert "reclaimed" not in events(db_url, job)


# --- 2. four worker processes, thousands of jobs -----------------------------------------


def _many_workers_many_jobs(db_url: str, workers: Workers, n: int) -> None:
    ids = enqueue(db_url, [JobSpec("embedq.noop", {"i": i}) for i in range(n)])
    assert len(set(ids)) == n
    procs = [
        workers.start(db_url, "--exit-when-idle", "--concurrency", "50", label=f"w{i}")
        for i in range(4)
    ]
    for p in procs:
        assert p.wait(600) == 0, p.log()

    assert scalar(db_url, "SELECT count(*) FROM embedq.jobs") == 0
    [(total, distinct, succeeded, lo, hi)] = rows(
        db_url,
        "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE state = 'succeeded'), "
        "min(id), max(id) FROM embedq.jobs_archive",
    )
    assert (total, distinct, succeeded) == (n, n, n)
    assert (lo, hi) == (min(ids), max(ids))
    # Each job was claimed once and completed once: one 'started' and one 'succeeded' event
    # per job, and no reclaim or failure anywhere.
    assert events(db_url) == {"enqueued": n, "started": n, "succeeded": n}
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM (SELECT job_id FROM embedq.job_events "
            "WHERE event IN ('started', 'succeeded') GROUP BY job_id, event "
            "HAVING count(*) <> 1) x",
        )
        == 0
    )
    assert scalar(db_url, "SELECT max(attempts) FROM embedq.jobs_archive") == 1
    # The four processes shared the work and each recorded its own tally.
    per_worker = rows(db_url, "SELECT pid, state, processed FROM embedq.workers ORDER BY id")
    assert sorted(p for p, _, _ in per_worker) == sorted(p.pid for p in procs)
    assert all(state == "stopped" for _, state, _ in per_worker)
    assert sum(n_ for _, _, n_ in per_worker) == n
    assert (
        scalar(
            db_url,
            "SELECT count(DISTINCT worker_id) FROM embedq.jobs_archive",
        )
        >= 2
    )


def test_four_workers_share_10000_jobs_each_run_once(db_url: str, workers: Workers) -> None:
    _many_workers_many_jobs(db_url, workers, 10_000)


# --- 3. lock keys across processes (invariant 3) -----------------------------------------


def test_jobs_sharing_a_lock_key_never_overlap_across_processes(
    db_url: str, workers: Workers
) -> None:
    side_table(db_url)
    keys = [f"biz:{k}" for k in range(5)]
    n = 200
    enqueue(
        db_url,
        [JobSpec("chaos.record", {"hold_s": 0.03}, lock_key=keys[i % 5]) for i in range(n)],
    )
    env = {"EMBEDQ_POLL_INTERVAL_S": "0.1"}  # idle workers claim eagerly: maximum contention
    procs = [
        workers.start(db_url, "--exit-when-idle", "--concurrency", "10", env=env, label=f"w{i}")
        for i in range(3)
    ]
    for p in procs:
        assert p.wait(300) == 0, p.log()

    assert counts(db_url) == {"pending": 0, "running": 0, "succeeded": n, "dead": 0, "cancelled": 0}
    [(runs, jobs, finished)] = rows(
        db_url,
        "SELECT count(*), count(DISTINCT job_id), count(finished_at) FROM chaos_runs",
    )
    assert (runs, jobs, finished) == (n, n, n)
    overlaps = rows(
        db_url,
        "SELECT a.job_id, b.job_id, a.lock_key, a.pid, b.pid FROM chaos_runs a "
        "JOIN chaos_runs b ON a.lock_key = b.lock_key AND a.id < b.id "
        "AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
    )
    assert overlaps == [], f"jobs with one lock key ran at once: {overlaps[:10]}"
    # The test had teeth: more than one process ran jobs, and different keys did run at once.
    assert scalar(db_url, "SELECT count(DISTINCT pid) FROM chaos_runs") >= 2
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM chaos_runs a JOIN chaos_runs b ON a.lock_key <> b.lock_key "
            "AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
        )
        > 0
    )
    assert sorted(k for (k,) in rows(db_url, "SELECT DISTINCT lock_key FROM chaos_runs")) == keys


# --- 4. the database restarted under running workers ------------------------------------


@pytest.fixture
def own_server() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL of this test's own (restarting the session's would disturb the others)."""
    pgserver = embedded._pgserver()
    tmp = Path(tempfile.mkdtemp(prefix="embedq-chaos-"))
    url = embedded.start(tmp)
    server = pgserver.get_server(tmp / "pgdata")
    try:
        yield url, server
    finally:
        # After a restart the handle's idea of the postmaster is stale: stop it explicitly.
        try:
            pgserver.pgexec.pgexec(
                "pg_ctl",
                ("-D", str(server.pgdata), "-m", "fast", "-w", "stop"),
                bin_path=server.bin_path,
                user=server.system_user,
                timeout=60,
            )
        except subprocess.SubprocessError:
            pass
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def pg_ctl(server: Any, *args: str) -> None:
    embedded._pgserver().pgexec.pgexec(
        "pg_ctl",
        ("-D", str(server.pgdata), *args),
        bin_path=server.bin_path,
        user=server.system_user,  # 'pgserver' when the tests run as root
        timeout=120,
    )


def test_workers_ride_out_a_database_restart(own_server: tuple[str, Any], workers: Workers) -> None:
    url, server = own_server
    socket_dir = parse_qs(urlsplit(url).query)["host"][0]
    up = run_cli("db", "upgrade", env=cli_env(url))
    assert up.returncode == 0, up.stderr
    n = 2_000
    enqueue(url, [JobSpec("embedq.sleep", {"seconds": 0.01}) for _ in range(n)])
    env = {"EMBEDQ_LEASE_S": "5", "EMBEDQ_HEARTBEAT_S": "1", "EMBEDQ_POLL_INTERVAL_S": "0.5"}
    procs = [workers.start(url, "--concurrency", "4", env=env, label=f"w{i}") for i in range(2)]
    wait_for(lambda: counts(url)["succeeded"] >= 100, 120, "the first 100 jobs", workers.logs, 0.05)
    before = counts(url)["succeeded"]
    # Down long enough for every loop (claim, complete, heartbeat, janitor) to hit the outage
    # and for leases to run out; then up again on the same socket. Nobody helps the workers.
    pg_ctl(server, "-m", "fast", "-w", "stop")
    try:
        assert before < n, "the run ended before the outage: nothing was tested"
        for p in procs:
            wait_for(
                lambda p=p: "database unavailable" in p.log(),
                60,
                f"{p.label} to notice the outage",
                p.log,
            )
        time.sleep(3)  # the outage goes on (not a measurement)
    finally:
        pg_ctl(server, "-w", "-l", str(server.log), "-o", f'-h "" -k {socket_dir}', "start")

    wait_for(
        lambda: counts(url)["succeeded"] == n, 300, f"all {n} jobs to succeed", workers.logs, 0.5
    )
    assert counts(url) == {"pending": 0, "running": 0, "succeeded": n, "dead": 0, "cancelled": 0}
    # Each job completed exactly once. (A claim or completion caught by the outage may make a
    # job run twice, at least once being the promise, but it is recorded once: the worker_id
    # guard drops a late completion.)
    assert scalar(url, "SELECT count(DISTINCT id) FROM embedq.jobs_archive") == n
    assert events(url).get("succeeded") == n
    assert (
        scalar(
            url,
            "SELECT count(*) FROM (SELECT job_id FROM embedq.job_events WHERE event = 'succeeded' "
            "GROUP BY job_id HAVING count(*) > 1) x",
        )
        == 0
    )
    # The workers never crashed: they said the database was gone, then that it was back.
    for p in procs:
        assert p.alive(), f"worker {p.label} died:\n{p.log()}"
    for p in procs:
        wait_for(
            lambda p=p: p.log().rfind("reachable again") > p.log().rfind("database unavailable"),
            60,
            f"{p.label} to log its recovery after the outage",
            p.log,
        )
        assert "Traceback" not in p.log(), p.log()
    for p in procs:
        p.popen.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(60) == 0, p.log()
    assert scalar(url, "SELECT count(*) FROM embedq.workers WHERE state <> 'stopped'") == 0


# --- 5. SIGTERM: a graceful shutdown -----------------------------------------------------


# The database is slow to record completions (a loaded server, a lock wait): each statement
# that archives jobs takes half a second more. A graceful shutdown must still wait for the
# completion it has in flight.
SLOW_COMPLETIONS = """
CREATE FUNCTION public.chaos_slow_archive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.5);
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_slow_archive AFTER INSERT ON embedq.jobs_archive
    FOR EACH STATEMENT EXECUTE FUNCTION public.chaos_slow_archive();
"""


def test_sigterm_lets_running_jobs_finish_and_leaves_the_rest_pending(
    db_url: str, workers: Workers
) -> None:
    side_table(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SLOW_COMPLETIONS)
    ids = enqueue(db_url, [JobSpec("chaos.record", {"hold_s": 1.5}) for _ in range(6)])
    w = workers.start(db_url, "--concurrency", "3", label="term")
    wait_for(
        lambda: scalar(db_url, "SELECT count(*) FROM chaos_runs") == 3,
        60,
        "three jobs to be running",
        w.log,
    )
    w.popen.send_signal(signal.SIGTERM)
    assert w.wait(120) == 0, w.log()

    started = {j for (j,) in rows(db_url, "SELECT job_id FROM chaos_runs")}
    assert len(started) == 3
    assert scalar(db_url, "SELECT count(*) FROM chaos_runs WHERE finished_at IS NULL") == 0
    assert rows(db_url, "SELECT state FROM embedq.workers WHERE pid = %s", (w.pid,)) == [
        ("stopped",)
    ]
    # Every job is either finished (succeeded, run once) or back to pending, never counted as
    # an attempt, never left running on a stopped worker.
    left = rows(db_url, "SELECT id, state::text, attempts, worker_id FROM embedq.jobs")
    assert all(st == "pending" and att == 0 and wid is None for _, st, att, wid in left), (
        left,
        w.log(),
    )
    succeeded = dict(
        rows(db_url, "SELECT id, attempts FROM embedq.jobs_archive WHERE state = 'succeeded'")
    )
    assert sorted([*succeeded, *(j for j, *_ in left)]) == sorted(ids)
    assert set(succeeded.values()) == {1}
    # The grace period (30 s by default) was long enough for the three running jobs to finish
    # and be recorded; the three that never started wait for the next worker.
    assert set(succeeded) == started, (succeeded, started, w.log())
    assert len(left) == 3


def test_sigterm_past_the_grace_period_releases_the_job_uncounted(
    db_url: str, workers: Workers
) -> None:
    side_table(db_url)
    [job] = enqueue(db_url, [JobSpec("chaos.record", {"hold_s": 30})])
    w = workers.start(db_url, env={"EMBEDQ_SHUTDOWN_GRACE_S": "0.5"}, label="grace")
    wait_for(
        lambda: scalar(db_url, "SELECT count(*) FROM chaos_runs") == 1, 60, "the job to run", w.log
    )
    w.popen.send_signal(signal.SIGTERM)
    # Far less than the job's 30 s: the worker did not wait the job out.
    assert w.wait(25) == 0, w.log()
    assert rows(
        db_url, "SELECT state::text, attempts, worker_id, lease_expires_at FROM embedq.jobs"
    ) == [("pending", 0, None, None)]
    assert scalar(db_url, "SELECT count(*) FROM embedq.jobs_archive") == 0
    assert rows(db_url, "SELECT finished_at FROM chaos_runs WHERE job_id = %s", (job,)) == [(None,)]
    assert rows(db_url, "SELECT state FROM embedq.workers WHERE pid = %s", (w.pid,)) == [
        ("stopped",)
    ]
    assert "released 1 unfinished jobs" in w.log()


def test_second_sigterm_stops_at_once_and_releases_the_job(db_url: str, workers: Workers) -> None:
    """With the default 30 s grace, a second signal means now: the job goes back uncounted."""
    side_table(db_url)
    [job] = enqueue(db_url, [JobSpec("chaos.record", {"hold_s": 60})])
    w = workers.start(db_url, label="twice")
    wait_for(
        lambda: scalar(db_url, "SELECT count(*) FROM chaos_runs") == 1, 60, "the job to run", w.log
    )
    w.popen.send_signal(signal.SIGTERM)
    wait_for(
        lambda: "stopping: waiting up to 30 s" in w.log(), 60, "the first signal's effect", w.log
    )
    w.popen.send_signal(signal.SIGTERM)
    assert w.wait(25) == 0, w.log()  # far less than the job's 60 s and the 30 s grace
    assert rows(db_url, "SELECT id, state::text, attempts, worker_id FROM embedq.jobs") == [
        (job, "pending", 0, None)
    ]
    assert rows(db_url, "SELECT finished_at FROM chaos_runs") == [(None,)]
    assert rows(db_url, "SELECT state FROM embedq.workers WHERE pid = %s", (w.pid,)) == [
        ("stopped",)
    ]


def test_sync_task_past_the_grace_period_does_not_outlive_its_release(
    db_url: str, workers: Workers
) -> None:
    side_table(db_url)
    [job] = enqueue(db_url, [JobSpec("chaos.record_sync", {"hold_s": 8})])
    w = workers.start(db_url, env={"EMBEDQ_SHUTDOWN_GRACE_S": "0.5"}, label="sync")
    wait_for(
        lambda: scalar(db_url, "SELECT count(*) FROM chaos_runs") == 1, 60, "the job to run", w.log
    )
    w.popen.send_signal(signal.SIGTERM)
    assert w.wait(120) == 0, w.log()
    assert rows(db_url, "SELECT id, state::text, attempts FROM embedq.jobs") == [
        (job, "pending", 0)
    ]
    # Released means handed back: the process must not go on running the job's function to
    # its end after that (it stays unfinished, as an async task's run does).
    assert rows(db_url, "SELECT finished_at IS NULL FROM chaos_runs") == [(True,)], w.log()


# --- 6. a job naming a task no worker has -------------------------------------------------


def test_unknown_task_is_dead_lettered_and_nothing_else_is_lost(
    db_url: str, workers: Workers
) -> None:
    side_table(db_url)
    ids = enqueue(
        db_url,
        [
            *(JobSpec("chaos.record") for _ in range(5)),
            JobSpec("no.such.task", {"x": 1}),
            *(JobSpec("chaos.record") for _ in range(5)),
        ],
    )
    bad = ids[5]
    w = workers.start(db_url, "--exit-when-idle", label="unknown")
    assert w.wait(120) == 0, w.log()

    assert counts(db_url) == {
        "pending": 0,
        "running": 0,
        "succeeded": 10,
        "dead": 1,
        "cancelled": 0,
    }
    [(state, kind, error, attempts)] = rows(
        db_url,
        "SELECT state::text, error_kind, last_error, attempts FROM embedq.jobs_archive "
        "WHERE id = %s",
        (bad,),
    )
    assert (state, kind, attempts) == ("dead", "unknown_task", 1)  # permanent: no retries
    assert "'no.such.task'" in error and "--app" in error
    assert f"embedq queue retry {bad}" in error
    assert "chaos.record" in error  # the known tasks are listed
    good = [i for i in ids if i != bad]
    assert sorted(
        j for (j,) in rows(db_url, "SELECT job_id FROM chaos_runs WHERE finished_at IS NOT NULL")
    ) == sorted(good)
    assert events(db_url, bad) == {"enqueued": 1, "started": 1, "failed": 1, "dead": 1}


@pytest.mark.slow
def test_soak_random_sigkills_lose_nothing_and_complete_each_job_once(
    db_url: str, workers: Workers
) -> None:
    """Invariant 1 under fire: 20,000 jobs, three workers, one SIGKILLed and replaced every
    two seconds until the queue drains. Every job ends succeeded (or, if it was unlucky on every
    attempt, visibly dead with its reason); none is lost, none completes twice."""
    import random

    side_table(db_url)
    n = 20_000
    for lo in range(0, n, 5_000):
        enqueue(
            db_url,
            [JobSpec("chaos.record", {"hold_s": 0.01, "n": i}) for i in range(lo, lo + 5_000)],
        )
    env = {"EMBEDQ_LEASE_S": "3", "EMBEDQ_HEARTBEAT_S": "0.5"}
    live = [workers.start(db_url, "--concurrency", "20", env=env) for _ in range(3)]
    kills = 0
    rng = random.Random(1)
    deadline = time.monotonic() + 900
    while scalar(db_url, "SELECT count(*) FROM embedq.jobs") > 0:
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(2)
        victim = rng.choice(live)
        os.kill(victim.pid, signal.SIGKILL)
        victim.popen.wait(30)
        kills += 1
        live.remove(victim)
        live.append(workers.start(db_url, "--concurrency", "20", env=env))
    for w in live:
        worker_id(db_url, w)  # registered: past start-up, its signal handlers are in place
        w.popen.send_signal(signal.SIGTERM)
        assert w.wait(60) == 0
    states = dict(rows(db_url, "SELECT state::text, count(*) FROM embedq.jobs_archive GROUP BY 1"))
    assert states.get("succeeded", 0) + states.get("dead", 0) == n, states
    assert scalar(db_url, "SELECT count(DISTINCT id) FROM embedq.jobs_archive") == n
    assert rows(
        db_url, "SELECT DISTINCT error_kind FROM embedq.jobs_archive WHERE state = 'dead'"
    ) in ([], [("lease_expired",)])
    # each job succeeded at most once: one 'succeeded' event per succeeded job
    assert scalar(
        db_url, "SELECT count(*) FROM embedq.job_events WHERE event = 'succeeded'"
    ) == states.get("succeeded", 0)
    reclaimed = scalar(db_url, "SELECT count(*) FROM embedq.job_events WHERE event = 'reclaimed'")
    assert kills >= 3 and reclaimed > 0
    print(f"soak: {n} jobs, {kills} SIGKILLs, {reclaimed} reclaims, final states {states}")


# --- the pipeline: a worker SIGKILLed in the middle of an embed batch -----------------------


def test_sigkill_mid_embed_batch_loses_nothing_and_embeds_each_version_once(
    db_url: str, workers: Workers
) -> None:
    """Invariant 1 for the pipeline: worker A dies while its batch is at the provider; B
    reclaims the jobs and embeds every document exactly once, at its current version."""

    async def write() -> None:
        async with embedq.App(database_url=db_url) as app:
            col = await app.collections.create(
                "chaos", provider="fake", options={"latency_ms": 30_000}
            )
            await col.upsert_many([{"key": f"d{i}", "text": f"text number {i}"} for i in range(40)])

    asyncio.run(write())
    a = workers.start(db_url, env=SHORT_LEASE, label="A")
    wait_for(
        lambda: rows(db_url, "SELECT 1 FROM embedq.jobs WHERE state = 'running' LIMIT 1"),
        60,
        "embed jobs to be running on worker A",
        a.log,
    )
    os.kill(a.pid, signal.SIGKILL)
    assert a.wait(30) == -signal.SIGKILL
    # B's provider answers at once: the same collection, its latency option lifted
    rows(
        db_url,
        "UPDATE embedq.spaces SET config = jsonb_set(config, '{options}', '{}'::jsonb) "
        "RETURNING id",
    )
    b = workers.start(db_url, "--exit-when-idle", env=SHORT_LEASE, label="B")
    assert b.wait(120) == 0, workers.logs()
    assert counts(db_url) == {
        "pending": 0,
        "running": 0,
        "succeeded": 40,
        "dead": 0,
        "cancelled": 0,
    }
    assert rows(db_url, "SELECT count(*), count(DISTINCT document_id) FROM embedq.chunks") == [
        (40, 40)
    ]
    assert rows(db_url, "SELECT DISTINCT status FROM embedq.documents") == [("embedded",)]
    # every job was started by A (attempt 1, reclaimed) and finished once, by B
    assert events(db_url)["succeeded"] == 40 and events(db_url)["reclaimed"] >= 1
