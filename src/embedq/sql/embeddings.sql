-- The OpenAI-compatible embeddings API (api/embeddings.py). {schema} is the configured schema.

-- name: served_spaces
-- The live spaces of every collection (active, and building during a model switch): the
-- models the service serves. Spaces only, no document counts: it runs on every request.
SELECT s.id, s.collection_id, s.state, s.config, s.dimensions, s.created_at,
       c.name AS collection
FROM {schema}.spaces s JOIN {schema}.collections c ON c.id = s.collection_id
WHERE s.state IN ('active', 'building')
ORDER BY c.name, s.state;
