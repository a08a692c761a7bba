"""Socket Mode: which gateway process holds each single-workspace Slack app's connection to Slack.

The truth is a session-level advisory lock per connection (held by exactly one gateway process); this table
says who that is, since when, and how the socket is doing, for `doctor` and `channel list`. It holds no
tenant data (a connection id, a host name, a pid), so it has no row-level security.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
CREATE TABLE slack_sockets (
    connection_id uuid PRIMARY KEY REFERENCES channel_connections(id) ON DELETE CASCADE,
    host text NOT NULL,
    pid integer NOT NULL,
    state text NOT NULL CHECK (state IN ('connecting', 'connected', 'failing')),
    detail text NOT NULL DEFAULT '',
    since timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);

-- The connections a gateway holds a socket for, before any tenant is known: single-workspace Slack apps
-- connected with an app-level token. Also named for doctor (tenant slug, workspace).
CREATE FUNCTION konstruct_socket_connections()
RETURNS TABLE (id uuid, tenant_id uuid, tenant_slug text, external_id text, name text, credentials bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT c.id, c.tenant_id, t.slug, c.external_id, c.name, c.credentials
    FROM channel_connections c JOIN tenants t ON t.id = c.tenant_id
    WHERE c.kind = 'slack' AND c.mode = 'single' AND c.status = 'connected' AND c.details ? 'app_token_hint'
    ORDER BY t.slug, c.name
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON slack_sockets TO {APP_ROLE}")
    op.execute("REVOKE ALL ON FUNCTION konstruct_socket_connections() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION konstruct_socket_connections() TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS konstruct_socket_connections()")
    op.execute("DROP TABLE IF EXISTS slack_sockets")
