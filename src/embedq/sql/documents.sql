-- Collections, documents, chunks and the embedding cache. Values are parameters; {schema}
-- is the configured schema.

-- name: create_collection
INSERT INTO {schema}.collections (name, distance, chunk_size, chunk_overlap, title_prefix,
                                  language, bm25_k1, bm25_b, fusion, fusion_alpha, rrf_k)
VALUES (%(name)s, %(distance)s, %(chunk_size)s, %(chunk_overlap)s, %(title_prefix)s,
        %(language)s::regconfig, %(bm25_k1)s, %(bm25_b)s, %(fusion)s, %(fusion_alpha)s,
        %(rrf_k)s)
RETURNING id;

-- name: set_search_options
-- A collection's search options. New k1 or b mark its statistics changed (a row of zeros in
-- its totals), so compaction re-sorts its postings under them.
WITH updated AS (
    UPDATE {schema}.collections c SET
        bm25_k1 = coalesce(%(bm25_k1)s, c.bm25_k1),
        bm25_b = coalesce(%(bm25_b)s, c.bm25_b),
        fusion = coalesce(%(fusion)s, c.fusion),
        fusion_alpha = coalesce(%(fusion_alpha)s, c.fusion_alpha),
        rrf_k = coalesce(%(rrf_k)s, c.rrf_k)
    FROM {schema}.collections old
    WHERE c.id = %(collection)s AND old.id = c.id
    RETURNING c.id, (c.bm25_k1, c.bm25_b) IS DISTINCT FROM (old.bm25_k1, old.bm25_b) AS resort
)
INSERT INTO {schema}.bm25_totals (collection_id, documents, tokens)
SELECT u.id, 0, 0 FROM updated u WHERE u.resort;

-- name: create_space
INSERT INTO {schema}.spaces (collection_id, state, provider, model, model_key, dimensions,
                             config, activated_at)
VALUES (%(collection)s, %(state)s, %(provider)s, %(model)s, %(model_key)s, %(dimensions)s,
        %(config)s, CASE WHEN %(state)s = 'active' THEN now() END)
RETURNING id;

-- name: collections
-- Every collection (or one by name) with its live spaces and (when asked: it reads every
-- document of the collection) its document counts.
SELECT c.id, c.name, c.distance, c.chunk_size, c.chunk_overlap, c.title_prefix,
       c.language::text AS language, c.created_at, c.bm25_k1, c.bm25_b, c.fusion,
       c.fusion_alpha, c.rrf_k,
       (SELECT to_jsonb(s) FROM {schema}.spaces s
        WHERE s.collection_id = c.id AND s.state = 'active') AS active,
       (SELECT to_jsonb(s) FROM {schema}.spaces s
        WHERE s.collection_id = c.id AND s.state = 'building') AS building,
       CASE WHEN %(counts)s THEN
       (SELECT jsonb_build_object(
            'documents', count(*),
            'pending', count(*) FILTER (WHERE d.status = 'pending'),
            'embedded', count(*) FILTER (WHERE d.status = 'embedded'),
            'failed', count(*) FILTER (WHERE d.status = 'failed'))
        FROM {schema}.documents d WHERE d.collection_id = c.id) END AS counts
FROM {schema}.collections c
WHERE %(name)s::text IS NULL OR c.name = %(name)s
ORDER BY c.name;

-- name: space_progress
-- How many documents of a collection a space holds at their current version.
SELECT count(*) AS documents,
       count(*) FILTER (WHERE ds.version = d.version OR d.status = 'failed') AS done
FROM {schema}.documents d
LEFT JOIN {schema}.document_spaces ds ON ds.document_id = d.id AND ds.space_id = %(space)s
WHERE d.collection_id = %(collection)s;

-- name: drop_collection
DELETE FROM {schema}.collections WHERE name = %(name)s RETURNING id;

-- name: cancel_collection_jobs
-- Pending embed jobs of a dropped collection would only end superseded: withdraw them.
DELETE FROM {schema}.jobs
WHERE task = 'embedq.embed' AND state = 'pending'
  AND (args ->> 'collection')::int = %(collection)s;

-- name: upsert_documents
-- Insert or update many documents of one collection. New content bumps the version and
-- resets the status; the same content with other metadata only updates the metadata; the
-- same content and metadata changes nothing (the row is not returned).
INSERT INTO {schema}.documents AS d (collection_id, key, title, body, metadata, content_hash,
                                     language)
SELECT %(collection)s, t.key, t.title, t.body, t.metadata, t.content_hash,
       %(language)s::regconfig
FROM unnest(%(keys)s::text[], %(titles)s::text[], %(bodies)s::text[], %(metadata)s::jsonb[],
            %(hashes)s::bytea[]) AS t(key, title, body, metadata, content_hash)
ORDER BY t.key COLLATE "C"  -- rows are locked in key order: concurrent writers cannot deadlock
ON CONFLICT (collection_id, key) DO UPDATE SET
    title = EXCLUDED.title,
    body = EXCLUDED.body,
    metadata = EXCLUDED.metadata,
    content_hash = EXCLUDED.content_hash,
    version = CASE WHEN d.content_hash = EXCLUDED.content_hash THEN d.version
                   ELSE d.version + 1 END,
    last_change = CASE WHEN d.content_hash = EXCLUDED.content_hash THEN 'metadata'
                       ELSE 'updated' END,
    status = CASE WHEN d.content_hash = EXCLUDED.content_hash THEN d.status ELSE 'pending' END,
    error = CASE WHEN d.content_hash = EXCLUDED.content_hash THEN d.error END,
    updated_at = now()
WHERE d.content_hash <> EXCLUDED.content_hash OR d.metadata <> EXCLUDED.metadata
   OR d.title IS DISTINCT FROM EXCLUDED.title
RETURNING d.id, d.key, d.version, d.last_change;

-- name: existing_versions
SELECT id, key, version FROM {schema}.documents
WHERE collection_id = %(collection)s AND key = ANY(%(keys)s::text[]);

-- name: delete_documents
DELETE FROM {schema}.documents
WHERE collection_id = %(collection)s AND key = ANY(%(keys)s::text[])
RETURNING id, key;

-- name: get_document
SELECT d.id, d.key, d.title, d.body, d.metadata, d.version, d.status, d.error,
       d.created_at, d.updated_at, d.embedded_at,
       (SELECT count(*) FROM {schema}.chunks ch
        JOIN {schema}.spaces s ON s.id = ch.space_id AND s.state = 'active'
        WHERE ch.document_id = d.id) AS chunks
FROM {schema}.documents d
WHERE d.collection_id = %(collection)s AND d.key = %(key)s;

-- name: list_documents
SELECT d.id, d.key, d.title, d.version, d.status, d.error, d.updated_at
FROM {schema}.documents d
WHERE d.collection_id = %(collection)s
  AND (%(status)s::text IS NULL OR d.status = %(status)s)
ORDER BY d.key
LIMIT %(limit)s;

-- name: load_for_embed
-- The documents of a batch of embed jobs, with the version each live space holds.
SELECT d.id, d.collection_id, d.version, d.title, d.body,
       coalesce(jsonb_object_agg(ds.space_id, ds.version)
                FILTER (WHERE ds.space_id IS NOT NULL), '{{}}'::jsonb) AS held
FROM {schema}.documents d
LEFT JOIN {schema}.document_spaces ds ON ds.document_id = d.id
WHERE d.id = ANY(%(ids)s::bigint[])
GROUP BY d.id;

-- name: live_spaces
SELECT s.id, s.collection_id, s.state, s.provider, s.model, s.model_key, s.dimensions,
       s.config, c.chunk_size, c.chunk_overlap, c.title_prefix, c.distance, c.name
FROM {schema}.spaces s JOIN {schema}.collections c ON c.id = s.collection_id
WHERE s.collection_id = ANY(%(collections)s::int[]) AND s.state IN ('active', 'building');

-- name: cache_lookup
SELECT hash, embedding FROM {schema}.embedding_cache
WHERE model_key = %(model_key)s AND hash = ANY(%(hashes)s::bytea[]);

-- name: lock_own_jobs
-- Inside the swap transaction: the jobs this worker still holds, locked so that no reclaim
-- can move them until the transaction ends. The commit need not wait for the WAL flush: the
-- jobs finish in this same transaction, so a commit lost in a server crash loses the chunks
-- *and* the completion together, and the jobs are reclaimed and embedded again.
SELECT j.id FROM {schema}.jobs j
CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS cfg
WHERE j.id = ANY(%(ids)s::bigint[]) AND j.state = 'running' AND j.worker_id = %(worker)s
ORDER BY j.id
FOR UPDATE OF j;

-- name: lock_documents
-- In (collection, key) order, the order writes lock them in (upsert_documents), so a swap
-- and a write over overlapping documents cannot deadlock.
SELECT id, version FROM {schema}.documents
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY collection_id, key COLLATE "C"
FOR UPDATE;

-- name: delete_chunks
DELETE FROM {schema}.chunks c
USING unnest(%(documents)s::bigint[], %(spaces)s::int[]) AS t(document_id, space_id)
WHERE c.document_id = t.document_id AND c.space_id = t.space_id;

-- name: copy_chunks
COPY {schema}.chunks (document_id, space_id, version, seq, tokens, content, embedding)
FROM STDIN (FORMAT BINARY);

-- name: cache_stage
CREATE TEMP TABLE IF NOT EXISTS embedq_cache_in (hash bytea, embedding vector)
ON COMMIT DELETE ROWS;

-- name: copy_cache
COPY embedq_cache_in (hash, embedding) FROM STDIN (FORMAT BINARY);

-- name: cache_store
-- Staged by COPY, then inserted: two batches embedding the same new text at once both find
-- it missing, and the second must not fail.
INSERT INTO {schema}.embedding_cache (model_key, hash, embedding)
SELECT DISTINCT ON (hash) %(model_key)s, hash, embedding FROM embedq_cache_in
ON CONFLICT DO NOTHING;

-- name: cache_unstage
TRUNCATE embedq_cache_in;

-- name: mark_done
-- Which version each space now holds, and the documents whose swap is complete.
WITH held AS (
    INSERT INTO {schema}.document_spaces (document_id, space_id, version)
    SELECT * FROM unnest(%(documents)s::bigint[], %(spaces)s::int[], %(versions)s::int[])
    ON CONFLICT (document_id, space_id) DO UPDATE
        SET version = EXCLUDED.version, embedded_at = now()
)
UPDATE {schema}.documents
SET status = 'embedded', error = NULL, embedded_at = now()
WHERE id = ANY(%(done)s::bigint[]);

-- name: cache_store_small
-- Few new vectors: one statement instead of staging them with COPY.
INSERT INTO {schema}.embedding_cache (model_key, hash, embedding)
SELECT %(model_key)s, t.hash, t.embedding
FROM unnest(%(hashes)s::bytea[], %(embeddings)s::vector[]) AS t(hash, embedding)
ON CONFLICT DO NOTHING;

-- name: mark_failed
UPDATE {schema}.documents d
SET status = 'failed', error = t.error
FROM unnest(%(ids)s::bigint[], %(versions)s::int[], %(errors)s::text[]) AS t(id, version, error)
WHERE d.id = t.id AND d.version = t.version;

-- name: building_done
-- Whether a building space holds every document of its collection at its current version.
-- A document whose current version failed for good does not hold the switch up: it has no
-- chunks in either model until it is rewritten.
SELECT NOT EXISTS (
    SELECT 1 FROM {schema}.documents d
    LEFT JOIN {schema}.document_spaces ds ON ds.document_id = d.id AND ds.space_id = %(space)s
    WHERE d.collection_id = %(collection)s AND ds.version IS DISTINCT FROM d.version
      AND d.status <> 'failed'
) AS done;

-- name: space_state
SELECT state FROM {schema}.spaces WHERE id = %(space)s;

-- name: retire_active
-- The model switch, step 1 of 2 (one transaction, the collection row locked): the space
-- searched so far is retired ...
UPDATE {schema}.spaces SET state = 'retired'
WHERE collection_id = %(collection)s AND state = 'active'
RETURNING id;

-- name: promote_space
-- ... step 2: the building space becomes the one searched. Two statements, in this order,
-- because the one-active-space index is checked row by row.
UPDATE {schema}.spaces SET state = 'active', activated_at = now()
WHERE id = %(space)s AND state = 'building'
RETURNING id;

-- name: lock_collection
SELECT id FROM {schema}.collections WHERE id = %(collection)s FOR UPDATE;

-- name: retired_spaces
SELECT * FROM {schema}.spaces WHERE collection_id = %(collection)s AND state = 'retired';

-- name: delete_space_chunks
-- A retired space's chunks go in slices, so no statement holds its locks for long.
WITH gone AS (
    DELETE FROM {schema}.chunks
    WHERE id IN (SELECT id FROM {schema}.chunks WHERE space_id = %(space)s LIMIT 10000)
    RETURNING 1
)
SELECT count(*) AS n FROM gone;

-- name: forget_space
DELETE FROM {schema}.document_spaces WHERE space_id = %(space)s;

-- name: stale_documents
-- Documents a space lacks at their current version (for a model switch's backfill).
SELECT d.id, d.version FROM {schema}.documents d
LEFT JOIN {schema}.document_spaces ds ON ds.document_id = d.id AND ds.space_id = %(space)s
WHERE d.collection_id = %(collection)s AND ds.version IS DISTINCT FROM d.version
  AND d.id > %(after)s
ORDER BY d.id
LIMIT %(limit)s;

-- name: document_states
-- Where the embedding of some documents stands (a write's `?wait=true` polls this).
SELECT d.key, d.version, d.status, d.error FROM {schema}.documents d
WHERE d.collection_id = %(collection)s AND d.key = ANY(%(keys)s::text[]);
