-- Named queries of the API tokens. Placeholders: {schema} (identifier); values are parameters.

-- name: create
INSERT INTO {schema}.api_tokens (name, prefix, token_hash, scopes)
VALUES (%(name)s, %(prefix)s, %(hash)s, %(scopes)s)
RETURNING id, name, prefix, scopes, created_at, last_used_at, revoked_at;

-- name: ensure
-- A token of a known value (EMBEDQ_ADMIN_TOKEN): created once, left alone afterwards.
INSERT INTO {schema}.api_tokens (name, prefix, token_hash, scopes)
VALUES (%(name)s, %(prefix)s, %(hash)s, %(scopes)s)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: verify
-- The live token of this hash; last_used_at moves at most once a minute (no write per request).
WITH hit AS (
    SELECT id, name, scopes, last_used_at FROM {schema}.api_tokens
    WHERE token_hash = %(hash)s AND revoked_at IS NULL
), touched AS (
    UPDATE {schema}.api_tokens t SET last_used_at = now()
    FROM hit WHERE t.id = hit.id
      AND (hit.last_used_at IS NULL OR hit.last_used_at < now() - interval '1 minute')
)
SELECT id, name, scopes FROM hit;

-- name: list
SELECT id, name, prefix, scopes, created_at, last_used_at, revoked_at
FROM {schema}.api_tokens
WHERE %(all)s OR revoked_at IS NULL
ORDER BY id;

-- name: revoke
UPDATE {schema}.api_tokens SET revoked_at = now()
WHERE revoked_at IS NULL AND (name = %(name)s OR id::text = %(name)s)
RETURNING id, name;

-- name: live_count
SELECT count(*) AS n FROM {schema}.api_tokens WHERE revoked_at IS NULL;
