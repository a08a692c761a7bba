"""Why a conversation was escalated, as a category beside the explanation (escalation_reason):
person_asked (the person asked for a human; the model's escalate_to_human tool), rule (one of the agent's
escalation rules fired), tool_failure (the model escalated after a tool failed), budget (the tenant's monthly
LLM budget is spent and a human answers instead). The desk thread and the status page show it.

Escalations stored before this revision get the category their reason's wording tells.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

BACKFILL = """
UPDATE conversations SET escalation_category = CASE
    WHEN escalation_reason LIKE 'rule %' THEN 'rule'
    ELSE 'person_asked'
END
WHERE escalated_at IS NOT NULL
"""


def upgrade() -> None:
    op.execute(
        "ALTER TABLE conversations ADD COLUMN escalation_category text "
        "CHECK (escalation_category IN ('person_asked', 'rule', 'tool_failure', 'budget'))"
    )
    op.execute(BACKFILL)  # as the owner role, whose owner_access policy sees every tenant's rows


def downgrade() -> None:
    op.execute("ALTER TABLE conversations DROP COLUMN IF EXISTS escalation_category")
