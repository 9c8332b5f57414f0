-- Watches of application tables, and backfills. The triggers' own SQL is in the functions of
-- migration 0004_watches.sql (watch_apply, watch_fire, watch_install, watch_backfill...);
-- these queries call them. Values are parameters; {schema} is the configured schema.

-- name: resolve_table
-- The table a user named ('articles', 'public.articles', '"Mixed Case"'), through the
-- connection's search_path; no row when there is none. `inherits`: it is a partition, or
-- has inheritance parents or children.
SELECT c.oid::int8 AS oid, c.relkind::text AS kind,
       format('%%I.%%I', n.nspname, c.relname) AS name,
       c.relispartition OR EXISTS (SELECT 1 FROM pg_inherits i
                                   WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) AS inherits
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(table)s);

-- name: table_columns
-- A table's columns, with their type category ('S': a string type) and whether a unique
-- index (or the primary key) holds exactly that column.
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
       t.typcategory::text AS category,
       EXISTS (SELECT 1 FROM pg_index i
               WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indnkeyatts = 1
                 AND i.indkey[0] = a.attnum AND i.indpred IS NULL AND i.indexprs IS NULL)
           AS is_unique
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %(oid)s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;

-- name: watches
-- Every watch (or the one of a collection), with how many of its triggers are in place.
SELECT w.id, c.name AS collection, w.collection_id,
       coalesce((SELECT format('%%I.%%I', n.nspname, r.relname)
                 FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
                 WHERE r.oid = w.table_oid), w.table_oid::text) AS table_name,
       EXISTS (SELECT 1 FROM pg_class r WHERE r.oid = w.table_oid) AS table_exists,
       w.key_column, w.text_columns, w.title_column, w.metadata_columns, w.triggers,
       (SELECT count(*) FROM pg_trigger t
        WHERE t.tgrelid = w.table_oid AND t.tgname = ANY(w.triggers)) AS installed,
       w.max_attempts, w.max_chars, w.log_events, w.created_at
FROM {schema}.watches w JOIN {schema}.collections c ON c.id = w.collection_id
WHERE %(collection)s::text IS NULL OR c.name = %(collection)s
ORDER BY c.name;

-- name: insert_watch
INSERT INTO {schema}.watches (collection_id, table_oid, key_column, text_columns,
                              title_column, metadata_columns, job_task, job_queue,
                              job_priority, max_attempts, max_chars, log_events)
VALUES (%(collection)s, %(oid)s::oid::regclass, %(key)s, %(text)s, %(title)s, %(metadata)s,
        %(job_task)s, %(job_queue)s, %(job_priority)s, %(max_attempts)s, %(max_chars)s,
        %(log_events)s)
RETURNING id;

-- name: lock_timeout
-- For the rest of the transaction: DDL on a busy application table gives up instead of
-- queueing the application's writes behind it.
SELECT set_config('lock_timeout', %(timeout)s, true);

-- name: install
SELECT {schema}.watch_install(%(watch)s, %(prefix)s) AS triggers;

-- name: uninstall
SELECT {schema}.watch_uninstall(%(watch)s) AS removed;

-- name: delete_watch
DELETE FROM {schema}.watches WHERE id = %(watch)s;

-- name: refresh_watch
-- The job and the settings the triggers copy (attempts, longest text, event log), as they
-- are now.
UPDATE {schema}.watches
SET job_task = %(job_task)s, job_queue = %(job_queue)s, job_priority = %(job_priority)s,
    max_attempts = %(max_attempts)s, max_chars = %(max_chars)s, log_events = %(log_events)s
WHERE id = %(watch)s;

-- name: count_rows
SELECT {schema}.watch_count(%(watch)s) AS n;

-- name: backfill_batch
SELECT * FROM {schema}.watch_backfill(%(watch)s, %(after)s, %(limit)s, %(priority)s,
                                      %(wait_ms)s);

-- name: orphans
SELECT key FROM {schema}.watch_orphans(%(watch)s, %(delete)s) AS key;

-- name: missing_count
SELECT count(*) AS n FROM {schema}.unembedded_documents WHERE collection_id = %(collection)s;

-- name: missing_keys
SELECT key, version, status FROM {schema}.unembedded_documents
WHERE collection_id = %(collection)s
ORDER BY key LIMIT %(limit)s;

-- name: queue_missing
-- One batch of a backfill, in key order after `after`: an embed job for each document with
-- no embedding and no job. A job enqueued meanwhile by a write wins (DO NOTHING), so the
-- version this statement read can never replace a newer one's.
WITH picked AS (
    SELECT id, key, version FROM {schema}.unembedded_documents
    WHERE collection_id = %(collection)s AND key > %(after)s
    ORDER BY key LIMIT %(limit)s
), queued AS (
    INSERT INTO {schema}.jobs (task, args, queue, priority, max_attempts, dedup_key)
    SELECT %(task)s,
           jsonb_build_object('collection', %(collection)s::int, 'document', p.id,
                              'version', p.version, 'backfill', true),
           %(queue)s, %(priority)s, %(max_attempts)s, 'embed:' || p.id
    FROM picked p ORDER BY p.id
    ON CONFLICT (dedup_key) WHERE state = 'pending' AND dedup_key IS NOT NULL DO NOTHING
    RETURNING id
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt)
    SELECT id, 'enqueued', 0 FROM queued WHERE %(log_all)s
)
SELECT (SELECT count(*) FROM picked) AS picked, (SELECT max(key) FROM picked) AS last_key,
       (SELECT count(*) FROM queued) AS queued;

-- name: backfill_jobs
-- Pending backfill jobs (of one collection, or all), a slice at a time.
SELECT id FROM {schema}.jobs
WHERE task = %(task)s AND state = 'pending' AND args @> '{{"backfill": true}}'::jsonb
  AND (%(collection)s::int IS NULL
       OR args @> jsonb_build_object('collection', %(collection)s::int))
ORDER BY id
LIMIT %(limit)s;
