"""Queue semantics against the real PostgreSQL: enqueue, claim order, dedup (invariant 4),
lock keys (invariant 3), retries and dead letters (invariant 5), leases, cancel, pause,
delayed and periodic jobs, transactional enqueue, history."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from tests.conftest import drain

import embedq
from embedq import JobSpec, PermanentError, RetryPolicy
from embedq.errors import InvalidJob, UnknownQueue
from embedq.jobs import in_seconds


async def register_worker(app: embedq.App, name: str = "test") -> int:
    [row] = await app.store.fetch(
        "register_worker",
        {"name": name, "host": "h", "pid": 1, "queues": None, "concurrency": 1, "version": "t"},
    )
    return int(row["id"])


async def sql(app: embedq.App, query: str, *params: Any) -> list[dict[str, Any]]:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def count(app: embedq.App, table: str, where: str = "true", *params: Any) -> int:
    [row] = await sql(app, f"SELECT count(*) AS n FROM embedq.{table} WHERE {where}", *params)
    return int(row["n"])


async def test_enqueue_and_claim_by_priority_then_run_at(app: embedq.App) -> None:
    await app.enqueue(
        [
            JobSpec("embedq.noop", {"n": 1}, priority=0),
            JobSpec("embedq.noop", {"n": 2}, priority=5),
            JobSpec("embedq.noop", {"n": 3}, priority=5),
            JobSpec("embedq.noop", {"n": 4}, priority=0, run_at=in_seconds(3600)),
        ]
    )
    wid = await register_worker(app)
    jobs = await app.store.claim(wid, 10)
    assert [j.args["n"] for j in jobs] == [2, 3, 1]  # the delayed job is not due
    assert all(j.attempts == 1 for j in jobs)
    assert await count(app, "jobs", "state = 'running' AND worker_id = %s", wid) == 3


async def test_claim_respects_queues_and_batch_size(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.noop", queue=q) for q in ["high"] * 3 + ["low"] * 3])
    wid = await register_worker(app)
    assert len(await app.store.claim(wid, 2, ["high"])) == 2
    assert {j.queue for j in await app.store.claim(wid, 10, ["high"])} == {"high"}
    assert len(await app.store.claim(wid, 10, ["low", "other"])) == 3


async def test_dedup_key_coalesces_into_the_pending_job(app: embedq.App) -> None:
    """Invariant 4: one pending job per dedup key; the newest arguments win."""
    first = await app.enqueue([JobSpec("embedq.echo", {"v": 1}, dedup_key="doc:1")])
    again = await app.enqueue([JobSpec("embedq.echo", {"v": 2}, dedup_key="doc:1", priority=9)])
    assert first[0].id == again[0].id and again[0].coalesced and not first[0].coalesced
    [row] = await sql(app, "SELECT args, priority FROM embedq.jobs")
    assert row["args"] == {"v": 2} and row["priority"] == 9
    # a burst in one batch coalesces too
    burst = await app.enqueue(
        [JobSpec("embedq.echo", {"v": i}, dedup_key="doc:2") for i in range(50)]
    )
    assert len({t.id for t in burst}) == 1 and sum(not t.coalesced for t in burst) == 1
    assert await count(app, "jobs") == 2
    # once claimed (running), a new enqueue makes a new pending job
    wid = await register_worker(app)
    await app.store.claim(wid, 10)
    fresh = await app.enqueue([JobSpec("embedq.echo", {"v": 3}, dedup_key="doc:1")])
    assert fresh[0].id != first[0].id and not fresh[0].coalesced


async def test_concurrent_duplicate_enqueues_keep_one_pending_job(app: embedq.App) -> None:
    async def one(i: int) -> int:
        [t] = await app.enqueue([JobSpec("embedq.echo", {"i": i}, dedup_key="same")])
        return t.id

    ids = await asyncio.gather(*(one(i) for i in range(40)))
    assert len(set(ids)) == 1
    assert await count(app, "jobs", "dedup_key = 'same' AND state = 'pending'") == 1


async def test_lock_key_allows_one_running_job(app: embedq.App) -> None:
    """Invariant 3 at the claim: a batch takes one job per lock key, and none while one runs."""
    await app.enqueue(
        [JobSpec("embedq.noop", {"i": i}, lock_key="biz:1") for i in range(5)]
        + [JobSpec("embedq.noop", {"i": 9}, lock_key="biz:2")]
    )
    w1, w2 = await register_worker(app, "a"), await register_worker(app, "b")
    first = await app.store.claim(w1, 10)
    assert sorted(j.lock_key or "" for j in first) == ["biz:1", "biz:2"]
    assert await app.store.claim(w2, 10) == []
    await app.store.complete(w1, [first[0].id], [None], [None])
    nxt = await app.store.claim(w2, 10)
    assert (
        [j.lock_key for j in nxt] == [first[0].lock_key] if first[0].lock_key == "biz:1" else True
    )


async def test_database_enforces_one_running_job_per_lock_key(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.noop", lock_key="k"), JobSpec("embedq.noop", lock_key="k")])
    with pytest.raises(psycopg.errors.UniqueViolation):
        await sql(app, "UPDATE embedq.jobs SET state = 'running'")


async def test_lock_key_serialises_execution_in_a_worker(app: embedq.App) -> None:
    active: dict[str, int] = {}
    overlaps: list[str] = []

    @app.task(name="t.locked", lock="biz:{business_id}")
    async def locked(business_id: int, n: int) -> None:
        key = f"biz:{business_id}"
        active[key] = active.get(key, 0) + 1
        if active[key] > 1:
            overlaps.append(key)
        await asyncio.sleep(0.005)
        active[key] -= 1

    await locked.defer_many_async([{"business_id": n % 3, "n": n} for n in range(60)])
    w = await drain(app, concurrency=20)
    assert w.processed == 60
    assert overlaps == []
    assert await count(app, "jobs_archive", "state = 'succeeded' AND task = 't.locked'") == 60


async def test_transient_failures_retry_with_growing_delays_then_die(app: embedq.App) -> None:
    """Invariant 5: retried up to the limit with growing delays; nothing retries forever."""
    calls: list[int] = []

    @app.task(name="t.flaky", retry=RetryPolicy(max_attempts=4, base_s=0.05, cap_s=1.0))
    def flaky() -> None:
        calls.append(1)
        raise ConnectionError("upstream down")

    [t] = await flaky.defer_many_async([{}])
    await drain(app, timeout=60)
    assert len(calls) == 4
    [dead] = await sql(app, "SELECT * FROM embedq.jobs_archive WHERE id = %s", t.id)
    assert dead["state"] == "dead" and dead["attempts"] == 4
    assert "upstream down" in dead["last_error"] and dead["error_kind"] == "ConnectionError"
    events = await app.store.fetch("job_events", {"id": t.id})
    retried = [e for e in events if e["event"] == "retried"]
    assert len(retried) == 3 and [e["event"] for e in events][-1] == "dead"
    gaps = []
    starts = [e["at"] for e in events if e["event"] == "started"]
    fails = [e["at"] for e in events if e["event"] == "failed"]
    for fail, start in zip(fails, starts[1:], strict=False):
        gaps.append((start - fail).total_seconds())
    # equal jitter: the delay after attempt n is at least base * 2**(n-1) / 2
    for n, gap in enumerate(gaps, start=1):
        assert gap >= 0.05 * 2 ** (n - 1) / 2 - 0.01


async def test_permanent_error_dead_letters_at_once(app: embedq.App) -> None:
    calls: list[int] = []

    @app.task(name="t.permanent", max_attempts=5)
    def permanent() -> None:
        calls.append(1)
        raise PermanentError("model 'x' not found; set EMBEDQ_EMBEDDING_MODEL")

    ok = app.get_task("embedq.echo")
    [bad] = await permanent.defer_many_async([{}])
    await ok.defer_many_async([{"x": i} for i in range(5)])
    await drain(app)
    assert calls == [1]
    [row] = await sql(
        app, "SELECT state, attempts, last_error FROM embedq.jobs_archive WHERE id = %s", bad.id
    )
    assert (
        row["state"] == "dead"
        and row["attempts"] == 1
        and "EMBEDQ_EMBEDDING_MODEL" in row["last_error"]
    )
    assert await count(app, "jobs_archive", "state = 'succeeded'") == 5


async def test_arguments_that_do_not_fit_the_function_dead_letter_clearly(app: embedq.App) -> None:
    @app.task(name="t.strict")
    def strict(a: int) -> int:
        return a

    await app.enqueue([JobSpec("t.strict", {"b": 1})])
    await drain(app)
    [row] = await sql(app, "SELECT state, error_kind, last_error FROM embedq.jobs_archive")
    assert row["state"] == "dead" and row["error_kind"] == "bad_arguments"
    assert "t.strict" in row["last_error"]


async def test_timeout_counts_as_a_transient_failure(app: embedq.App) -> None:
    @app.task(
        name="t.slow", timeout=0.1, retry=RetryPolicy(max_attempts=2, base_s=0.01, cap_s=0.02)
    )
    async def slow() -> None:
        await asyncio.sleep(5)

    await slow.defer_async()
    await drain(app)
    [row] = await sql(app, "SELECT state, attempts, error_kind FROM embedq.jobs_archive")
    assert (row["state"], row["attempts"], row["error_kind"]) == ("dead", 2, "TaskTimeout")


async def test_expired_lease_is_reclaimed_and_counted(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.echo", {"k": 1}, max_attempts=2)])
    crashed = await register_worker(app, "crashed")
    [job] = await app.store.claim(crashed, 1)
    await sql(app, "UPDATE embedq.jobs SET lease_expires_at = now() - interval '1 s'")
    assert await app.store.reclaim_expired() == {"requeued": 1, "dead": 0}
    [row] = await sql(app, "SELECT state, attempts, error_kind FROM embedq.jobs")
    assert (row["state"], row["attempts"], row["error_kind"]) == ("pending", 1, "lease_expired")
    # the crashed worker's late completion is ignored: the job completes exactly once
    other = await register_worker(app, "other")
    [again] = await app.store.claim(other, 1)
    assert await app.store.complete(crashed, [job.id], [None], [None]) == []
    assert await app.store.complete(other, [again.id], ['"ok"'], [None]) == [job.id]
    assert await count(app, "jobs_archive", "state = 'succeeded'") == 1


async def test_a_running_job_going_back_gives_up_a_dedup_key_held_by_a_pending_one(
    app: embedq.App,
) -> None:
    """Found by the many-hosts test: a document rewritten while its embed job runs has a
    newer pending job with the same dedup key; the running one going back to pending (lease
    expired, retry, release) must not violate invariant 4, nor fail the whole statement."""
    wid = await register_worker(app)
    for requeue in ("reclaim", "retry_later", "release", "release_later"):
        await sql(app, "DELETE FROM embedq.jobs")
        await app.enqueue([JobSpec("embedq.echo", {"v": 1}, dedup_key="doc:1")])
        [old] = await app.store.claim(wid, 1)
        [new] = await app.enqueue([JobSpec("embedq.echo", {"v": 2}, dedup_key="doc:1")])
        assert new.id != old.id  # a running job does not hold its key against a new one
        if requeue == "reclaim":
            await sql(app, "UPDATE embedq.jobs SET lease_expires_at = now() - interval '1 s'")
            assert await app.store.reclaim_expired() == {"requeued": 1, "dead": 0}
        elif requeue == "retry_later":
            assert await app.store.retry_later(wid, old.id, 0.0, "boom", "RuntimeError")
        elif requeue == "release":
            assert await app.store.release(wid, [old.id]) == [old.id]
        else:
            assert await app.store.release_later(wid, [old.id], 0.0) == [old.id]
        rows = await sql(app, "SELECT id, state, dedup_key FROM embedq.jobs ORDER BY id")
        assert [(r["id"], r["state"], r["dedup_key"]) for r in rows] == [
            (old.id, "pending", None),
            (new.id, "pending", "doc:1"),
        ], requeue


async def test_expired_lease_on_the_last_attempt_dead_letters(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.echo", max_attempts=1)])
    wid = await register_worker(app)
    await app.store.claim(wid, 1)
    await sql(app, "UPDATE embedq.jobs SET lease_expires_at = now() - interval '1 s'")
    assert await app.store.reclaim_expired() == {"requeued": 0, "dead": 1}
    [row] = await sql(app, "SELECT state, error_kind FROM embedq.jobs_archive")
    assert (row["state"], row["error_kind"]) == ("dead", "lease_expired")


async def test_heartbeat_renews_leases_of_held_jobs_only(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.noop"), JobSpec("embedq.noop")])
    wid = await register_worker(app)
    a, _b = await app.store.claim(wid, 2)
    await sql(app, "UPDATE embedq.jobs SET lease_expires_at = now() - interval '1 s'")
    assert await app.store.heartbeat(wid, [a.id], "running") == {a.id}
    assert await app.store.reclaim_expired() == {"requeued": 1, "dead": 0}


async def test_cancel_pending_and_running_then_retry(app: embedq.App) -> None:
    tickets = await app.enqueue([JobSpec("embedq.noop"), JobSpec("embedq.noop")])
    wid = await register_worker(app)
    [running] = await app.store.claim(wid, 1)
    done = await app.store.cancel([t.id for t in tickets] + [424242])
    assert {d["id"] for d in done} == {t.id for t in tickets}
    assert await app.store.heartbeat(wid, [running.id], "running") == set()  # worker learns
    assert await count(app, "jobs_archive", "state = 'cancelled'") == 2
    assert sorted(await app.store.retry([t.id for t in tickets])) == sorted(t.id for t in tickets)
    assert await count(app, "jobs", "state = 'pending' AND attempts = 0") == 2


async def test_retry_dead_jobs_by_filter(app: embedq.App) -> None:
    @app.task(name="t.bad", max_attempts=1)
    def bad(kind: str) -> None:
        raise RuntimeError(f"boom {kind}")

    await bad.defer_many_async([{"kind": "a"}, {"kind": "b"}, {"kind": "a"}])
    await drain(app)
    assert await count(app, "jobs_archive", "state = 'dead'") == 3
    assert len(await app.store.retry(error="boom a", state="dead")) == 2
    assert await count(app, "jobs", "task = 't.bad'") == 2
    assert await app.store.retry(task="nothing", state="dead") == []


async def test_retry_keeps_dedup_invariant(app: embedq.App) -> None:
    [t] = await app.enqueue([JobSpec("embedq.noop", dedup_key="d")])
    await app.store.cancel([t.id])
    [_t2] = await app.enqueue([JobSpec("embedq.noop", dedup_key="d")])
    assert await app.store.retry([t.id]) == [t.id]
    assert await count(app, "jobs", "dedup_key = 'd' AND state = 'pending'") == 1
    assert await count(app, "jobs") == 2  # the retried job kept its place, not its key


async def test_pause_and_resume_are_persisted(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.noop", queue="sync")])
    await app.store.set_paused("sync", True)
    wid = await register_worker(app)
    assert await app.store.claim(wid, 10) == []
    [q] = [q for q in await app.store.queues() if q["name"] == "sync"]
    assert q["paused"]
    await app.store.set_paused("sync", False)
    assert len(await app.store.claim(wid, 10)) == 1


async def test_pause_unknown_queue_is_a_clear_error(app: embedq.App) -> None:
    with pytest.raises(UnknownQueue, match="'nope' is not known"):
        await app.store.set_paused("nope", True)


async def test_clear_archives_pending_jobs_recoverably(app: embedq.App) -> None:
    await app.enqueue([JobSpec("embedq.noop", queue="a")] * 3 + [JobSpec("embedq.noop", queue="b")])
    assert await app.store.clear("a") == 3
    assert await count(app, "jobs") == 1
    assert len(await app.store.retry(queue="a", state="cancelled")) == 3


async def test_delayed_job_runs_after_its_time(app: embedq.App) -> None:
    @app.task(name="t.later")
    async def later() -> None:
        return None

    await later.configure(delay_s=0.5).defer_async()
    wid = await register_worker(app)
    assert await app.store.claim(wid, 1) == []
    await asyncio.sleep(0.6)
    assert len(await app.store.claim(wid, 1)) == 1


async def test_periodic_task_runs_once_per_tick_across_workers(app: embedq.App) -> None:
    @app.periodic("* * * * *", name="t.tick")
    async def tick() -> None:
        return None

    workers = [embedq.Worker(app, install_signals=False) for _ in range(3)]
    runs = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.sleep(2.5)
    for w in workers:
        w.stop()
    await asyncio.gather(*runs)
    [row] = await sql(
        app, "SELECT count(*) AS n, count(DISTINCT tick) AS ticks FROM embedq.periodic_ticks"
    )
    # one row per tick (a minute boundary may fall inside the run: then two ticks)
    assert row["n"] == row["ticks"] and row["ticks"] in (1, 2)
    jobs = await count(app, "jobs_archive", "task = 't.tick'") + await count(
        app, "jobs", "task = 't.tick'"
    )
    assert jobs == row["n"]


def test_invalid_cron_is_refused() -> None:
    app = embedq.App()
    with pytest.raises(InvalidJob, match="cron expression"):
        app.periodic("every tuesday")(lambda: None)


async def test_transactional_enqueue_commits_and_rolls_back_with_the_caller(
    app: embedq.App, db_url: str
) -> None:
    @app.task(name="t.receipt")
    async def receipt(order: int) -> None:
        return None

    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute("CREATE TABLE orders (id int)")
        await conn.execute("INSERT INTO orders VALUES (1)")
        await receipt.configure(connection=conn).defer_async(order=1)
        await conn.rollback()
        await conn.execute("CREATE TABLE orders (id int)")
        await conn.execute("INSERT INTO orders VALUES (2)")
        await receipt.configure(connection=conn).defer_async(order=2)
        await conn.commit()
    rows = await sql(app, "SELECT args FROM embedq.jobs WHERE task = 't.receipt'")
    assert [r["args"] for r in rows] == [{"order": 2}]


def test_sync_defer_with_and_without_a_caller_connection(db_url: str) -> None:
    app = embedq.App(database_url=db_url)

    @app.task(name="t.sync", lock="biz:{business_id}", dedup="sync:{business_id}")
    def sync(business_id: int) -> None:
        return None

    ticket = sync.defer(business_id=7)
    assert sync.defer(business_id=7) == embedq.Enqueued(ticket.id, coalesced=True)
    with psycopg.connect(db_url) as conn:
        sync.configure(connection=conn).defer(business_id=8)
        conn.rollback()
    with psycopg.connect(db_url) as conn:
        many = sync.configure(connection=conn).defer_many([{"business_id": 9}, {"business_id": 10}])
        conn.commit()
    assert len(many) == 2
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT lock_key, dedup_key FROM embedq.jobs ORDER BY id").fetchall()
    assert rows == [("biz:7", "sync:7"), ("biz:9", "sync:9"), ("biz:10", "sync:10")]
    with pytest.raises(InvalidJob, match="template names arguments"):
        sync.defer(other=1)
    asyncio.run(app.close())


async def test_events_record_the_lifecycle(db_url: str) -> None:
    async with embedq.App(database_url=db_url, job_events="all") as app:
        [t] = await app.enqueue([JobSpec("embedq.echo", {"a": 1})])
        await drain(app)
        events = [e["event"] for e in await app.store.fetch("job_events", {"id": t.id})]
        assert events == ["enqueued", "started", "succeeded"]
        job = await app.store.get(t.id)
        assert job["state"] == "succeeded" and job["result"] == {"a": 1}


async def test_default_event_log_keeps_failures_and_shows_a_full_timeline(app: embedq.App) -> None:
    assert app.settings.job_events == "failures"
    [ok] = await app.enqueue([JobSpec("embedq.echo", {"a": 1})])
    [bad] = await app.enqueue([JobSpec("embedq.fail", {"permanent": True})])
    await drain(app)
    assert await app.store.fetch("job_events", {"id": ok.id}) == []
    stored = [e["event"] for e in await app.store.fetch("job_events", {"id": bad.id})]
    assert stored == ["failed", "dead"]
    # the happy path is read off the job's own timestamps
    timeline = [e["event"] for e in (await app.store.get(ok.id))["events"]]
    assert timeline == ["enqueued", "started", "succeeded"]
    timeline = [e["event"] for e in (await app.store.get(bad.id))["events"]]
    assert timeline == ["enqueued", "started", "failed", "dead"]


async def test_failures_only_event_mode_and_delete_mode(db_url: str) -> None:
    app = embedq.App(database_url=db_url, job_events="failures", finished_jobs="delete")
    async with app:
        await app.enqueue(
            [JobSpec("embedq.noop")] * 10 + [JobSpec("embedq.fail", {"permanent": True})]
        )
        await drain(app)
        assert await count(app, "jobs") == 0
        assert await count(app, "jobs_archive", "state = 'succeeded'") == 0
        assert await count(app, "jobs_archive", "state = 'dead'") == 1  # dead letters stay
        assert await count(app, "job_events", "event IN ('enqueued', 'started', 'succeeded')") == 0
        assert await count(app, "job_events", "event = 'dead'") == 1


async def test_cleanup_removes_old_history_only(db_url: str) -> None:
    async with embedq.App(database_url=db_url, job_events="all") as app:
        await app.enqueue([JobSpec("embedq.noop")] * 4)
        await drain(app)
        await sql(
            app,
            "UPDATE embedq.jobs_archive SET finished_at = now() - interval '10 days' "
            "WHERE id IN (SELECT id FROM embedq.jobs_archive LIMIT 3)",
        )
        await sql(
            app,
            "UPDATE embedq.job_events SET at = now() - interval '40 days' WHERE event = 'enqueued'",
        )
        removed = await app.store.cleanup()
        assert removed["jobs"] == 3 and removed["events"] == 4
        assert await count(app, "jobs_archive") == 1
        assert await count(app, "job_events") == 8


async def test_unknown_task_is_dead_lettered_with_the_fix(app: embedq.App) -> None:
    [t] = await app.enqueue([JobSpec("billing.no_such_task", {"x": 1})])
    await app.enqueue([JobSpec("embedq.noop")])
    await drain(app)
    [row] = await sql(
        app, "SELECT state, error_kind, last_error FROM embedq.jobs_archive WHERE id = %s", t.id
    )
    assert row["state"] == "dead" and row["error_kind"] == "unknown_task"
    assert "billing.no_such_task" in row["last_error"] and "--app" in row["last_error"]
    assert await count(app, "jobs_archive", "state = 'succeeded'") == 1


async def test_sigterm_style_stop_releases_unfinished_jobs(app: embedq.App) -> None:
    app.settings = app.settings.model_copy(update={"shutdown_grace_s": 0.2})

    @app.task(name="t.long")
    async def long() -> None:
        await asyncio.sleep(30)

    await long.defer_async()
    w = embedq.Worker(app, install_signals=False)
    run = asyncio.create_task(w.run())
    for _ in range(100):
        if await count(app, "jobs", "state = 'running'"):
            break
        await asyncio.sleep(0.05)
    w.stop()
    await asyncio.wait_for(run, 10)
    [row] = await sql(app, "SELECT state, attempts, worker_id FROM embedq.jobs")
    assert (row["state"], row["attempts"], row["worker_id"]) == ("pending", 0, None)
    [wrow] = await sql(app, "SELECT state FROM embedq.workers WHERE id = %s", w.id)
    assert wrow["state"] == "stopped"


async def test_run_at_in_the_past_runs_now(app: embedq.App) -> None:
    past = in_seconds(-3600)
    await app.enqueue([JobSpec("embedq.noop", run_at=past)])
    wid = await register_worker(app)
    assert len(await app.store.claim(wid, 1)) == 1
    assert past < in_seconds(0) - timedelta(minutes=59)


@pytest.mark.parametrize("events", ["failures", "all"])
async def test_bulk_copy_path_returns_ids_registers_queues_and_logs(
    db_url: str, events: str
) -> None:
    from embedq.jobs import COPY_THRESHOLD

    async with embedq.App(database_url=db_url, job_events=events) as app:
        specs = [
            JobSpec(
                "embedq.echo",
                {"i": i},
                queue="bulk",
                priority=i % 3,
                lock_key=f"k{i % 7}" if i % 2 else None,
            )
            for i in range(COPY_THRESHOLD + 10)
        ]
        tickets = await app.enqueue(specs)
        rows = await sql(app, "SELECT id, args, priority, lock_key FROM embedq.jobs ORDER BY id")
        assert [t.id for t in tickets] == [r["id"] for r in rows]
        assert [r["args"]["i"] for r in rows] == list(range(len(specs)))
        assert (
            rows[5]["priority"] == 2 and rows[5]["lock_key"] == "k5" and rows[4]["lock_key"] is None
        )
        assert "bulk" in {q["name"] for q in await app.store.queues()}  # the trigger ran
        assert await count(app, "job_events", "event = 'enqueued'") == (
            len(specs) if events == "all" else 0
        )
        w = await drain(app, concurrency=50)
        assert w.processed == len(specs)


async def test_bulk_copy_path_joins_the_callers_transaction(app: embedq.App, db_url: str) -> None:
    from embedq.jobs import COPY_THRESHOLD

    specs = [JobSpec("embedq.noop", {"i": i}) for i in range(COPY_THRESHOLD)]
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await app.enqueue(specs, connection=conn)
        await conn.rollback()
        assert await count(app, "jobs") == 0
        await app.enqueue(specs, connection=conn)
        await conn.commit()
    assert await count(app, "jobs") == COPY_THRESHOLD


async def test_notify_wakes_an_idle_worker_without_polling(db_url: str) -> None:
    """With a 10-minute poll interval, only LISTEN/NOTIFY can start a job enqueued later."""
    async with embedq.App(database_url=db_url, poll_interval_s=600) as app:
        w = embedq.Worker(app, install_signals=False)
        run = asyncio.create_task(w.run())
        for _ in range(200):  # until it has registered and gone idle
            if w.id and await count(app, "workers", "id = %s", w.id):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        [t] = await app.enqueue([JobSpec("embedq.echo", {"n": 1})])
        for _ in range(300):
            if await count(app, "jobs_archive", "id = %s AND state = 'succeeded'", t.id):
                break
            await asyncio.sleep(0.05)
        w.stop()
        await asyncio.wait_for(run, 30)
        assert await count(app, "jobs_archive", "id = %s AND state = 'succeeded'", t.id) == 1


async def test_worker_whose_heartbeat_stops_is_shown_dead(app: embedq.App) -> None:
    alive, silent = await register_worker(app, "alive"), await register_worker(app, "silent")
    await sql(
        app,
        "UPDATE embedq.workers SET heartbeat_at = now() - interval '1 hour' WHERE id = %s",
        silent,
    )
    rows = {r["id"]: r["state"] for r in await app.store.fetch("workers", {"dead_after_s": 15})}
    assert rows == {alive: "running", silent: "dead"}
    [overview] = await app.store.fetch("queue_overview", {"dead_after_s": 15})
    assert overview["workers_alive"] == 1


async def test_batch_task_gets_its_jobs_together_and_reports_each(app: embedq.App) -> None:
    seen: list[int] = []

    @app.task(name="t.batch", queue="batchq", batch=True, batch_size=50, retry=1)
    async def batch(jobs: list[embedq.JobContext]) -> embedq.BatchOutcome:
        seen.append(len(jobs))
        out = embedq.BatchOutcome()
        for ctx in jobs:
            if ctx.job.args["n"] % 2:
                out.failed[ctx.job.id] = embedq.PermanentError(f"odd {ctx.job.args['n']}")
        return out

    await batch.defer_many_async([{"n": i} for i in range(10)])
    await drain(app)
    assert seen == [10]  # one call for all ten jobs
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state::text AS state, count(*) AS n FROM embedq.jobs_archive GROUP BY 1 ORDER BY 1"
        )
        assert [(r["state"], r["n"]) for r in await cur.fetchall()] == [
            ("dead", 5),
            ("succeeded", 5),
        ]
    with pytest.raises(embedq.InvalidJob, match="async"):
        app.task(name="t.syncbatch", batch=True)(lambda jobs: None)
