"""WhatsApp: delivery statuses of outgoing messages, and look-ups the channel needs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
-- A message moves forward only: sending → sent → delivered → read; failed is final.
CREATE FUNCTION konstruct_delivery_rank(p_status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE p_status WHEN 'sending' THEN 0 WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2
                         WHEN 'read' THEN 3 WHEN 'failed' THEN 4 ELSE -1 END
$$;

ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('received', 'sending', 'sent', 'delivered', 'read', 'failed'));
ALTER TABLE messages ADD COLUMN status_at timestamptz;
CREATE INDEX messages_external ON messages (tenant_id, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX inbound_messages_conversation ON inbound_messages (tenant_id, conversation_id, received_at);

-- The latest status the channel reported for each message it carried (a WhatsApp wamid). Kept apart
-- from messages because a status may arrive before the worker has recorded the id it was sent under.
CREATE TABLE delivery_statuses (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    channel text NOT NULL,
    external_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('sent', 'delivered', 'read', 'failed')),
    error text,
    status_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, channel, external_id)
);
"""


def upgrade() -> None:
    op.execute(DDL)
    enable_rls(op, "delivery_statuses")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON delivery_statuses TO {APP_ROLE}")
    op.execute(f"GRANT EXECUTE ON FUNCTION konstruct_delivery_rank(text) TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS delivery_statuses")
    op.execute("DROP INDEX IF EXISTS inbound_messages_conversation, messages_external")
    op.execute("ALTER TABLE messages DROP COLUMN IF EXISTS status_at")
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_status_check")
    op.execute("ALTER TABLE messages ADD CONSTRAINT messages_status_check CHECK (status IN ('received', 'sending', 'sent', 'failed'))")
    op.execute("DROP FUNCTION IF EXISTS konstruct_delivery_rank(text)")
