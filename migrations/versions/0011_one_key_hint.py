"""One key-hint format: LLM keys stored before it show "****abcd"; every hint is now "…abcd" (as channels' are).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # FORCE ROW LEVEL SECURITY applies to the owner too: lift it for this one statement, in this transaction.
    op.execute("ALTER TABLE llm_keys NO FORCE ROW LEVEL SECURITY")
    op.execute("UPDATE llm_keys SET hint = '…' || substr(hint, 5) WHERE hint LIKE '****%'")
    op.execute("ALTER TABLE llm_keys FORCE ROW LEVEL SECURITY")


def downgrade() -> None:
    op.execute("ALTER TABLE llm_keys NO FORCE ROW LEVEL SECURITY")
    op.execute("UPDATE llm_keys SET hint = '****' || substr(hint, 2) WHERE hint LIKE '…%'")
    op.execute("ALTER TABLE llm_keys FORCE ROW LEVEL SECURITY")
