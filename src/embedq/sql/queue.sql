-- Named queries of the job queue. Placeholders: {schema} (identifier), {channel} (literal),
-- {cols} (the job columns shared by jobs and jobs_archive, state aside), {base_cols} (the same
-- less last_error and error_kind), {queue_filter} (claim variants).
-- Values are always bound parameters.

-- name: enqueue
-- Many jobs in one round trip; a dedup key that is already pending coalesces into that job
-- (its arguments are replaced by the newest, its priority and run_at take the more urgent).
WITH input AS (
    SELECT * FROM unnest(
        %(task)s::text[], %(args)s::jsonb[], %(queue)s::text[], %(priority)s::int[],
        %(run_at)s::timestamptz[], %(max_attempts)s::int[], %(lock_key)s::text[],
        %(dedup_key)s::text[], %(timeout_s)s::float8[]
    ) WITH ORDINALITY AS i(task, args, queue, priority, run_at, max_attempts, lock_key,
                          dedup_key, timeout_s, ord)
), inserted AS (
    INSERT INTO {schema}.jobs AS j
        (task, args, queue, priority, run_at, max_attempts, lock_key, dedup_key, timeout_s)
    SELECT task, args, queue, priority, coalesce(run_at, now()), max_attempts, lock_key,
           dedup_key, timeout_s
    FROM input ORDER BY ord
    ON CONFLICT (dedup_key) WHERE state = 'pending' AND dedup_key IS NOT NULL
    DO UPDATE SET args = EXCLUDED.args,
                  priority = GREATEST(j.priority, EXCLUDED.priority),
                  run_at = LEAST(j.run_at, EXCLUDED.run_at)
    RETURNING j.id, j.dedup_key, (j.xmax <> 0) AS coalesced
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt)
    SELECT id, 'enqueued', 0 FROM inserted WHERE %(log_all)s AND NOT coalesced
)
SELECT id, dedup_key, coalesced FROM inserted;

-- name: claim
-- One round trip claims a batch: highest priority first, then oldest run_at; a lock key
-- already running (or claimed by a concurrent claimer: advisory lock) is skipped, and a
-- batch takes at most one job per lock key.
WITH candidates AS (
    SELECT j.id, j.lock_key, j.priority, j.run_at
    FROM {schema}.jobs j
    WHERE j.state = 'pending' AND j.run_at <= now() {queue_filter}
      AND j.queue NOT IN (SELECT name FROM {schema}.queues WHERE paused)
      AND (j.lock_key IS NULL OR (
            NOT EXISTS (SELECT 1 FROM {schema}.jobs r
                        WHERE r.lock_key = j.lock_key AND r.state = 'running')
            AND pg_try_advisory_xact_lock(%(lock_ns)s, hashtext(j.lock_key))))
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT id FROM (
        SELECT id, lock_key, row_number() OVER (
            PARTITION BY lock_key ORDER BY priority DESC, run_at, id) AS rn
        FROM candidates) c
    WHERE lock_key IS NULL OR rn = 1
), claimed AS (
    UPDATE {schema}.jobs j
    SET state = 'running', attempts = j.attempts + 1, worker_id = %(worker)s,
        started_at = now(), lease_expires_at = now() + make_interval(secs => %(lease_s)s)
    -- an id array keeps the plan on the primary key (a join may scan the table)
    WHERE j.id = ANY(ARRAY(SELECT id FROM chosen))
    RETURNING j.id, j.task, j.args, j.queue, j.priority, j.attempts, j.max_attempts,
              j.lock_key, j.dedup_key, j.timeout_s, j.enqueued_at, j.run_at
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, worker_id)
    SELECT id, 'started', attempts, %(worker)s FROM claimed WHERE %(log_all)s
)
SELECT * FROM claimed;

-- name: complete
-- Finish many jobs of one worker in one round trip. The worker_id guard makes a late
-- completion by a worker whose lease was reclaimed a no-op: each job completes once.
WITH done AS (
    DELETE FROM {schema}.jobs j
    USING unnest(%(ids)s::bigint[], %(results)s::jsonb[], %(outcomes)s::text[])
          AS r(id, result, outcome)
    WHERE j.id = r.id AND j.state = 'running' AND j.worker_id = %(worker)s
    RETURNING j.*, r.result, r.outcome
), archived AS (
    INSERT INTO {schema}.jobs_archive ({cols}, state, finished_at, result, outcome)
    SELECT {cols}, 'succeeded', now(), result, outcome FROM done WHERE %(archive)s
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, worker_id, detail)
    SELECT id, 'succeeded', attempts, %(worker)s, outcome FROM done WHERE %(log_all)s
), counted AS (
    UPDATE {schema}.workers SET processed = processed + (SELECT count(*) FROM done)
    WHERE id = %(worker)s
)
SELECT id FROM done;

-- name: retry_later
-- A failed attempt with attempts left: back to pending after the backoff delay.
WITH back AS (
    UPDATE {schema}.jobs j
    SET state = 'pending', run_at = now() + make_interval(secs => %(delay_s)s),
        worker_id = NULL, lease_expires_at = NULL, last_error = %(error)s,
        error_kind = %(kind)s,
        -- invariant 4: a pending job may already hold the key (a newer write); this one
        -- gives its key up rather than its place
        dedup_key = CASE WHEN EXISTS (SELECT 1 FROM {schema}.jobs p WHERE p.dedup_key = j.dedup_key AND p.state = 'pending') THEN NULL
                         ELSE j.dedup_key END
    WHERE j.id = %(id)s AND j.state = 'running' AND j.worker_id = %(worker)s
    RETURNING j.id, j.attempts, j.run_at
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, worker_id, detail)
    SELECT id, 'failed', attempts, %(worker)s, %(error)s FROM back
    UNION ALL
    SELECT id, 'retried', attempts, %(worker)s, 'next attempt at ' || run_at::text FROM back
), counted AS (
    UPDATE {schema}.workers SET failed = failed + (SELECT count(*) FROM back)
    WHERE id = %(worker)s
)
SELECT id FROM back;

-- name: bury
-- A permanent failure, or the last attempt failed: into the dead-letter archive.
WITH done AS (
    DELETE FROM {schema}.jobs j
    WHERE j.id = %(id)s AND j.state = 'running' AND j.worker_id = %(worker)s
    RETURNING j.*
), archived AS (
    INSERT INTO {schema}.jobs_archive ({base_cols}, state, finished_at, last_error, error_kind)
    SELECT {base_cols}, 'dead', now(), %(error)s, %(kind)s FROM done
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, worker_id, detail)
    SELECT id, 'failed', attempts, %(worker)s, %(error)s FROM done
    UNION ALL
    SELECT id, 'dead', attempts, %(worker)s, %(kind)s FROM done
), counted AS (
    UPDATE {schema}.workers SET failed = failed + (SELECT count(*) FROM done)
    WHERE id = %(worker)s
)
SELECT id FROM done;

-- name: release
-- A worker shutting down hands back jobs it will not finish; the attempt is not counted.
WITH mine AS (
    -- invariant 4: a job going back to pending gives up its dedup key where a pending job
    -- (or a newer job of this batch) holds it, rather than its place
    SELECT id, dedup_key IS NOT NULL AND (
               row_number() OVER (PARTITION BY dedup_key ORDER BY id DESC) > 1
               OR EXISTS (SELECT 1 FROM {schema}.jobs p WHERE p.dedup_key = m.dedup_key AND p.state = 'pending')) AS drop_key
    FROM {schema}.jobs m
    WHERE m.id = ANY(%(ids)s) AND m.state = 'running' AND m.worker_id = %(worker)s
), back AS (
    UPDATE {schema}.jobs j
    SET state = 'pending', attempts = GREATEST(j.attempts - 1, 0), worker_id = NULL,
        lease_expires_at = NULL, run_at = now(),
        dedup_key = CASE WHEN m.drop_key THEN NULL ELSE j.dedup_key END
    FROM mine m
    WHERE j.id = m.id AND j.state = 'running' AND j.worker_id = %(worker)s
    RETURNING j.id, j.queue
), notified AS (
    SELECT pg_notify({channel}, queue) FROM (SELECT DISTINCT queue FROM back) q
)
SELECT id FROM back, (SELECT count(*) FROM notified) n;

-- name: release_later
-- A batch task gives back jobs it cannot run now (a provider's circuit is open): back to
-- pending after a delay, the attempt not counted, no error recorded.
WITH mine AS (
    -- invariant 4: a job going back to pending gives up its dedup key where a pending job
    -- (or a newer job of this batch) holds it, rather than its place
    SELECT id, dedup_key IS NOT NULL AND (
               row_number() OVER (PARTITION BY dedup_key ORDER BY id DESC) > 1
               OR EXISTS (SELECT 1 FROM {schema}.jobs p WHERE p.dedup_key = m.dedup_key AND p.state = 'pending')) AS drop_key
    FROM {schema}.jobs m
    WHERE m.id = ANY(%(ids)s) AND m.state = 'running' AND m.worker_id = %(worker)s
)
UPDATE {schema}.jobs j
SET state = 'pending', attempts = GREATEST(j.attempts - 1, 0), worker_id = NULL,
    lease_expires_at = NULL, run_at = now() + make_interval(secs => %(delay_s)s),
    dedup_key = CASE WHEN m.drop_key THEN NULL ELSE j.dedup_key END
FROM mine m
WHERE j.id = m.id AND j.state = 'running' AND j.worker_id = %(worker)s
RETURNING j.id;

-- name: heartbeat
-- Renew this worker's leases and its own row; returns the jobs it still holds, so a job
-- cancelled or reclaimed meanwhile can be stopped locally.
WITH renewed AS (
    UPDATE {schema}.jobs
    SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
    WHERE worker_id = %(worker)s AND state = 'running' AND id = ANY(%(ids)s)
    RETURNING id
), me AS (
    UPDATE {schema}.workers SET heartbeat_at = now(), state = %(state)s
    WHERE id = %(worker)s RETURNING id
)
SELECT id FROM renewed;

-- name: reclaim_expired
-- Jobs whose lease ran out (their worker crashed or froze) go back to pending, the attempt
-- counted; on their last attempt they are dead-lettered instead.
WITH expired AS (
    SELECT id, worker_id AS old_worker, dedup_key FROM {schema}.jobs
    WHERE state = 'running' AND lease_expires_at < now() AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
    FOR UPDATE SKIP LOCKED
), keyed AS (
    -- invariant 4: a requeued job gives up its dedup key where a pending job (or a newer
    -- expired one) holds it, rather than its place
    SELECT e.id, e.old_worker, e.dedup_key IS NOT NULL AND (
               row_number() OVER (PARTITION BY e.dedup_key ORDER BY e.id DESC) > 1
               OR EXISTS (SELECT 1 FROM {schema}.jobs p WHERE p.dedup_key = e.dedup_key AND p.state = 'pending')) AS drop_key
    FROM expired e
), requeued AS (
    UPDATE {schema}.jobs j
    SET state = 'pending', run_at = now(), worker_id = NULL, lease_expires_at = NULL,
        dedup_key = CASE WHEN e.drop_key THEN NULL ELSE j.dedup_key END,
        last_error = 'lease expired: worker ' || coalesce(e.old_worker::text, '?')
                     || ' stopped heartbeating (crashed, killed or frozen)',
        error_kind = 'lease_expired'
    FROM keyed e WHERE j.id = e.id AND j.attempts < j.max_attempts
    RETURNING j.id, j.queue, j.attempts, e.old_worker
), buried AS (
    DELETE FROM {schema}.jobs j USING expired e
    WHERE j.id = e.id AND j.attempts >= j.max_attempts
    RETURNING j.*, e.old_worker
), archived AS (
    INSERT INTO {schema}.jobs_archive ({base_cols}, state, finished_at, last_error, error_kind)
    SELECT {base_cols}, 'dead', now(),
           'lease expired on the last attempt: worker ' || coalesce(old_worker::text, '?')
           || ' stopped heartbeating', 'lease_expired'
    FROM buried
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, worker_id, detail)
    SELECT id, 'reclaimed', attempts, old_worker, 'lease expired' FROM requeued
    UNION ALL
    SELECT id, 'dead', attempts, old_worker, 'lease expired on the last attempt' FROM buried
), notified AS (
    SELECT pg_notify({channel}, queue) FROM (SELECT DISTINCT queue FROM requeued) q
)
SELECT (SELECT count(*) FROM requeued) AS requeued, (SELECT count(*) FROM buried) AS dead,
       (SELECT count(*) FROM notified) AS notified;

-- name: cancel
-- Pending or running jobs to the archive as cancelled. A running job's worker finds it gone
-- at its next heartbeat and stops it.
WITH done AS (
    DELETE FROM {schema}.jobs j WHERE j.id = ANY(%(ids)s)
    RETURNING j.*
), archived AS (
    INSERT INTO {schema}.jobs_archive ({base_cols}, state, finished_at, last_error, error_kind)
    SELECT {base_cols}, 'cancelled', now(), %(reason)s, 'cancelled' FROM done
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, worker_id, detail)
    SELECT id, 'cancelled', attempts, worker_id, %(reason)s FROM done
)
SELECT id, state::text AS was FROM done;

-- name: clear_pending
-- Every pending job (of one queue, or all) to the archive as cancelled: recoverable by retry.
WITH done AS (
    DELETE FROM {schema}.jobs j
    WHERE j.state = 'pending' AND (%(queue)s::text IS NULL OR j.queue = %(queue)s)
    RETURNING j.*
), archived AS (
    INSERT INTO {schema}.jobs_archive ({base_cols}, state, finished_at, last_error, error_kind)
    SELECT {base_cols}, 'cancelled', now(), 'cleared by an administrator', 'cleared'
    FROM done
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, detail)
    SELECT id, 'cancelled', attempts, 'cleared by an administrator' FROM done
)
SELECT count(*) AS cleared FROM done;

-- name: retry_archived
-- Dead or cancelled jobs back to pending with fresh attempts, keeping their ids. A job whose
-- dedup key is held by a pending job (or by an earlier one in this batch) loses its key rather
-- than its place.
WITH picked AS (
    SELECT a.id FROM {schema}.jobs_archive a
    WHERE a.state IN ('dead', 'cancelled')
      AND (%(ids)s::bigint[] IS NULL OR a.id = ANY(%(ids)s))
      AND (%(task)s::text IS NULL OR a.task = %(task)s)
      AND (%(queue)s::text IS NULL OR a.queue = %(queue)s)
      AND (%(error)s::text IS NULL OR a.last_error ILIKE '%%' || %(error)s || '%%')
      AND (%(state)s::text IS NULL OR a.state::text = %(state)s)
    ORDER BY a.id
    LIMIT %(limit)s
    FOR UPDATE
), back AS (
    DELETE FROM {schema}.jobs_archive a USING picked p WHERE a.id = p.id
    RETURNING a.*
), ranked AS (
    SELECT b.*, row_number() OVER (PARTITION BY b.dedup_key ORDER BY b.id) AS rn FROM back b
), inserted AS (
    INSERT INTO {schema}.jobs (id, task, args, queue, priority, state, attempts, max_attempts,
                               run_at, lock_key, dedup_key, timeout_s, last_error, error_kind,
                               enqueued_at)
    SELECT id, task, args, queue, priority, 'pending', 0, max_attempts, now(), lock_key,
           CASE WHEN dedup_key IS NOT NULL AND (rn > 1 OR EXISTS (
                    SELECT 1 FROM {schema}.jobs p
                    WHERE p.dedup_key = ranked.dedup_key AND p.state = 'pending'))
                THEN NULL ELSE dedup_key END,
           timeout_s, last_error, error_kind, enqueued_at
    FROM ranked
    RETURNING id, queue
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt, detail)
    SELECT id, 'retried', 0, 'retried by an administrator' FROM inserted
), notified AS (
    SELECT pg_notify({channel}, queue) FROM (SELECT DISTINCT queue FROM inserted) q
)
SELECT id FROM inserted, (SELECT count(*) FROM notified) n ORDER BY id;

-- name: pause
UPDATE {schema}.queues SET paused = %(paused)s,
       paused_at = CASE WHEN %(paused)s THEN now() END
WHERE name = %(name)s
RETURNING name, paused;

-- name: notify_queue
SELECT pg_notify({channel}, %(queue)s);

-- name: register_queues
INSERT INTO {schema}.queues (name) SELECT unnest(%(names)s::text[]) ON CONFLICT DO NOTHING;

-- name: list_queues
SELECT name, paused, paused_at FROM {schema}.queues ORDER BY name;

-- name: register_worker
INSERT INTO {schema}.workers (name, host, pid, queues, concurrency, version)
VALUES (%(name)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s, %(version)s)
RETURNING id;

-- name: stop_worker
UPDATE {schema}.workers SET state = 'stopped', stopped_at = now(), heartbeat_at = now()
WHERE id = %(worker)s;

-- name: periodic_tick
-- The first worker to record a (task, tick) pair enqueues its job; the others see the row.
INSERT INTO {schema}.periodic_ticks (task, tick, job_id) VALUES (%(task)s, %(tick)s, %(job_id)s)
ON CONFLICT DO NOTHING
RETURNING job_id;

-- name: counts
-- Jobs by queue and state: the hot table exactly, the archive within a time window.
SELECT queue, state::text AS state, count(*) AS n FROM {schema}.jobs GROUP BY 1, 2
UNION ALL
SELECT queue, state::text, count(*) FROM {schema}.jobs_archive
WHERE finished_at > now() - make_interval(secs => %(window_s)s) GROUP BY 1, 2
ORDER BY 1, 2;

-- name: depth
-- A metrics scrape, in one round trip: the jobs table by queue and state (with the wait of the
-- oldest due job), dead jobs by queue (the archive's state index finds them), the registered
-- queues (so an idle queue shows zeros) and the workers alive.
SELECT 'jobs' AS kind, queue, state::text AS state, count(*) AS n,
       max(extract(epoch FROM now() - run_at))
           FILTER (WHERE state = 'pending' AND run_at <= now()) AS oldest_due_s
FROM {schema}.jobs GROUP BY queue, state
UNION ALL
SELECT 'jobs', queue, 'dead', count(*), NULL FROM {schema}.jobs_archive
WHERE state = 'dead' GROUP BY queue
UNION ALL
SELECT 'queue', name, NULL, 0, NULL FROM {schema}.queues
UNION ALL
SELECT 'workers', NULL, NULL, count(*), NULL FROM {schema}.workers
WHERE state <> 'stopped' AND heartbeat_at > now() - make_interval(secs => %(dead_after_s)s);

-- name: queue_overview
SELECT
    (SELECT count(*) FROM {schema}.jobs WHERE state = 'pending') AS pending,
    (SELECT count(*) FROM {schema}.jobs WHERE state = 'pending' AND run_at <= now()) AS due,
    (SELECT count(*) FROM {schema}.jobs WHERE state = 'running') AS running,
    (SELECT count(*) FROM {schema}.jobs WHERE state = 'running' AND lease_expires_at < now())
        AS stuck,
    (SELECT count(*) FROM {schema}.jobs_archive WHERE state = 'dead') AS dead,
    (SELECT count(*) FROM {schema}.jobs_archive
       WHERE state = 'succeeded' AND finished_at > now() - interval '1 minute')
        AS succeeded_last_minute,
    (SELECT count(*) FROM {schema}.jobs_archive
       WHERE state = 'succeeded' AND finished_at > now() - interval '1 hour')
        AS succeeded_last_hour,
    (SELECT count(*) FROM {schema}.jobs_archive
       WHERE state = 'dead' AND finished_at > now() - interval '1 hour') AS dead_last_hour,
    (SELECT extract(epoch FROM now() - min(run_at)) FROM {schema}.jobs
       WHERE state = 'pending' AND run_at <= now()) AS oldest_due_age_s,
    (SELECT count(*) FROM {schema}.workers
       WHERE state <> 'stopped'
         AND heartbeat_at > now() - make_interval(secs => %(dead_after_s)s)) AS workers_alive;

-- name: workers
SELECT id, name, host, pid, queues, concurrency, version, started_at, heartbeat_at, processed,
       failed,
       CASE WHEN state = 'stopped' THEN 'stopped'
            WHEN heartbeat_at < now() - make_interval(secs => %(dead_after_s)s) THEN 'dead'
            ELSE state END AS state,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s,
       (SELECT count(*) FROM {schema}.jobs j WHERE j.worker_id = w.id AND j.state = 'running')
           AS running
FROM {schema}.workers w
WHERE state <> 'stopped' OR stopped_at > now() - interval '1 hour'
ORDER BY id;

-- name: recent
SELECT {cols}, state::text AS state, finished_at, outcome, result FROM {schema}.jobs_archive
ORDER BY finished_at DESC, id DESC LIMIT %(limit)s;

-- name: active
SELECT {cols}, state::text AS state, NULL::timestamptz AS finished_at, NULL::text AS outcome,
       NULL::jsonb AS result
FROM {schema}.jobs ORDER BY priority DESC, run_at, id LIMIT %(limit)s;

-- name: failed
-- Dead jobs, and pending jobs that have failed at least once (waiting for a retry).
SELECT {cols}, state::text AS state, finished_at FROM (
    SELECT {cols}, state, finished_at FROM {schema}.jobs_archive WHERE state = 'dead'
    UNION ALL
    SELECT {cols}, state, NULL FROM {schema}.jobs WHERE last_error IS NOT NULL
) f ORDER BY coalesce(finished_at, run_at) DESC, id DESC LIMIT %(limit)s;

-- name: list_jobs
-- Jobs of any state, newest first, filtered by state ('failed': dead, or pending after a failed
-- attempt), queue and task. Each table is cut to the limit on its own index first.
SELECT * FROM (
    (SELECT {cols}, state::text AS state, NULL::timestamptz AS finished_at, NULL::text AS outcome
     FROM {schema}.jobs
     WHERE (%(state)s::text IS NULL OR state::text = %(state)s
            OR (%(state)s = 'failed' AND last_error IS NOT NULL AND state = 'pending'))
       AND (%(queue)s::text IS NULL OR queue = %(queue)s)
       AND (%(task)s::text IS NULL OR task = %(task)s)
     ORDER BY id DESC LIMIT %(limit)s)
    UNION ALL
    (SELECT {cols}, state::text, finished_at, outcome FROM {schema}.jobs_archive
     WHERE (%(state)s::text IS NULL OR state::text = %(state)s
            OR (%(state)s = 'failed' AND state = 'dead'))
       AND (%(queue)s::text IS NULL OR queue = %(queue)s)
       AND (%(task)s::text IS NULL OR task = %(task)s)
     ORDER BY finished_at DESC LIMIT %(limit)s)
) j
ORDER BY coalesce(finished_at, enqueued_at) DESC, id DESC LIMIT %(limit)s;

-- name: stuck
SELECT {cols}, state::text AS state, extract(epoch FROM now() - lease_expires_at) AS overdue_s
FROM {schema}.jobs
WHERE state = 'running' AND lease_expires_at < now() - make_interval(secs => %(grace_s)s)
ORDER BY lease_expires_at;

-- name: get_job
SELECT {cols}, state::text AS state, NULL::timestamptz AS finished_at, NULL::text AS outcome,
       NULL::jsonb AS result FROM {schema}.jobs WHERE id = %(id)s
UNION ALL
SELECT {cols}, state::text, finished_at, outcome, result FROM {schema}.jobs_archive
WHERE id = %(id)s;

-- name: job_events
SELECT job_id, at, event, attempt, worker_id, detail FROM {schema}.job_events
WHERE job_id = %(id)s ORDER BY at, id;

-- name: cleanup
WITH old_archive AS (
    DELETE FROM {schema}.jobs_archive
    WHERE (state IN ('succeeded', 'cancelled')
           AND finished_at < now() - make_interval(secs => %(archive_s)s))
       OR (state = 'dead' AND finished_at < now() - make_interval(secs => %(dead_s)s))
    RETURNING 1
), old_events AS (
    DELETE FROM {schema}.job_events WHERE at < now() - make_interval(secs => %(events_s)s)
    RETURNING 1
), old_workers AS (
    DELETE FROM {schema}.workers
    WHERE heartbeat_at < now() - interval '1 day'
      AND NOT EXISTS (SELECT 1 FROM {schema}.jobs j WHERE j.worker_id = workers.id)
    RETURNING 1
), old_ticks AS (
    DELETE FROM {schema}.periodic_ticks WHERE tick < now() - interval '7 days' RETURNING 1
)
SELECT (SELECT count(*) FROM old_archive) AS jobs, (SELECT count(*) FROM old_events) AS events,
       (SELECT count(*) FROM old_workers) AS workers, (SELECT count(*) FROM old_ticks) AS ticks;

-- name: settings_all
SELECT name, value, encrypted, updated_at FROM {schema}.settings ORDER BY name;

-- name: settings_set
INSERT INTO {schema}.settings (name, value, encrypted) VALUES (%(name)s, %(value)s, %(encrypted)s)
ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, encrypted = EXCLUDED.encrypted,
                                 updated_at = now();

-- name: settings_unset
DELETE FROM {schema}.settings WHERE name = %(name)s RETURNING name;

-- name: task_stats
-- Per task over a time window: outcomes and run durations of finished jobs.
SELECT task, queue,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'dead') AS dead,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE outcome = 'superseded') AS superseded,
       round(avg(extract(epoch FROM finished_at - started_at))::numeric, 4) AS avg_run_s,
       round((percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM finished_at - started_at)))::numeric, 4) AS p95_run_s,
       round(avg(extract(epoch FROM started_at - run_at))::numeric, 4) AS avg_wait_s
FROM {schema}.jobs_archive
WHERE finished_at > now() - make_interval(secs => %(window_s)s)
GROUP BY task, queue ORDER BY task, queue;

-- name: throughput
-- Jobs finished per minute over the window, newest first.
SELECT date_trunc('minute', finished_at) AS minute, state::text AS state, count(*) AS n
FROM {schema}.jobs_archive
WHERE finished_at > now() - make_interval(secs => %(window_s)s)
GROUP BY 1, 2 ORDER BY 1 DESC, 2;

-- name: work_left
-- Pending or running jobs a worker serving these queues could still get (paused queues aside).
SELECT count(*) AS n FROM {schema}.jobs j
WHERE (%(queues)s::text[] IS NULL OR j.queue = ANY(%(queues)s::text[]))
  AND j.queue NOT IN (SELECT name FROM {schema}.queues WHERE paused);

-- name: reserve_ids
-- Ids for a bulk COPY, taken from the jobs table's own sequence (looked up once: the scalar
-- subquery runs one time, where a bare pg_get_serial_sequence() would run for every row).
SELECT array_agg(nextval((SELECT pg_get_serial_sequence('{schema}.jobs', 'id'))::regclass))
       AS ids
FROM generate_series(1, %(n)s);

-- name: copy_jobs
COPY {schema}.jobs (id, task, args, queue, priority, run_at, max_attempts, lock_key,
                    timeout_s) FROM STDIN;

-- name: log_enqueued
INSERT INTO {schema}.job_events (job_id, event, attempt)
SELECT unnest(%(ids)s::bigint[]), 'enqueued', 0;
