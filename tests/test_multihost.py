"""Many hosts: three `embedq worker` processes, each in a network namespace of its own (its own
veth link, see tests/netns.py), share one PostgreSQL over TCP. In the middle of a run one
host's link is cut, a real partition: packets dropped both ways, no reset, so that host's
connections hang. The other two must reclaim its leased jobs once the leases expire and drain
the queue; nothing may be lost, no document may end with chunks of two versions, and no
document version may be swapped in twice. Then the link comes back: the cut host's late
completions must be no-ops (the worker-id guard of `complete`, the job lock of the swap) and it
must go back to work.

Three scenarios: writes during the partition touch only documents h1 does not hold; they
also rewrite the documents h1 holds (their old jobs must end superseded); the cut lands while
a swap transaction of h1 is open on the server (a test-only trigger holds swaps at a gate the
test controls), so the server keeps that transaction, and its locks, until it learns that h1
is gone.

Opt-in (`-m slow`), root only; it prints its figures (docs/multihost.md, "Many hosts"):

    .venv/bin/python -m pytest tests/test_multihost.py -m slow -s -q

What is measured, and how, from rows alone:

- plain jobs (`chaos.record` of tests/chaos_app.py) write a row per execution into
  `chaos_runs` over the host's own link, so a job "ran twice" when it has two rows, and
  "ran to its end twice" when both rows are stamped finished: the non-idempotent side effect
  happened twice. At-least-once allows this for a job whose host was cut off while running it,
  and for no other job;
- `embedq.sleep` jobs touch no database while they run: those h1 holds at the cut finish during
  the partition, and their completions wait in the worker until the link is back, to be
  dropped by the worker-id guard of `complete` (the worker logs how many);
- an embed job that starts twice costs a second provider call (its `attempts`), which is
  allowed; a document version whose chunks are *swapped in* twice is not. A trigger on
  `embedq.chunks` (test-only, in the test's database) records one row per (document, space,
  version) and swap statement, so two rows for one version would mean two swaps;
- nothing lost: every enqueued job id is in the archive as succeeded, exactly once, with one
  'succeeded' event; every document is embedded at its latest version, all its chunks of it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.conftest import cli_env
from tests.netns import Host, Network, netns_unavailable
from tests.test_chaos import WorkerProc, enqueue, rows, scalar, side_table, wait_for

import embedq
from embedq.jobs import JobSpec

pytestmark = pytest.mark.slow

DOCS = 2_000
PLAIN = 300  # chaos.record jobs, and as many embedq.sleep jobs, interleaved
CUT_AFTER = 0.2  # share of both workloads done before the cut
ENV = {
    "EMBEDQ_LEASE_S": "4",
    "EMBEDQ_HEARTBEAT_S": "1",
    "EMBEDQ_POLL_INTERVAL_S": "0.5",
    "EMBEDQ_JOB_EVENTS": "all",
    "EMBEDQ_EMBED_BATCH_SIZE": "20",
    "EMBEDQ_EMBED_CONCURRENCY": "2",
    "EMBEDQ_CONNECT_TIMEOUT_S": "3",
    "EMBEDQ_SHUTDOWN_GRACE_S": "5",
}
CONCURRENCY = 6  # plain jobs at once per host (embed batches come on top)
LATENCY_MS = 1_500  # the fake provider's delay per call: batches are in flight at the cut

# One row per (document, space, version) per statement that writes chunks: one per swap.
SWAP_LOG = """
CREATE TABLE public.mh_swaps (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id bigint NOT NULL,
    space_id    integer NOT NULL,
    version     integer NOT NULL,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION public.mh_swap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.mh_swaps (document_id, space_id, version)
    SELECT DISTINCT document_id, space_id, version FROM new_chunks;
    RETURN NULL;
END $$;
CREATE TRIGGER mh_swap AFTER INSERT ON embedq.chunks
    REFERENCING NEW TABLE AS new_chunks FOR EACH STATEMENT EXECUTE FUNCTION public.mh_swap();
"""
# A gate inside every swap, after its chunks are written: while the test holds the advisory
# lock, swap transactions wait there with their jobs and documents locked (as behind a slow
# disk or a lock held by the application), so the cut can land inside one for certain.
GATE = (727272, 1)
GATED_SWAPS = f"""
CREATE FUNCTION public.mh_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({GATE[0]}, {GATE[1]});
    RETURN NULL;
END $$;
CREATE TRIGGER mh_gate AFTER INSERT ON embedq.chunks
    FOR EACH STATEMENT EXECUTE FUNCTION public.mh_gate();
"""


@dataclass(frozen=True)
class Scenario:
    rewrite_held: bool = False  # also rewrite the documents whose embed jobs h1 holds
    mid_swap: bool = False  # cut h1 while a swap transaction of its is open on the server


SCENARIOS = [
    pytest.param(Scenario(), id="rewrites-elsewhere"),
    # Both found by this test, and fixed: a reclaimed job whose document has a newer
    # pending embed job gives up its dedup key (sql/queue.sql); a host cut inside a
    # transaction has it ended by idle_in_transaction_session_timeout (db.py).
    pytest.param(Scenario(rewrite_held=True), id="rewrites-of-held-documents"),
    pytest.param(Scenario(mid_swap=True), id="cut-inside-a-swap"),
]


class Cluster:
    """Hosts of a Network, each with one worker process; at teardown the processes are
    killed first (a process keeps its namespace alive), then the network is removed."""

    def __init__(self, net: Network, tmp_path: Path) -> None:
        self.net = net
        self.tmp_path = tmp_path
        self.workers: dict[str, WorkerProc] = {}
        self.hosts: dict[str, Host] = {}

    def start(self, host: Host, db_url: str) -> WorkerProc:
        proxy = host.forward(db_url)
        log_path = self.tmp_path / f"worker-{host.name}.log"
        log = log_path.open("wb")
        argv = host.command(
            sys.executable, "-m", "embedq", "worker", "--app", "chaos_app:app",
            "--name", host.name, "--concurrency", str(CONCURRENCY),
        )  # fmt: skip
        popen = subprocess.Popen(
            argv,
            env=cli_env(proxy.url(db_url), **ENV),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        w = WorkerProc(popen, log_path, host.name, log)
        self.workers[host.name] = w
        self.hosts[host.name] = host
        return w

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (pid {w.pid}):\n{w.log()[-3000:]}" for name, w in self.workers.items()
        )

    def close(self) -> None:
        for w in self.workers.values():
            if w.popen.poll() is None:
                os.kill(w.pid, signal.SIGKILL)
                w.popen.wait(30)
            w._log.close()
        self.net.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    c = Cluster(Network(), tmp_path)
    try:
        yield c
    finally:
        c.close()


def _db_now(url: str) -> datetime:
    return scalar(url, "SELECT clock_timestamp()")


def _secs(a: datetime | None, b: datetime) -> float | None:
    return None if a is None else round((a - b).total_seconds(), 2)


def _write_documents(url: str, docs: list[dict[str, str]], create: bool = False) -> list[int]:
    """Write documents as an application would; the ids of their embed jobs."""

    async def go() -> list[int]:
        async with embedq.App(database_url=url, job_events="all") as app:
            if create:
                col = await app.collections.create(
                    "hosts", provider="fake", model="fake-64", options={"latency_ms": LATENCY_MS}
                )
            else:
                col = await app.collections.get("hosts")
            results = await col.upsert_many(docs)
            return [r.job_id for r in results if r.job_id is not None]

    return asyncio.run(go())


def _text(i: int, version: int) -> str:
    return f"document {i} version {version}: notes on topic {i % 37} and region {i % 11}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_host_cut_off_mid_run_loses_nothing_and_embeds_nothing_twice(
    db_url: str, cluster: Cluster, scenario: Scenario
) -> None:
    rewrite_held = scenario.rewrite_held
    # --- the workload, written before any worker runs -------------------------------------
    side_table(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SWAP_LOG)
        if scenario.mid_swap:
            conn.execute(GATED_SWAPS)
    embed_ids = set(
        _write_documents(
            db_url, [{"key": f"d{i}", "text": _text(i, 1)} for i in range(DOCS)], create=True
        )
    )
    interleaved = [
        spec
        for i in range(PLAIN)
        for spec in (JobSpec("chaos.record", {"hold_s": 0.5, "n": i}), JobSpec("embedq.sleep"))
    ]
    queued = enqueue(db_url, interleaved)
    plain_ids, sleep_ids = set(queued[0::2]), set(queued[1::2])
    assert len(embed_ids) == DOCS and len(plain_ids) == len(sleep_ids) == PLAIN

    net = cluster.net
    h1, h2, h3 = (net.add_host() for _ in range(3))
    began = time.monotonic()
    procs = {h.name: cluster.start(h, db_url) for h in (h1, h2, h3)}
    ids = {
        name: int(
            wait_for(
                lambda p=p: rows(db_url, "SELECT id FROM embedq.workers WHERE pid = %s", (p.pid,)),
                120,
                f"worker {name} to register",
                cluster.logs,
            )[0][0]
        )
        for name, p in procs.items()
    }
    cut_id = ids["h1"]
    # Every host reached the database over its own link: its forwarder took connections.
    assert all(h.proxies and h.proxies[0].accepted > 0 for h in (h1, h2, h3))

    # --- the cut: once a fifth of the work is done and h1 holds jobs of all three kinds -----
    def ready() -> bool:
        [(embedded, plain_done)] = rows(
            db_url,
            "SELECT (SELECT count(*) FROM embedq.documents WHERE status = 'embedded'), "
            "(SELECT count(*) FROM embedq.jobs_archive WHERE task = 'chaos.record')",
        )
        held = dict(
            rows(
                db_url,
                "SELECT task, count(*) FROM embedq.jobs WHERE worker_id = %s "
                "AND state = 'running' GROUP BY 1",
                (cut_id,),
            )
        )
        return (
            embedded >= DOCS * CUT_AFTER
            and plain_done >= PLAIN * CUT_AFTER
            and held.get("embedq.embed", 0) > 0
            and held.get("chaos.record", 0) > 0
            and held.get("embedq.sleep", 0) > 0
        )

    def swapping() -> bool:
        """Whether a swap transaction of h1 is open: it holds some of h1's jobs locked."""
        with psycopg.connect(db_url) as conn:
            [(free, total)] = conn.execute(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM embedq.jobs WHERE worker_id = %s "
                "        AND state = 'running' FOR UPDATE SKIP LOCKED) x), "
                "(SELECT count(*) FROM embedq.jobs WHERE worker_id = %s AND state = 'running')",
                (cut_id, cut_id),
            ).fetchall()
            conn.rollback()
        return bool(free < total)

    def gated() -> bool:
        """h1's swap waits at the gate: seen three times in a row, so that the brief row locks
        of a heartbeat do not fool us."""
        for _ in range(3):
            if not swapping():
                return False
            time.sleep(0.1)
        return True

    def running_on_h1() -> dict[int, str]:
        return dict(
            rows(
                db_url,
                "SELECT id, task FROM embedq.jobs WHERE worker_id = %s AND state = 'running'",
                (cut_id,),
            )
        )

    wait_for(ready, 240, "a fifth of the work done and h1 holding jobs", cluster.logs, 0.05)
    gate = psycopg.connect(db_url, autocommit=True)
    try:
        if scenario.mid_swap:
            gate.execute("SELECT pg_advisory_lock(%s, %s)", GATE)
            # h1's next batch comes back from the provider within 1.5 s and waits at the gate.
            wait_for(gated, 60, "a swap of h1 to wait at the gate", cluster.logs)
        held = running_on_h1()
        h1.cut()
    finally:
        gate.close()  # the gate opens: h1's swap finishes on the server, its reply is lost
    cut_at = _db_now(db_url)
    cut_mono = time.monotonic()
    # What h1 holds by the database's account: just before the cut, and once what it sent
    # before the cut has landed (a claim, say). A statement of h1 that reached the server
    # before the cut may also wait there on a lock and complete a job later: see `lost` below.
    time.sleep(1.0)
    held |= running_on_h1()
    held_embed = {j for j, t in held.items() if t == "embedq.embed"}
    held_plain = {j for j, t in held.items() if t == "chaos.record"}
    held_sleep = {j for j, t in held.items() if t == "embedq.sleep"}
    # (ready() saw all three kinds; a completion in flight at the cut may take one away)
    assert held_embed and (held_plain or held_sleep), held
    progress_at_cut = rows(
        db_url,
        "SELECT (SELECT count(*) FROM embedq.documents WHERE status = 'embedded'), "
        "(SELECT count(*) FROM embedq.jobs_archive WHERE task = 'chaos.record')",
    )[0]

    # Writes go on during the partition: new versions of documents embedded already (and, with
    # `rewrite_held`, of the documents whose embed jobs h1 holds).
    [(space_id,)] = rows(db_url, "SELECT id FROM embedq.spaces WHERE state = 'active'")
    held_docs = {
        int(d)
        for (d,) in rows(
            db_url,
            "SELECT (args->>'document')::bigint FROM embedq.jobs WHERE id = ANY(%s)",
            (sorted(held_embed),),
        )
    }
    rewrite = [
        int(k[1:])
        for (k,) in rows(
            db_url,
            "SELECT key FROM embedq.documents WHERE status = 'embedded' AND NOT id = ANY(%s) "
            "ORDER BY id LIMIT 200",
            (sorted(held_docs),),
        )
    ]
    if rewrite_held:
        rewrite += [
            int(k[1:])
            for (k,) in rows(
                db_url, "SELECT key FROM embedq.documents WHERE id = ANY(%s)", (sorted(held_docs),)
            )
        ]
    embed_ids |= set(
        _write_documents(db_url, [{"key": f"d{i}", "text": _text(i, 2)} for i in rewrite])
    )

    # --- the other two hosts drain the queue while h1 stays cut off --------------------------
    def drained() -> bool:
        # h1's leases ran out long ago and the janitors look every 1.3 s: none of its jobs
        # may still be running.
        [(stuck, orphans)] = rows(
            db_url,
            "SELECT (SELECT count(*) FROM embedq.jobs WHERE worker_id = %s AND state = 'running' "
            "        AND lease_expires_at < now() - interval '30 s'), "
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "        AND state = 'idle in transaction')",
            (cut_id,),
        )
        assert not stuck, (
            f"{stuck} of h1's jobs are still running 30 s after their leases expired; "
            f"{orphans} sessions are idle in a transaction (h1's, orphaned by the cut, holding "
            "the jobs locked: reclaim skips locked rows)"
        )
        for name in ("h2", "h3"):
            w = cluster.workers[name]
            assert w.alive(), f"healthy host {name} died:\n{w.log()[-4000:]}"
            assert "jobs_dedup_pending_uidx" not in w.log(), (
                f"{name} cannot reclaim or requeue a job whose dedup key is pending again:\n"
                + w.log()[-3000:]
            )
        return scalar(db_url, "SELECT count(*) FROM embedq.jobs") == 0

    wait_for(drained, 420, "the healthy hosts to drain the queue", cluster.logs, 0.25)
    drained_at = _db_now(db_url)
    drain_s = time.monotonic() - began
    assert h1.is_cut and cluster.workers["h1"].alive()

    # Reclaimed: the jobs h1 held, each by a lease expiry, all finished elsewhere. A held job
    # not reclaimed was completed by h1 itself: its completion reached the server before the
    # cut and waited there on a lock (behind h1's own swap, in the cut-inside-a-swap scenario).
    reclaimed = dict(
        rows(
            db_url,
            "SELECT job_id, min(at) FROM embedq.job_events WHERE event = 'reclaimed' "
            "AND worker_id = %s GROUP BY 1",
            (cut_id,),
        )
    )
    assert set(reclaimed) <= set(held), (sorted(set(reclaimed) - set(held)), cluster.logs())
    landed_late = set(held) - set(reclaimed)
    if landed_late:
        assert rows(
            db_url,
            "SELECT DISTINCT state::text, worker_id FROM embedq.jobs_archive WHERE id = ANY(%s)",
            (sorted(landed_late),),
        ) == [("succeeded", cut_id)]
    lost = {j: t for j, t in held.items() if j in reclaimed}
    lost_embed = {j for j, t in lost.items() if t == "embedq.embed"}
    lost_sleep = {j for j, t in lost.items() if t == "embedq.sleep"}
    assert lost_embed, (held, cluster.logs())
    others_reclaimed = scalar(
        db_url,
        "SELECT count(*) FROM embedq.job_events WHERE event = 'reclaimed' AND worker_id <> %s",
        (cut_id,),
    )
    finished = dict(
        rows(
            db_url,
            "SELECT id, finished_at FROM embedq.jobs_archive WHERE id = ANY(%s)",
            (sorted(lost),),
        )
    )
    assert rows(
        db_url,
        "SELECT DISTINCT state::text, worker_id = %s, attempts >= 2 FROM embedq.jobs_archive "
        "WHERE id = ANY(%s)",
        (cut_id, sorted(lost)),
    ) == [("succeeded", False, True)]

    # Each ran again on a healthy host; reclaimed jobs queue up behind what is pending.
    restarted = [
        at
        for (at,) in rows(
            db_url,
            "SELECT min(at) FROM embedq.job_events WHERE event = 'started' AND job_id = ANY(%s) "
            "AND worker_id <> %s GROUP BY job_id",
            (sorted(lost), cut_id),
        )
    ]
    assert len(restarted) == len(lost)
    if rewrite_held:
        # Their documents moved on meanwhile: the old versions' jobs end superseded.
        assert rows(
            db_url,
            "SELECT DISTINCT outcome FROM embedq.jobs_archive WHERE id = ANY(%s)",
            (sorted(lost_embed),),
        ) == [("superseded",)]

    # Nothing lost: every enqueued job succeeded, once.
    enqueued = embed_ids | plain_ids | sleep_ids
    [(archived, distinct, succeeded)] = rows(
        db_url,
        "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE state = 'succeeded') "
        "FROM embedq.jobs_archive",
    )
    assert archived == distinct == succeeded == len(enqueued), (archived, len(enqueued))
    assert {j for (j,) in rows(db_url, "SELECT id FROM embedq.jobs_archive")} == enqueued
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM (SELECT job_id FROM embedq.job_events WHERE event = 'succeeded' "
            "GROUP BY job_id HAVING count(*) <> 1) x",
        )
        == 0
    )
    assert scalar(
        db_url, "SELECT count(*) FROM embedq.job_events WHERE event = 'succeeded'"
    ) == len(enqueued)

    # Every document embedded at its latest version, all its chunks of that version.
    assert rows(db_url, "SELECT status, count(*) FROM embedq.documents GROUP BY 1") == [
        ("embedded", DOCS)
    ]
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM embedq.documents d WHERE NOT EXISTS ("
            "  SELECT 1 FROM embedq.chunks c WHERE c.document_id = d.id AND c.space_id = %s)"
            " OR EXISTS (SELECT 1 FROM embedq.chunks c WHERE c.document_id = d.id "
            "            AND c.version <> d.version)"
            " OR NOT EXISTS (SELECT 1 FROM embedq.document_spaces s WHERE s.document_id = d.id "
            "                AND s.space_id = %s AND s.version = d.version)",
            (space_id, space_id),
        )
        == 0
    )
    # Nothing embedded twice: each (document, version) swapped in once.
    [(swaps, versions, twice)] = rows(
        db_url,
        "SELECT sum(n), count(*), count(*) FILTER (WHERE n > 1) FROM ("
        "  SELECT count(*) AS n FROM public.mh_swaps GROUP BY document_id, space_id, version) x",
    )
    # (A document rewritten while h1 held its job never has its old version swapped in.)
    expected = DOCS + len(set(rewrite)) - (len(lost_embed) if rewrite_held else 0)
    assert twice == 0 and swaps == versions == expected, (swaps, versions, expected)
    embed_started_twice = scalar(
        db_url,
        "SELECT count(*) FROM embedq.jobs_archive WHERE task = 'embedq.embed' AND attempts > 1",
    )
    # Plain jobs: only a job that was reclaimed may have run twice.
    runs_twice = {
        j: (n, done)
        for j, n, done in rows(
            db_url,
            "SELECT job_id, count(*), count(finished_at) FROM chaos_runs GROUP BY 1 "
            "HAVING count(*) > 1",
        )
    }
    all_reclaimed = {
        j for (j,) in rows(db_url, "SELECT job_id FROM embedq.job_events WHERE event = 'reclaimed'")
    }
    assert set(runs_twice) <= all_reclaimed, sorted(set(runs_twice) - all_reclaimed)
    assert all(n == 2 for n, _ in runs_twice.values()), runs_twice
    assert scalar(
        db_url, "SELECT count(DISTINCT job_id) FROM chaos_runs WHERE finished_at IS NOT NULL"
    ) == len(plain_ids)

    # --- the link comes back --------------------------------------------------------------
    before = {
        "archive": rows(
            db_url, "SELECT id, state::text, worker_id, attempts, finished_at FROM "
            "embedq.jobs_archive ORDER BY id"
        ),
        "swaps": scalar(db_url, "SELECT count(*) FROM public.mh_swaps"),
        "chunks": rows(
            db_url, "SELECT document_id, version, count(*), min(id) FROM embedq.chunks "
            "GROUP BY 1, 2 ORDER BY 1, 2"
        ),
    }  # fmt: skip
    late_at = _db_now(db_url)
    h1.restore()
    restored_mono = time.monotonic()
    w1 = cluster.workers["h1"]
    wait_for(
        lambda: w1.log().rfind("reachable again") > w1.log().rfind("database unavailable") >= 0,
        120,
        "h1 to log its recovery after the partition",
        w1.log,
    )
    recovered_s = time.monotonic() - restored_mono
    wait_for(
        lambda: scalar(
            db_url,
            "SELECT heartbeat_at > %s + interval '2 s' FROM embedq.workers WHERE id = %s",
            (late_at, cut_id),
        ),
        60,
        "h1 to heartbeat again",
        w1.log,
    )
    time.sleep(3)  # its stale copies, told by the heartbeat, stop or finish late (no-ops)
    assert w1.alive(), w1.log()
    # Its late completions changed nothing: the same archive, chunks and swaps.
    assert scalar(db_url, "SELECT count(*) FROM embedq.jobs") == 0
    assert rows(
        db_url, "SELECT id, state::text, worker_id, attempts, finished_at FROM "
        "embedq.jobs_archive ORDER BY id"
    ) == before["archive"]  # fmt: skip
    assert scalar(db_url, "SELECT count(*) FROM public.mh_swaps") == before["swaps"]
    assert rows(
        db_url, "SELECT document_id, version, count(*), min(id) FROM embedq.chunks "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    ) == before["chunks"]  # fmt: skip
    # The side effects of plain jobs that h1 finished after all (at-least-once, measured).
    late_finished = scalar(
        db_url,
        "SELECT count(*) FROM chaos_runs WHERE worker_id = %s AND finished_at > %s",
        (cut_id, late_at),
    )
    ran_to_end_twice = scalar(
        db_url,
        "SELECT count(*) FROM (SELECT job_id FROM chaos_runs GROUP BY 1 "
        "HAVING count(finished_at) > 1) x",
    )
    log1 = w1.log()
    dropped = sum(
        int(line.split(" finished jobs were reclaimed")[0].rsplit(" ", 1)[1])
        for line in log1.splitlines()
        if "their results dropped" in line
    )
    stopped = log1.count("cancelled or reclaimed")
    # The sleep jobs h1 lost finished there during the partition; their completions, sent once
    # the link was back, were refused: other hosts had completed the jobs meanwhile. (Not
    # always all of them: a claim executed just before the cut whose reply was lost leaves h1
    # holding a job it never started.)
    assert dropped >= 1 or not lost_sleep, (dropped, lost_sleep, log1[-3000:])

    # --- h1 resumes: alone now, it runs new work --------------------------------------------
    for name in ("h2", "h3"):
        cluster.workers[name].popen.send_signal(signal.SIGTERM)
    for name in ("h2", "h3"):
        assert cluster.workers[name].wait(60) == 0, cluster.workers[name].log()
    fresh_plain = set(enqueue(db_url, [JobSpec("chaos.record", {"n": -i}) for i in range(20)]))
    fresh_embed = set(
        _write_documents(db_url, [{"key": f"d{i}", "text": _text(i, 3)} for i in range(20)])
    )
    wait_for(
        lambda: scalar(db_url, "SELECT count(*) FROM embedq.jobs") == 0,
        120,
        "h1 to run the work enqueued after the partition",
        w1.log,
    )
    assert rows(
        db_url,
        "SELECT DISTINCT state::text, worker_id FROM embedq.jobs_archive WHERE id = ANY(%s)",
        (sorted(fresh_plain | fresh_embed),),
    ) == [("succeeded", cut_id)]
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM embedq.documents d JOIN embedq.chunks c ON c.document_id = d.id "
            "WHERE c.version <> d.version",
        )
        == 0
    )
    w1.popen.send_signal(signal.SIGTERM)
    assert w1.wait(60) == 0, w1.log()
    assert rows(db_url, "SELECT DISTINCT state FROM embedq.workers") == [("stopped",)]

    per_host = dict(
        rows(
            db_url,
            "SELECT w.name, count(a.id) FROM embedq.workers w LEFT JOIN embedq.jobs_archive a "
            "ON a.worker_id = w.id AND a.finished_at <= %s GROUP BY 1 ORDER BY 1",
            (drained_at,),
        )
    )
    figures: dict[str, Any] = {
        "scenario": scenario,
        "cut": h1.cut_by,
        "jobs": {
            "embed": len(embed_ids),
            "chaos.record": PLAIN,
            "embedq.sleep": PLAIN,
            "rewrites": len(set(rewrite)),
        },
        "done at the cut": {"documents": progress_at_cut[0], "plain": progress_at_cut[1]},
        "held by h1 at the cut, lost to it": {
            t: sum(1 for x in lost.values() if x == t)
            for t in ("embedq.embed", "chaos.record", "embedq.sleep")
        },
        "held by h1 at the cut, completed by it after all": len(landed_late),
        "reclaimed after cut (s)": {
            "first": _secs(min(reclaimed.values()), cut_at),
            "last": _secs(max(reclaimed.values()), cut_at),
        },
        "held jobs started again after cut (s)": {
            "first": _secs(min(restarted), cut_at),
            "last": _secs(max(restarted), cut_at),
        },
        "held jobs finished elsewhere after cut (s)": _secs(max(finished.values()), cut_at),
        "reclaims of healthy hosts' jobs": others_reclaimed,
        "embed jobs started twice (provider called twice)": embed_started_twice,
        "document versions swapped twice": twice,
        "plain jobs started twice": len(runs_twice),
        "plain jobs run to their end twice": ran_to_end_twice,
        "h1 late side effects finished after restore": late_finished,
        "h1 late completions refused (guard)": dropped,
        "h1 stale copies stopped by its heartbeat": stopped,
        "drain (s)": {"total": round(drain_s, 1), "after cut": _secs(drained_at, cut_at)},
        "h1 recovered after restore (s)": round(recovered_s, 1),
        "jobs completed per host until drained": per_host,
        "cut to restore (s)": round(restored_mono - cut_mono, 1),
    }
    print("\nmany hosts:", *(f"  {k}: {v}" for k, v in figures.items()), sep="\n")
