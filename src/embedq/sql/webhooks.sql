-- Named queries of the webhooks. Placeholders: {schema} (identifier); values are parameters.

-- name: upsert
-- One webhook per collection: a second `set` changes its URL, events and state, and keeps
-- its secret unless asked to rotate it. `created` tells a new webhook from a changed one.
INSERT INTO {schema}.webhooks AS w (collection_id, url, secret_encrypted, events, enabled)
VALUES (%(collection)s, %(url)s, %(secret)s, %(events)s, %(enabled)s)
ON CONFLICT (collection_id) DO UPDATE SET
    url = EXCLUDED.url,
    events = EXCLUDED.events,
    enabled = EXCLUDED.enabled,
    secret_encrypted = CASE WHEN %(rotate)s THEN EXCLUDED.secret_encrypted
                            ELSE w.secret_encrypted END,
    updated_at = now()
RETURNING w.id, %(name)s::text AS collection, w.url, w.events, w.enabled, w.created_at,
          w.updated_at, (w.xmax = 0) AS created;

-- name: list
-- Every webhook (or one collection's), never its secret.
SELECT w.id, c.name AS collection, w.url, w.events, w.enabled, w.created_at, w.updated_at
FROM {schema}.webhooks w JOIN {schema}.collections c ON c.id = w.collection_id
WHERE %(name)s::text IS NULL OR c.name = %(name)s
ORDER BY c.name;

-- name: remove
DELETE FROM {schema}.webhooks w USING {schema}.collections c
WHERE c.id = w.collection_id AND c.name = %(name)s
RETURNING w.id;

-- name: for_delivery
-- What a delivery needs, read when it runs: a webhook changed since the event was recorded
-- is called at its new URL with its current secret.
SELECT w.id, c.name AS collection, w.url, w.secret_encrypted, w.enabled
FROM {schema}.webhooks w JOIN {schema}.collections c ON c.id = w.collection_id
WHERE w.id = %(id)s;

-- name: any_wanting
-- Whether any enabled webhook wants an event: a probe far cheaper than enqueue_events, so a
-- database without webhooks pays one index-less look at an empty table per batch.
SELECT EXISTS (
    SELECT 1 FROM {schema}.webhooks WHERE enabled AND %(event)s::text = ANY(events)
) AS wanted;

-- name: enqueue_events
-- Inside the transaction that records the event (the pipeline's swap, or marking documents
-- failed), and before that transaction sets the documents' status: a document whose status
-- is the event's already (embedded again by a model switch's backfill, failed twice) gets no
-- second call. A NULL version means the document's current one. Run only when any_wanting
-- says so; the delivery id stays the same over all attempts of one delivery.
WITH input AS (
    SELECT * FROM unnest(%(documents)s::bigint[], %(versions)s::int[], %(errors)s::text[])
        AS t(document_id, version, error)
), inserted AS (
    INSERT INTO {schema}.jobs (task, args, queue, max_attempts)
    SELECT %(task)s,
           jsonb_build_object('webhook', w.id, 'body', jsonb_strip_nulls(jsonb_build_object(
               'event', 'document.' || %(event)s::text,
               'collection', c.name,
               'key', d.key,
               'version', d.version,
               'status', %(event)s::text,
               'error', t.error,
               'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'delivery_id', gen_random_uuid()::text))),
           %(queue)s, %(max_attempts)s
    FROM input t
    JOIN {schema}.documents d
      ON d.id = t.document_id AND d.version = coalesce(t.version, d.version)
    JOIN {schema}.webhooks w ON w.collection_id = d.collection_id
    JOIN {schema}.collections c ON c.id = d.collection_id
    WHERE w.enabled AND %(event)s::text = ANY(w.events) AND d.status <> %(event)s::text
    ORDER BY t.document_id
    RETURNING id
), events AS (
    INSERT INTO {schema}.job_events (job_id, event, attempt)
    SELECT id, 'enqueued', 0 FROM inserted WHERE %(log_all)s
)
SELECT count(*) AS n FROM inserted;
