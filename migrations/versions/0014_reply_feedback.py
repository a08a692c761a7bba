"""Feedback on replies: a person's thumbs up (+1) or down (-1) on one stored reply, one vote per person per
reply, changeable. Tenant data under FORCE ROW LEVEL SECURITY like every other tenant table.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
CREATE TABLE reply_feedback (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    message_id uuid NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    channel text NOT NULL CHECK (length(channel) BETWEEN 1 AND 32),
    voter text NOT NULL CHECK (length(voter) BETWEEN 1 AND 64),
    value smallint NOT NULL CHECK (value IN (-1, 1)),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, message_id, channel, voter)
);
CREATE INDEX reply_feedback_recent ON reply_feedback (tenant_id, updated_at);
"""


def upgrade() -> None:
    op.execute(DDL)
    enable_rls(op, "reply_feedback")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON reply_feedback TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS reply_feedback")
