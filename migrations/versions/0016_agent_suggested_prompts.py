"""Suggested prompts per agent: what Slack offers a person who opens the agent's Messages tab (at most four).

A column of its own (a JSON list of strings), not a key in `settings`: it is shown to people, and plan/apply
and `agent show` read it like the agent's other fields. The table's row-level security covers it already.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE agents ADD COLUMN suggested_prompts jsonb NOT NULL DEFAULT '[]'::jsonb "
        "CHECK (jsonb_typeof(suggested_prompts) = 'array' AND jsonb_array_length(suggested_prompts) <= 4)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE agents DROP COLUMN IF EXISTS suggested_prompts")
