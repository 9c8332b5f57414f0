-- BM25 keyword search: the statistics and postings kept by migration 0006's triggers, read in
-- the searching transaction's snapshot; compaction of the postings. {schema} is the schema.

-- name: analyze_query
-- A query text through the collection's text-search configuration: its terms (lexemes) and
-- how often each occurs.
SELECT coalesce(array_agg(u.lexeme ORDER BY u.lexeme), '{{}}') AS lexemes,
       coalesce(array_agg(coalesce(cardinality(u.positions), 1) ORDER BY u.lexeme), '{{}}')
           AS counts
FROM unnest(to_tsvector(%(language)s::regconfig, %(text)s)) u;

-- name: meta
-- The collection's BM25 parameters and totals, and every stored row of the query's terms
-- without its postings. NULLs are spelled -1 so that arrays load as numbers.
SELECT c.bm25_k1, c.bm25_b,
       coalesce((SELECT sum(t.documents) FROM {schema}.bm25_totals t
                 WHERE t.collection_id = c.id), 0) AS documents,
       coalesce((SELECT sum(t.tokens) FROM {schema}.bm25_totals t
                 WHERE t.collection_id = c.id), 0) AS tokens,
       coalesce(m.lexemes, '{{}}') AS lexemes,
       coalesce(m.segments, '{{}}') AS segments,
       coalesce(m.blocks, '{{}}') AS blocks,
       coalesce(m.postings, '{{}}') AS postings,
       coalesce(m.sort_avgdl, '{{}}') AS sort_avgdl,
       coalesce(m.sort_k1, '{{}}') AS sort_k1,
       coalesce(m.sort_b, '{{}}') AS sort_b,
       coalesce(m.head_weight, '{{}}') AS head_weight
FROM {schema}.collections c
CROSS JOIN LATERAL (
    SELECT array_agg(p.lexeme) AS lexemes, array_agg(p.segment) AS segments,
           array_agg(p.block) AS blocks, array_agg(p.postings) AS postings,
           array_agg(coalesce(p.sort_avgdl, -1)) AS sort_avgdl,
           array_agg(coalesce(p.sort_k1, -1)) AS sort_k1,
           array_agg(coalesce(p.sort_b, -1)) AS sort_b,
           array_agg(coalesce(p.head_weight, -1)) AS head_weight
    FROM {schema}.bm25_postings p
    WHERE p.collection_id = c.id AND p.lexeme = ANY(%(lexemes)s::text[])
) m
WHERE c.id = %(collection)s;

-- name: blocks
-- Stored rows by (lexeme, segment, block), with the versions of their postings where asked.
SELECT k.i, p.postings, p.documents,
       CASE WHEN k.versions THEN p.versions ELSE '{{}}' END AS versions,
       coalesce(p.tfs, '{{}}') AS tfs, coalesce(p.lengths, '{{}}') AS lengths
FROM unnest(%(lexemes)s::text[], %(segments)s::bigint[], %(blocks)s::integer[],
            %(versions)s::boolean[]) WITH ORDINALITY AS k(lexeme, segment, block, versions, i)
JOIN {schema}.bm25_postings p ON p.collection_id = %(collection)s AND p.lexeme = k.lexeme
     AND p.segment = k.segment AND p.block = k.block;

-- name: term_counts
-- How often each of some terms occurs in some documents, from their tsvector (the document's
-- current version, which is the version of its live postings in this snapshot).
SELECT d.id, u.lexeme, coalesce(cardinality(u.positions), 1) AS tf
FROM {schema}.documents d
CROSS JOIN LATERAL unnest(ts_filter(setweight(d.tsv, 'D', %(lexemes)s::text[]), '{{d}}')) u
WHERE d.id = ANY(%(ids)s::bigint[]);

-- name: matching
-- Which of some documents match a tsquery (a quoted phrase of the query).
SELECT d.id FROM {schema}.documents d
WHERE d.id = ANY(%(ids)s::bigint[]) AND d.tsv @@ %(query)s::tsquery;

-- name: phrase_query
SELECT phraseto_tsquery(%(language)s::regconfig, %(text)s)::text AS query,
       coalesce(ARRAY(SELECT DISTINCT unnest(tsvector_to_array(
           to_tsvector(%(language)s::regconfig, %(text)s)))), '{{}}') AS lexemes;

-- name: dirty
-- Collections whose statistics changed since their last compaction (or whose k1 or b did:
-- set_search_options adds a row of zeros).
SELECT t.collection_id AS id FROM {schema}.bm25_totals t
GROUP BY t.collection_id HAVING count(*) > 1
ORDER BY 1;

-- name: segments
-- The segments of a collection's terms that have one to merge: unsorted (recent writes and
-- removals) or sorted under other parameters than the collection's.
WITH c AS (
    SELECT id, bm25_k1, bm25_b FROM {schema}.collections WHERE id = %(collection)s
), dirty AS (
    SELECT DISTINCT p.lexeme FROM {schema}.bm25_postings p, c
    WHERE p.collection_id = c.id
      AND (p.sort_k1 IS NULL OR p.sort_k1 <> c.bm25_k1 OR p.sort_b <> c.bm25_b)
)
SELECT p.lexeme, p.segment,
       bool_and(p.sort_k1 IS NOT NULL AND p.sort_k1 = c.bm25_k1 AND p.sort_b = c.bm25_b)
           AS sorted,
       sum(abs(p.postings)) AS size
FROM {schema}.bm25_postings p JOIN dirty USING (lexeme), c
WHERE p.collection_id = c.id
GROUP BY p.lexeme, p.segment
ORDER BY p.lexeme, p.segment;

-- name: merge
SELECT {schema}.bm25_merge(%(collection)s, %(lexemes)s::text[], %(segments)s::bigint[])
    AS written;

-- name: fold_totals
SELECT {schema}.bm25_fold_totals(%(collection)s);

-- name: compaction_lock
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(duty)s) AS mine;

-- name: term_documents
-- Every stored row of one term: its documents, and the versions of the removed ones.
SELECT p.postings, p.documents, p.versions FROM {schema}.bm25_postings p
WHERE p.collection_id = %(collection)s AND p.lexeme = %(lexeme)s;
