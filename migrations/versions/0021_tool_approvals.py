"""Tool approvals: a tool call waiting for a human's yes or no, and the inbox state of the turn it paused.

- `tool_approvals`: one pending (then approved, denied or expired) call of an `ask` tool: which tool, with what
  arguments (as the model wrote them, and redacted for showing), in which conversation and for which inbound message
  (and tool call id), who may decide (`person`: the person in the conversation; `operators`: the tenant's admins and
  operators), until when, and what the turn needs to go on (`resume`: the tool loop's messages so far, its step count
  and the calls still to run). Decided once: `UPDATE … WHERE status = 'pending'`. Tenant data under FORCE RLS.
- `inbound_messages.status` gains `waiting`: the turn is paused on an approval; the sweeper leaves it alone (it is
  neither lost nor stuck) until a decision (or the expiry) puts it back to `received` and rings for it.
- `konstruct_due_approvals()`: pending approvals past their expiry, across tenants, for the worker to expire.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
ALTER TABLE inbound_messages DROP CONSTRAINT inbound_messages_status_check;
ALTER TABLE inbound_messages ADD CONSTRAINT inbound_messages_status_check
    CHECK (status IN ('received', 'processing', 'waiting', 'replied', 'failed', 'ignored'));

CREATE TABLE tool_approvals (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id uuid NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    inbound_id uuid NOT NULL REFERENCES inbound_messages(id) ON DELETE CASCADE,
    tool_call_id text NOT NULL CHECK (length(tool_call_id) BETWEEN 1 AND 256),
    tool text NOT NULL CHECK (length(tool) BETWEEN 1 AND 64),
    arguments jsonb NOT NULL DEFAULT '{}'::jsonb,
    shown_arguments jsonb NOT NULL DEFAULT '{}'::jsonb,
    approver text NOT NULL CHECK (approver IN ('person', 'operators')),
    channel text NOT NULL,
    person text NOT NULL,
    resume jsonb NOT NULL DEFAULT '{}'::jsonb,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    request_ref text,
    decided_by text,
    decided_at timestamptz,
    UNIQUE (inbound_id, tool_call_id)
);
CREATE INDEX tool_approvals_recent ON tool_approvals (tenant_id, requested_at);
CREATE INDEX tool_approvals_due ON tool_approvals (expires_at) WHERE status = 'pending';
"""

FUNCTIONS = """
CREATE FUNCTION konstruct_due_approvals()
RETURNS TABLE (id uuid, tenant_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT a.id, a.tenant_id FROM tool_approvals a WHERE a.status = 'pending' AND a.expires_at <= now()
    ORDER BY a.expires_at LIMIT 500
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    enable_rls(op, "tool_approvals")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON tool_approvals TO {APP_ROLE}")
    op.execute(FUNCTIONS)
    op.execute("REVOKE ALL ON FUNCTION konstruct_due_approvals() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION konstruct_due_approvals() TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS konstruct_due_approvals()")
    op.execute("DROP TABLE IF EXISTS tool_approvals")
    op.execute("UPDATE inbound_messages SET status = 'received' WHERE status = 'waiting'")
    op.execute("ALTER TABLE inbound_messages DROP CONSTRAINT inbound_messages_status_check")
    op.execute(
        "ALTER TABLE inbound_messages ADD CONSTRAINT inbound_messages_status_check "
        "CHECK (status IN ('received', 'processing', 'replied', 'failed', 'ignored'))"
    )
