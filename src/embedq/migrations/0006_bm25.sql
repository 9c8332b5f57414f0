-- embedq 0006: BM25 keyword search with exact statistics kept by the writing transaction, and
-- each collection's search options. See docs/search.md for the design.

-- Okapi BM25 as Lucene computes it, with saturation k1 and length normalisation b; hybrid
-- search fuses its two legs by reciprocal rank (rrf, constant rrf_k) or by a convex
-- combination of normalised scores (convex, weight alpha on the semantic leg).
ALTER TABLE {schema}.collections
    ADD COLUMN bm25_k1 double precision NOT NULL DEFAULT 0.9 CHECK (bm25_k1 BETWEEN 0 AND 10),
    ADD COLUMN bm25_b double precision NOT NULL DEFAULT 0.4 CHECK (bm25_b BETWEEN 0 AND 1),
    ADD COLUMN fusion text NOT NULL DEFAULT 'convex' CHECK (fusion IN ('rrf', 'convex')),
    ADD COLUMN fusion_alpha double precision NOT NULL DEFAULT 0.5
        CHECK (fusion_alpha BETWEEN 0 AND 1),
    ADD COLUMN rrf_k integer NOT NULL DEFAULT 60 CHECK (rrf_k BETWEEN 1 AND 10000);

-- Keyword search reads the postings below, not a GIN index of the documents.
DROP INDEX {schema}.documents_tsv_idx;

-- Document count and token total of each collection, as deltas: every writing statement
-- appends one row (never updates one), so concurrent writers never wait for each other;
-- compaction folds the rows of a collection into one.
CREATE TABLE {schema}.bm25_totals (
    collection_id integer NOT NULL,
    documents     bigint NOT NULL,
    tokens        bigint NOT NULL
);

CREATE INDEX bm25_totals_collection_idx ON {schema}.bm25_totals (collection_id);

-- The inverted index. A segment holds postings of one term (lexeme): a writing statement adds
-- an unsorted segment of the documents it wrote (postings > 0) and one of the document
-- versions it removed (postings < 0: `documents` and `versions` only). Compaction
-- (bm25_merge) cancels removed postings against added ones and writes sorted segments:
-- postings in descending order of their BM25 term weight under sort_avgdl/sort_k1/sort_b,
-- cut into blocks whose head_weight (the first posting's weight) bounds the rest. The
-- document frequency of a term is the sum of `postings` over its rows.
CREATE TABLE {schema}.bm25_postings (
    collection_id integer NOT NULL,
    lexeme        text NOT NULL,
    segment       bigint NOT NULL,
    block         integer NOT NULL,
    postings      integer NOT NULL,
    sort_avgdl    double precision,
    sort_k1       double precision,
    sort_b        double precision,
    head_weight   double precision,
    documents     bigint[] NOT NULL,
    versions      integer[] NOT NULL,
    tfs           integer[],
    lengths       integer[],
    PRIMARY KEY (collection_id, lexeme, segment, block)
);

-- Blocks are read whole and are never compressible (document ids): store them plain.
ALTER TABLE {schema}.bm25_postings
    ALTER COLUMN documents SET STORAGE EXTERNAL,
    ALTER COLUMN versions SET STORAGE EXTERNAL,
    ALTER COLUMN tfs SET STORAGE EXTERNAL,
    ALTER COLUMN lengths SET STORAGE EXTERNAL;

CREATE SEQUENCE {schema}.bm25_segments;

-- The number of tokens of a document: what BM25 calls its length.
CREATE FUNCTION {schema}.bm25_length(tsv tsvector) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(sum(coalesce(cardinality(u.positions), 1)), 0)::integer FROM unnest(tsv) u
$$;

-- Postings for document versions written (bm25_add) or removed (bm25_remove), given as
-- parallel arrays: one unsorted segment and one totals row per call, whatever its size.
CREATE FUNCTION {schema}.bm25_add(p_ids bigint[], p_collections integer[], p_versions integer[],
                                  p_tsvs tsvector[]) RETURNS void
LANGUAGE sql AS $$
    WITH added AS MATERIALIZED (
        SELECT a.*, {schema}.bm25_length(a.tsv) AS len
        FROM unnest(p_ids, p_collections, p_versions, p_tsvs) a(id, collection_id, version, tsv)
    ), seg AS (
        SELECT nextval('{schema}.bm25_segments') AS id
    ), totals AS (
        INSERT INTO {schema}.bm25_totals (collection_id, documents, tokens)
        SELECT a.collection_id, count(*), sum(a.len) FROM added a GROUP BY a.collection_id
    )
    INSERT INTO {schema}.bm25_postings (collection_id, lexeme, segment, block, postings,
                                        documents, versions, tfs, lengths)
    SELECT a.collection_id, u.lexeme, seg.id, 0, count(*), array_agg(a.id), array_agg(a.version),
           array_agg(coalesce(cardinality(u.positions), 1)), array_agg(a.len)
    FROM added a CROSS JOIN seg CROSS JOIN LATERAL unnest(a.tsv) u
    GROUP BY a.collection_id, u.lexeme, seg.id
$$;

CREATE FUNCTION {schema}.bm25_remove(p_ids bigint[], p_collections integer[],
                                     p_versions integer[], p_tsvs tsvector[]) RETURNS void
LANGUAGE sql AS $$
    WITH gone AS MATERIALIZED (
        -- a dropped collection's documents go with it (bm25_forget): nothing to remove
        SELECT g.* FROM unnest(p_ids, p_collections, p_versions, p_tsvs)
                        g(id, collection_id, version, tsv)
        WHERE EXISTS (SELECT 1 FROM {schema}.collections c WHERE c.id = g.collection_id)
    ), seg AS (
        SELECT nextval('{schema}.bm25_segments') AS id
    ), totals AS (
        INSERT INTO {schema}.bm25_totals (collection_id, documents, tokens)
        SELECT g.collection_id, -count(*), -sum({schema}.bm25_length(g.tsv))
        FROM gone g GROUP BY g.collection_id
    )
    INSERT INTO {schema}.bm25_postings (collection_id, lexeme, segment, block, postings,
                                        documents, versions)
    SELECT g.collection_id, u.lexeme, seg.id, 0, -count(*), array_agg(g.id), array_agg(g.version)
    FROM gone g CROSS JOIN seg CROSS JOIN LATERAL unnest(g.tsv) u
    GROUP BY g.collection_id, u.lexeme, seg.id
$$;

-- Keeps the statistics in step with every statement that writes documents: inserts,
-- content updates (a new version: status updates change nothing), deletes, the cascade of a
-- collection drop and the writes of table watches alike, in the statement's own transaction.
CREATE FUNCTION {schema}.bm25_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM {schema}.bm25_add(array_agg(n.id), array_agg(n.collection_id),
                                  array_agg(n.version), array_agg(n.tsv))
        FROM new_docs n HAVING count(*) > 0;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM {schema}.bm25_remove(array_agg(o.id), array_agg(o.collection_id),
                                     array_agg(o.version), array_agg(o.tsv))
        FROM old_docs o HAVING count(*) > 0;
    ELSE
        PERFORM {schema}.bm25_remove(array_agg(o.id), array_agg(o.collection_id),
                                     array_agg(o.version), array_agg(o.tsv)),
                {schema}.bm25_add(array_agg(n.id), array_agg(n.collection_id),
                                  array_agg(n.version), array_agg(n.tsv))
        FROM old_docs o JOIN new_docs n ON n.id = o.id AND n.version <> o.version
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER bm25_inserted AFTER INSERT ON {schema}.documents
    REFERENCING NEW TABLE AS new_docs
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bm25_track();
CREATE TRIGGER bm25_updated AFTER UPDATE ON {schema}.documents
    REFERENCING OLD TABLE AS old_docs NEW TABLE AS new_docs
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bm25_track();
CREATE TRIGGER bm25_deleted AFTER DELETE ON {schema}.documents
    REFERENCING OLD TABLE AS old_docs
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bm25_track();

-- A dropped collection takes its statistics with it.
CREATE FUNCTION {schema}.bm25_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {schema}.bm25_postings WHERE collection_id = OLD.id;
    DELETE FROM {schema}.bm25_totals WHERE collection_id = OLD.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER bm25_forget AFTER DELETE ON {schema}.collections
    FOR EACH ROW EXECUTE FUNCTION {schema}.bm25_forget();

-- Merge segments of a collection's terms, each term's into one sorted segment: the pairs
-- (p_lexemes[i], p_segments[i]) name the segments. Removed postings cancel the added ones they
-- name; those whose postings lie in a segment not merged stay behind, as a segment of their
-- own. Postings are sorted by their weight under the collection's k1 and b and its average
-- length now, and cut into blocks of 1024. Returns the postings written.
CREATE FUNCTION {schema}.bm25_merge(p_collection integer, p_lexemes text[], p_segments bigint[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_k1 double precision;
    v_b double precision;
    v_avgdl double precision;
    v_written bigint;
BEGIN
    SELECT c.bm25_k1, c.bm25_b INTO v_k1, v_b FROM {schema}.collections c WHERE c.id = p_collection;
    IF v_k1 IS NULL THEN
        RETURN 0;
    END IF;
    SELECT sum(t.tokens)::double precision / nullif(sum(t.documents), 0) INTO v_avgdl
    FROM {schema}.bm25_totals t WHERE t.collection_id = p_collection;
    v_avgdl := greatest(coalesce(v_avgdl, 1), 1e-9);
    WITH gone AS MATERIALIZED (
        DELETE FROM {schema}.bm25_postings p
        USING unnest(p_lexemes, p_segments) AS m(lexeme, segment)
        WHERE p.collection_id = p_collection AND p.lexeme = m.lexeme AND p.segment = m.segment
        RETURNING p.lexeme, p.postings, p.documents, p.versions, p.tfs, p.lengths
    ), added AS (
        SELECT g.lexeme, unnest(g.documents) AS doc, unnest(g.versions) AS ver,
               unnest(g.tfs) AS tf, unnest(g.lengths) AS len
        FROM gone g WHERE g.postings > 0
    ), removed AS (
        SELECT g.lexeme, unnest(g.documents) AS doc, unnest(g.versions) AS ver
        FROM gone g WHERE g.postings < 0
    ), live AS (
        SELECT a.*, a.tf / (a.tf + v_k1 * (1 - v_b + v_b * a.len / v_avgdl)) AS w,
               row_number() OVER (PARTITION BY a.lexeme
                                  ORDER BY a.tf / (a.tf + v_k1 * (1 - v_b + v_b * a.len / v_avgdl))
                                           DESC, a.doc) - 1 AS rn
        FROM added a
        WHERE NOT EXISTS (SELECT 1 FROM removed r
                          WHERE r.lexeme = a.lexeme AND r.doc = a.doc AND r.ver = a.ver)
    ), kept AS (
        INSERT INTO {schema}.bm25_postings (collection_id, lexeme, segment, block, postings,
                                            sort_avgdl, sort_k1, sort_b, head_weight,
                                            documents, versions, tfs, lengths)
        SELECT p_collection, l.lexeme, seg.id, (l.rn / 1024)::integer, count(*), v_avgdl, v_k1,
               v_b, max(l.w), array_agg(l.doc ORDER BY l.rn), array_agg(l.ver ORDER BY l.rn),
               array_agg(l.tf ORDER BY l.rn), array_agg(l.len ORDER BY l.rn)
        FROM live l CROSS JOIN (SELECT nextval('{schema}.bm25_segments') AS id) seg
        GROUP BY l.lexeme, seg.id, l.rn / 1024
        RETURNING postings
    ), orphans AS (
        INSERT INTO {schema}.bm25_postings (collection_id, lexeme, segment, block, postings,
                                            documents, versions)
        SELECT p_collection, r.lexeme, seg.id, 0, -count(*), array_agg(r.doc), array_agg(r.ver)
        FROM removed r CROSS JOIN (SELECT nextval('{schema}.bm25_segments') AS id) seg
        WHERE NOT EXISTS (SELECT 1 FROM added a
                          WHERE a.lexeme = r.lexeme AND a.doc = r.doc AND a.ver = r.ver)
        GROUP BY r.lexeme, seg.id
    )
    SELECT coalesce(sum(k.postings), 0) INTO v_written FROM kept k;
    RETURN v_written;
END
$$;

-- Fold a collection's statistics deltas into one row.
CREATE FUNCTION {schema}.bm25_fold_totals(p_collection integer) RETURNS void
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM {schema}.bm25_totals WHERE collection_id = p_collection
        RETURNING documents, tokens
    )
    INSERT INTO {schema}.bm25_totals (collection_id, documents, tokens)
    SELECT p_collection, sum(documents), sum(tokens) FROM gone HAVING count(*) > 0
$$;

-- The statistics of the documents that exist now.
INSERT INTO {schema}.bm25_totals (collection_id, documents, tokens)
SELECT d.collection_id, count(*), sum({schema}.bm25_length(d.tsv))
FROM {schema}.documents d GROUP BY d.collection_id;

INSERT INTO {schema}.bm25_postings (collection_id, lexeme, segment, block, postings,
                                    documents, versions, tfs, lengths)
SELECT d.collection_id, u.lexeme, seg.id, 0, count(*), array_agg(d.id), array_agg(d.version),
       array_agg(coalesce(cardinality(u.positions), 1)), array_agg({schema}.bm25_length(d.tsv))
FROM {schema}.documents d CROSS JOIN (SELECT nextval('{schema}.bm25_segments') AS id) seg
CROSS JOIN LATERAL unnest(d.tsv) u
GROUP BY d.collection_id, u.lexeme, seg.id;
