"""Knowledge: a tenant's own documents, split into chunks that agents retrieve before they answer.

- `knowledge_sources`: one file or URL a tenant added (`konstruct knowledge add`), unique per tenant by `uri` (the
  absolute path or the normalised URL). `content_hash` (sha256 of the extracted text) makes re-adding an unchanged
  source a no-op; a changed one replaces its chunks in one transaction. `agent_ids` empty means every agent of the
  tenant; otherwise only those agents retrieve it.
- `knowledge_chunks`: the pieces, each with its heading path, text, a generated full-text vector (`simple`
  configuration: no stemming surprises across languages) and the worker's 384-dimensional embedding.
- `knowledge_jobs`: an ingest queued for the worker (so `add` works from a laptop against a server), with its
  progress and per-file outcome visible while it runs and after.

All three are tenant data under FORCE ROW LEVEL SECURITY and go with the tenant (ON DELETE CASCADE). The vector
index for large tenants is chosen with bench/knowledge.py and lives in its own migration.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
CREATE TABLE knowledge_sources (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    uri text NOT NULL CHECK (length(uri) BETWEEN 1 AND 2048),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 512),
    kind text NOT NULL CHECK (kind IN ('markdown', 'text', 'html', 'pdf')),
    agent_ids uuid[] NOT NULL DEFAULT '{}',
    content_hash text,
    bytes bigint NOT NULL DEFAULT 0,
    chunks integer NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'ready' CHECK (status IN ('ready', 'failed')),
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, uri)
);

CREATE TABLE knowledge_chunks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    source_id uuid NOT NULL REFERENCES knowledge_sources(id) ON DELETE CASCADE,
    ordinal integer NOT NULL,
    heading text NOT NULL DEFAULT '',
    content text NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', heading || ' ' || content)) STORED,
    embedding vector(384) NOT NULL,
    UNIQUE (source_id, ordinal)
);
CREATE INDEX knowledge_chunks_scope ON knowledge_chunks (tenant_id, source_id);
CREATE INDEX knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv);

CREATE TABLE knowledge_jobs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('add', 'sync')),
    request jsonb NOT NULL DEFAULT '{}'::jsonb,
    status text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    total integer NOT NULL DEFAULT 0,
    done integer NOT NULL DEFAULT 0,
    results jsonb NOT NULL DEFAULT '[]'::jsonb,
    error text,
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX knowledge_jobs_recent ON knowledge_jobs (tenant_id, created_at);
"""

TABLES = ("knowledge_sources", "knowledge_chunks", "knowledge_jobs")


def upgrade() -> None:
    op.execute(DDL)
    for table in TABLES:
        enable_rls(op, table)
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE IF EXISTS {table}")
