"""MCP servers: a tenant's Model Context Protocol servers, whose tools its agents may call.

- `mcp_servers`: one server per tenant and name (the namespace of its tools: `shop__lookup_order`). `transport` is
  `http` (streamable HTTP at `url`) or `stdio` (`command`, an argv list, run by the worker; only a platform admin
  adds one). `secrets` holds the headers (http) or environment variables (stdio) as Fernet-encrypted JSON;
  `secret_hints` only their names and hints ("…abcd"). `agents` empty means every agent of the tenant may use it.
  `tools` is the last listing seen (name, exposed name, description, input schema, read-only hint), refreshed on
  every (re)connection and by `konstruct mcp test`, so a turn offers the tools without connecting first.

Tenant data under FORCE ROW LEVEL SECURITY; it goes with the tenant (ON DELETE CASCADE).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
CREATE TABLE mcp_servers (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name text NOT NULL CHECK (name ~ '^[a-z][a-z0-9-]{0,29}$'),
    transport text NOT NULL CHECK (transport IN ('http', 'stdio')),
    url text CHECK (url IS NULL OR length(url) BETWEEN 1 AND 2048),
    command jsonb,
    secrets bytea,
    secret_hints jsonb NOT NULL DEFAULT '{}'::jsonb,
    agents text[] NOT NULL DEFAULT '{}',
    timeout_seconds double precision NOT NULL DEFAULT 30 CHECK (timeout_seconds > 0 AND timeout_seconds <= 600),
    tools jsonb NOT NULL DEFAULT '[]'::jsonb,
    tools_seen_at timestamptz,
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    CHECK ((transport = 'http') = (url IS NOT NULL)),
    CHECK ((transport = 'stdio') = (command IS NOT NULL))
);
"""


def upgrade() -> None:
    op.execute(DDL)
    enable_rls(op, "mcp_servers")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON mcp_servers TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS mcp_servers")
