"""What kind of text a history row is: what someone said ('message'), or a fixed notice Konstruct sent in the
agent's place ('notice': an apology for a failed model call, "the budget is spent", "paused", a hand-over).
Notices are shown to people but never sent back to the model as the agent's own words.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# Replies stored before this revision: the fixed ones recorded their source as the model; an apology for a
# failed model call is the reply of an inbox row that failed although the reply itself was sent.
BACKFILL = """
UPDATE messages m SET kind = 'notice'
WHERE m.direction = 'out' AND (
    m.model IN ('billing', 'budget', 'escalation', 'gave-up')
    OR (m.status <> 'failed' AND EXISTS (SELECT 1 FROM inbound_messages i WHERE i.id = m.inbound_id AND i.status = 'failed'))
)
"""


def upgrade() -> None:
    op.execute("ALTER TABLE messages ADD COLUMN kind text NOT NULL DEFAULT 'message' CHECK (kind IN ('message', 'notice'))")
    op.execute(BACKFILL)  # as the owner role, whose owner_access policy sees every tenant's rows


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP COLUMN IF EXISTS kind")
