"""Human handoff: one desk thread per escalation, the person's messages mirrored into it, humans' replies.

- handoffs: one row per escalation of a conversation (a conversation escalated again gets a new one): the desk
  thread it lives in (desk_kind/desk_team/desk_where/desk_ts, e.g. a Slack channel and the root message's ts), who
  took it and when, the first human answer, the reminder, and how it ended (outcome, ended_at).
- desk_mirrors: what was posted in a desk thread for one history row (a person's message mirrored, or the status
  line under a human's reply), with the desk's id for it: unique per row, so nothing is mirrored twice.
- messages.kind gains `human` (a human's answer to the person) and `note` (a human's note for the agent).
- konstruct_handoff_metrics(): outcomes and times for /metrics, totals only; konstruct_handoff_tenants(): which
  tenants a worker's periodic check has handoff work in (ids only).

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
-- human: what a human sent the person from the desk; note: a human's note for the agent (never sent to the person).
ALTER TABLE messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE messages ADD CONSTRAINT messages_kind_check CHECK (kind IN ('message', 'notice', 'human', 'note'));

CREATE TABLE handoffs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    reason text,
    desk_kind text,
    desk_team text,
    desk_where text,
    desk_ts text,
    owner text,
    taken_at timestamptz,
    first_human_reply_at timestamptz,
    reminded_at timestamptz,
    outcome text CHECK (outcome IN ('resolved_by_human', 'handed_back', 'closed', 'abandoned')),
    ended_at timestamptz,
    ended_by text,
    card_dirty boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX handoffs_one_open ON handoffs (conversation_id) WHERE ended_at IS NULL;
CREATE INDEX handoffs_desk_thread ON handoffs (tenant_id, desk_where, desk_ts);
CREATE INDEX handoffs_waiting ON handoffs (created_at) WHERE ended_at IS NULL AND reminded_at IS NULL;

CREATE TABLE desk_mirrors (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    handoff_id uuid NOT NULL REFERENCES handoffs(id) ON DELETE CASCADE,
    message_id uuid NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    desk_ts text NOT NULL,
    shown_status text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, message_id)
);
CREATE INDEX desk_mirrors_handoff ON desk_mirrors (handoff_id);

-- Conversations escalated before this revision get their handoff (no desk thread: they were notified the old way).
INSERT INTO handoffs (tenant_id, conversation_id, reason, created_at)
SELECT tenant_id, id, escalation_reason, coalesce(escalated_at, now()) FROM conversations WHERE status = 'escalated';
"""

FUNCTION = """
-- Tenants with handoff work for a worker's periodic check (open handoffs, desk cards to redraw): ids only.
CREATE FUNCTION konstruct_handoff_tenants()
RETURNS TABLE (tenant_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT DISTINCT tenant_id FROM handoffs WHERE ended_at IS NULL OR card_dirty OR ended_at > now() - interval '1 day'
$$;

CREATE FUNCTION konstruct_handoff_metrics()
RETURNS TABLE (name text, label text, value double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT 'handoffs', coalesce(outcome, 'open'), count(*)::double precision FROM handoffs GROUP BY outcome
    UNION ALL
    SELECT 'handoff_take_seconds_sum', '', coalesce(sum(extract(epoch FROM taken_at - created_at)), 0)::double precision
    FROM handoffs WHERE taken_at IS NOT NULL
    UNION ALL
    SELECT 'handoff_take_seconds_count', '', count(*)::double precision FROM handoffs WHERE taken_at IS NOT NULL
    UNION ALL
    SELECT 'handoff_answer_seconds_sum', '', coalesce(sum(extract(epoch FROM first_human_reply_at - created_at)), 0)::double precision
    FROM handoffs WHERE first_human_reply_at IS NOT NULL
    UNION ALL
    SELECT 'handoff_answer_seconds_count', '', count(*)::double precision FROM handoffs WHERE first_human_reply_at IS NOT NULL
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    for table in ("handoffs", "desk_mirrors"):
        enable_rls(op, table)
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")
    op.execute(FUNCTION)
    for function in ("konstruct_handoff_metrics()", "konstruct_handoff_tenants()"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DELETE FROM messages WHERE kind IN ('human', 'note')")
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_kind_check")
    op.execute("ALTER TABLE messages ADD CONSTRAINT messages_kind_check CHECK (kind IN ('message', 'notice'))")
    op.execute("DROP FUNCTION IF EXISTS konstruct_handoff_metrics()")
    op.execute("DROP FUNCTION IF EXISTS konstruct_handoff_tenants()")
    op.execute("DROP TABLE IF EXISTS desk_mirrors")
    op.execute("DROP TABLE IF EXISTS handoffs")
