-- Search results: the documents a search ranked, with a snippet of their body that shows
-- the query's terms (keyword and hybrid searches). {schema} is the configured schema.

-- name: hits
SELECT d.id, d.key, d.title, d.metadata, d.status,
       CASE WHEN %(snip)s THEN ts_headline(d.language, left(d.body, 20000), %(query)s::tsquery,
                                           'MaxFragments=1, MaxWords=30, MinWords=10') END
           AS snippet
FROM {schema}.documents d WHERE d.id = ANY(%(ids)s::bigint[]);

-- name: keys
SELECT d.id, d.key FROM {schema}.documents d WHERE d.id = ANY(%(ids)s::bigint[]);

-- name: existing_keys
SELECT count(*) AS n FROM {schema}.documents d
WHERE d.collection_id = %(collection)s AND d.key = ANY(%(keys)s::text[]);
