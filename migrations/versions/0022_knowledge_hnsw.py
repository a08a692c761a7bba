"""Knowledge retrieval at scale: the HNSW index for vectors, and full-text matching that can use its GIN index.

The HNSW index serves scopes (a tenant's, or an agent's) of more than `knowledge.exact_below` chunks, through
pgvector's iterative scan so that the tenant filter cannot starve a query of rows; smaller scopes are searched exactly
through knowledge_chunks_scope. m and ef_construction are pgvector's defaults (16, 64): bench/knowledge.py measured
recall@10 with them.

Full text: under row-level security PostgreSQL will not evaluate a non-leakproof operator such as `@@` inside an index
scan before the policy's filter, so the app role can never use the GIN index: it reads every chunk of the tenant and
tests each (bench/knowledge.py: ~30 ms at 60,000 chunks, growing with the tenant). knowledge_text_matches runs as
the migration's owner and filters by exactly what the policies filter by (app.current_tenant, set per transaction by
the app; unset: no rows), so it shows nothing row-level security would not; where its owner bypasses RLS (a
superuser, as in the embedded database) the planner can use the GIN index.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

# PL/pgSQL with EXECUTE … USING, so that each call is planned for its own words and tenant: a small tenant's chunks
# are read by the btree and tested; a large one's rare words are looked up in the GIN index. At most `scan` matches
# are ranked: when more chunks than that hold every word of a question, its words are this tenant's common ones and
# say little (ranking all of a large tenant's matches took 0.8 s in bench/knowledge.py); the vector side decides.
TEXT_MATCHES = """
CREATE FUNCTION knowledge_text_matches(words text, n integer, sources uuid[], scan integer)
RETURNS TABLE (id bigint, s real)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    RETURN QUERY EXECUTE
        'SELECT m.id, ts_rank_cd(m.tsv, plainto_tsquery(''simple'', $1)) AS s FROM (
             SELECT c.id, c.tsv FROM knowledge_chunks c
             WHERE c.tenant_id = $2 AND c.tsv @@ plainto_tsquery(''simple'', $1) AND ($3 IS NULL OR c.source_id = ANY($3))
             LIMIT $5) m
         ORDER BY 2 DESC, m.id LIMIT $4'
    USING words, NULLIF(current_setting('app.current_tenant', true), '')::uuid, sources, n, scan;
END
$$
"""
SIGNATURE = "knowledge_text_matches(text, integer, uuid[], integer)"
HNSW = "CREATE INDEX knowledge_chunks_embedding ON knowledge_chunks USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"


# A chunk's row (a 1.5 kB vector, up to ~900 characters and their tsvector) passes TOAST's 2 kB threshold, so its
# vector or tsvector was compressed and every exact distance and full-text test paid a decompression (bench: ~12 µs a
# chunk). Rows up to a page stay whole; the vector is never compressed.
STORAGE = """
ALTER TABLE knowledge_chunks ALTER COLUMN embedding SET STORAGE PLAIN;
ALTER TABLE knowledge_chunks SET (toast_tuple_target = 8160);
"""


def upgrade() -> None:
    op.execute(STORAGE)
    op.execute(TEXT_MATCHES)
    op.execute(f"REVOKE ALL ON FUNCTION {SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO konstruct_app")
    op.execute(HNSW)


def downgrade() -> None:
    op.execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE knowledge_chunks RESET (toast_tuple_target)")
    op.execute("DROP INDEX IF EXISTS knowledge_chunks_embedding")
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
