"""The agent's brain: long-term memories (pgvector), conversation summaries and escalations, tenant tool
settings, and a per-tenant hash chain over the audit log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
CREATE EXTENSION IF NOT EXISTS vector;

-- What an agent remembers about one person. Recall is an exact scan over the btree scope
-- (tenant, agent, person): correct under row-level security however many rows other tenants hold.
CREATE TABLE memories (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id uuid NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    person text NOT NULL,
    content text NOT NULL,
    embedding vector(384) NOT NULL,
    inbound_id uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memories_scope ON memories (tenant_id, agent_id, person);

-- A conversation that outgrew the prompt keeps a summary of its older turns.
ALTER TABLE conversations ADD COLUMN summary text;
ALTER TABLE conversations ADD COLUMN summary_until timestamptz;
ALTER TABLE conversations ADD COLUMN escalated_at timestamptz;
ALTER TABLE conversations ADD COLUMN escalation_reason text;

-- Per tenant: hosts web_fetch may reach, and where escalations are announced (slack:C123 / slack:U123).
ALTER TABLE tenants ADD COLUMN allowed_hosts text[] NOT NULL DEFAULT '{}';
ALTER TABLE tenants ADD COLUMN escalation_target text;

-- The audit hash chain: each event carries its place in its tenant's chain and the hash of the one before.
ALTER TABLE audit_events ADD COLUMN seq bigint;
ALTER TABLE audit_events ADD COLUMN prev_hash bytea;
ALTER TABLE audit_events ADD COLUMN hash bytea;
"""

CHAIN = """
-- The hash of one event: over the previous hash and every field, in a fixed text form.
CREATE FUNCTION konstruct_audit_hash(p_prev bytea, p_tenant uuid, p_seq bigint, p_actor text, p_action text,
                                     p_target text, p_detail jsonb, p_created timestamptz) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(convert_to(concat_ws(E'\\x1f', encode(coalesce(p_prev, ''::bytea), 'hex'), p_tenant::text, p_seq::text,
        p_actor, p_action, coalesce(p_target, ''), p_detail::text,
        to_char(p_created AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')), 'UTF8'))
$$;

-- Every insert, from any code path, joins its tenant's chain. The advisory lock serialises writers of one
-- tenant until commit, so the chain never forks; SECURITY DEFINER so the previous link is found whatever
-- tenant the session has set.
CREATE FUNCTION konstruct_audit_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    last_seq bigint;
    last_hash bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('audit:' || NEW.tenant_id::text));
    SELECT a.seq, a.hash INTO last_seq, last_hash FROM audit_events a
        WHERE a.tenant_id = NEW.tenant_id AND a.seq IS NOT NULL ORDER BY a.seq DESC LIMIT 1;
    NEW.seq := coalesce(last_seq, 0) + 1;
    NEW.prev_hash := last_hash;
    NEW.created_at := coalesce(NEW.created_at, now());
    NEW.hash := konstruct_audit_hash(NEW.prev_hash, NEW.tenant_id, NEW.seq, NEW.actor, NEW.action, NEW.target, NEW.detail,
                                     NEW.created_at);
    RETURN NEW;
END
$$;
"""

BACKFILL = """
DO $$
DECLARE
    e record;
    prev bytea;
    n bigint;
    current_tenant uuid;
BEGIN
    FOR e IN SELECT * FROM audit_events ORDER BY tenant_id, id LOOP
        IF current_tenant IS DISTINCT FROM e.tenant_id THEN
            current_tenant := e.tenant_id; prev := NULL; n := 0;
        END IF;
        n := n + 1;
        UPDATE audit_events SET seq = n, prev_hash = prev,
            hash = konstruct_audit_hash(prev, e.tenant_id, n, e.actor, e.action, e.target, e.detail, e.created_at)
        WHERE id = e.id RETURNING hash INTO prev;
    END LOOP;
END
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    enable_rls(op, "memories")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON memories TO {APP_ROLE}")
    op.execute(CHAIN)
    # Existing events join the chain in the order they were written (the append-only trigger is paused
    # for this one rewrite, inside the migration's transaction).
    op.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
    op.execute(BACKFILL)
    op.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")
    op.execute("ALTER TABLE audit_events ALTER COLUMN seq SET NOT NULL, ALTER COLUMN hash SET NOT NULL")
    op.execute("CREATE UNIQUE INDEX audit_events_chain ON audit_events (tenant_id, seq)")
    op.execute("CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION konstruct_audit_chain()")
    op.execute("REVOKE ALL ON FUNCTION konstruct_audit_chain() FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_events_chain ON audit_events")
    op.execute("DROP INDEX IF EXISTS audit_events_chain")
    op.execute(
        "DROP FUNCTION IF EXISTS konstruct_audit_chain(), konstruct_audit_hash(bytea, uuid, bigint, text, text, text, jsonb, timestamptz)"
    )
    op.execute("ALTER TABLE audit_events DROP COLUMN IF EXISTS seq, DROP COLUMN IF EXISTS prev_hash, DROP COLUMN IF EXISTS hash")
    op.execute("ALTER TABLE tenants DROP COLUMN IF EXISTS allowed_hosts, DROP COLUMN IF EXISTS escalation_target")
    op.execute(
        "ALTER TABLE conversations DROP COLUMN IF EXISTS summary, DROP COLUMN IF EXISTS summary_until, "
        "DROP COLUMN IF EXISTS escalated_at, DROP COLUMN IF EXISTS escalation_reason"
    )
    op.execute("DROP TABLE IF EXISTS memories")
