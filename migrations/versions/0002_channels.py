"""Channel connections (a Slack workspace, later a WhatsApp number), routes, reply placeholders.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
CREATE TABLE channel_connections (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('slack', 'whatsapp')),
    external_id text NOT NULL,              -- Slack team id, WhatsApp phone-number id
    name text NOT NULL DEFAULT '',
    mode text NOT NULL CHECK (mode IN ('oauth', 'single')),
    status text NOT NULL DEFAULT 'connected' CHECK (status IN ('connected', 'disconnected')),
    default_agent_id uuid REFERENCES agents(id) ON DELETE SET NULL,
    credentials bytea NOT NULL,             -- Fernet token of a JSON object: never plaintext
    details jsonb NOT NULL DEFAULT '{}'::jsonb,  -- non-secret facts: bot user id, app id, key hints
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- One workspace or number answers for one tenant only.
    UNIQUE (kind, external_id)
);

CREATE TABLE channel_routes (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    connection_id uuid NOT NULL REFERENCES channel_connections(id) ON DELETE CASCADE,
    external_channel text NOT NULL,         -- Slack channel id
    agent_id uuid NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (connection_id, external_channel)
);

-- Where the channel shows the agent is working (a Slack placeholder's ts), so a retry reuses it.
ALTER TABLE inbound_messages ADD COLUMN reply_ref text;
"""

FUNCTIONS = """
-- Which tenant a workspace or number belongs to, before any tenant is known. Returns the encrypted
-- credentials blob (useless without the master key) and routing facts, never conversation content.
CREATE FUNCTION konstruct_resolve_connection(p_kind text, p_external_id text)
RETURNS TABLE (id uuid, tenant_id uuid, status text, mode text, credentials bytea, details jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT c.id, c.tenant_id, c.status, c.mode, c.credentials, c.details
    FROM channel_connections c WHERE c.kind = p_kind AND c.external_id = p_external_id
$$;

-- Slack's url_verification carries no team id: the candidates are the single-workspace apps.
CREATE FUNCTION konstruct_single_connections(p_kind text)
RETURNS TABLE (id uuid, tenant_id uuid, credentials bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT c.id, c.tenant_id, c.credentials FROM channel_connections c
    WHERE c.kind = p_kind AND c.mode = 'single' AND c.status = 'connected'
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    for table in ("channel_connections", "channel_routes"):
        enable_rls(op, table)
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")
    op.execute(FUNCTIONS)
    for function in ("konstruct_resolve_connection(text, text)", "konstruct_single_connections(text)"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS konstruct_resolve_connection(text, text), konstruct_single_connections(text)")
    op.execute("ALTER TABLE inbound_messages DROP COLUMN IF EXISTS reply_ref")
    op.execute("DROP TABLE IF EXISTS channel_routes, channel_connections")
