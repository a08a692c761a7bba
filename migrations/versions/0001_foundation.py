"""Foundation: tenants, agents, conversations, the inbox, messages, audit log, row-level security.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

TABLES = """
CREATE TABLE tenants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    role text NOT NULL,
    persona text NOT NULL,
    model text,
    settings jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE conversations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id uuid NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    channel text NOT NULL,
    external_id text NOT NULL,
    person text NOT NULL,
    status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'escalated', 'closed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    last_message_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, channel, external_id, agent_id)
);

CREATE TABLE inbound_messages (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    channel text NOT NULL,
    external_id text NOT NULL,
    sender text NOT NULL,
    text text NOT NULL DEFAULT '',
    payload jsonb NOT NULL DEFAULT '{}'::jsonb,
    status text NOT NULL DEFAULT 'received'
        CHECK (status IN ('received', 'processing', 'replied', 'failed', 'ignored')),
    attempts integer NOT NULL DEFAULT 0,
    error text,
    worker_id text,
    received_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    finished_at timestamptz,
    UNIQUE (tenant_id, channel, external_id)
);
CREATE INDEX inbound_messages_open ON inbound_messages (status, received_at)
    WHERE status IN ('received', 'processing');

CREATE TABLE messages (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    inbound_id uuid REFERENCES inbound_messages(id) ON DELETE SET NULL,
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    author text NOT NULL,
    text text NOT NULL,
    status text NOT NULL CHECK (status IN ('received', 'sending', 'sent', 'failed')),
    external_id text,
    error text,
    model text,
    latency_ms integer,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation ON messages (tenant_id, conversation_id, created_at);
-- The database, not only the code, guarantees one reply per inbound message.
CREATE UNIQUE INDEX messages_one_per_inbound ON messages (inbound_id, direction) WHERE inbound_id IS NOT NULL;

-- No foreign key to tenants: the record of what happened outlives a deleted tenant.
CREATE TABLE audit_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, id);

CREATE TABLE worker_heartbeats (
    worker_id text PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    in_flight integer NOT NULL DEFAULT 0
);

-- huey's PostgresStorage tables (the default queue), created here so the app role needs no DDL rights.
-- They carry task ids only, never tenant data.
CREATE TABLE huey_kv (queue text NOT NULL, key text NOT NULL, value bytea NOT NULL, PRIMARY KEY (queue, key));
CREATE TABLE huey_schedule (id bigserial PRIMARY KEY, queue text NOT NULL, data bytea NOT NULL,
                            timestamp double precision NOT NULL);
CREATE INDEX huey_schedule_queue_timestamp ON huey_schedule (queue, timestamp);
CREATE TABLE huey_task (id bigserial PRIMARY KEY, queue text NOT NULL, data bytea NOT NULL,
                        priority double precision NOT NULL DEFAULT 0.0);
CREATE INDEX huey_task_queue_priority_id ON huey_task (queue, priority DESC, id);
CREATE TABLE huey_counter (queue text NOT NULL, key text NOT NULL, value bigint NOT NULL DEFAULT 0,
                           PRIMARY KEY (queue, key));
"""

TENANT_TABLES = {
    "tenants": "id",
    "agents": "tenant_id",
    "conversations": "tenant_id",
    "inbound_messages": "tenant_id",
    "messages": "tenant_id",
    "audit_events": "tenant_id",
}

FUNCTIONS = """
-- Look-ups needed before a tenant is known. SECURITY DEFINER, owned by the owner role, and narrow:
-- they return routing facts (ids, slugs, states), never conversation content.
CREATE FUNCTION konstruct_tenant_directory()
RETURNS TABLE (id uuid, slug text, name text, status text, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT t.id, t.slug, t.name, t.status, t.created_at FROM tenants t ORDER BY t.slug
$$;

-- Messages a worker must (re)start: 'processing' rows whose worker is dead or silent are put back
-- to 'received'; 'received' rows older than the grace period lost their queue entry.
CREATE FUNCTION konstruct_requeue_stuck(dead_workers text[], stale_after interval, received_grace interval)
RETURNS TABLE (id uuid, tenant_id uuid)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH reset AS (
        UPDATE inbound_messages m SET status = 'received', worker_id = NULL, claimed_at = NULL
        WHERE m.status = 'processing'
          AND (m.worker_id = ANY(dead_workers)
               OR NOT EXISTS (SELECT 1 FROM worker_heartbeats h
                              WHERE h.worker_id = m.worker_id AND h.seen_at > now() - stale_after))
        RETURNING m.id, m.tenant_id
    )
    SELECT reset.id, reset.tenant_id FROM reset
    UNION
    SELECT m.id, m.tenant_id FROM inbound_messages m
    WHERE m.status = 'received' AND m.received_at < now() - received_grace
$$;

CREATE FUNCTION konstruct_reject_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION konstruct_reject_audit_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION konstruct_reject_audit_change();
"""


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
            END IF;
        END
        $$
        """
    )
    op.execute(f"ALTER ROLE {APP_ROLE} NOSUPERUSER NOBYPASSRLS")
    op.execute(TABLES)
    for table, column in TENANT_TABLES.items():
        enable_rls(op, table, column)
    op.execute(FUNCTIONS)

    op.execute(f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}")
    data_tables = [t for t in TENANT_TABLES if t != "audit_events"]
    queue_tables = ["worker_heartbeats", "huey_kv", "huey_schedule", "huey_task", "huey_counter"]
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(data_tables + queue_tables)} TO {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON audit_events TO {APP_ROLE}")
    op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM {APP_ROLE}")
    op.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}")
    for function in ("konstruct_tenant_directory()", "konstruct_requeue_stuck(text[], interval, interval)"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute(
        "DROP TABLE IF EXISTS huey_counter, huey_task, huey_schedule, huey_kv, worker_heartbeats, audit_events, "
        "messages, inbound_messages, conversations, agents, tenants CASCADE"
    )
    op.execute(
        "DROP FUNCTION IF EXISTS konstruct_tenant_directory(), konstruct_requeue_stuck(text[], interval, interval), "
        "konstruct_reject_audit_change()"
    )
