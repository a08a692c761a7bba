"""Crash safety: a worker's death is charged only to a message that ran alone; the sweeper re-queues
only what has no queue entry; an installation-wide read-out of the inbox for `doctor` and the status page.

- inbound_messages.suspect: it was in flight on workers that died twice; it is retried alone (the suspect lane).
- inbound_messages.crashes: how often it was running alone when its worker died (or raised): only this counts
  towards worker.max_attempts.
- inbound_messages.solo: the current claim runs alone on its worker.
- inbound_messages.requeued_at: when the sweeper last rang the doorbell for it (queues it cannot look into).
- huey_task.inbound_id: which inbox row a queue entry is for, so the sweeper can tell a queued row from a lost one.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
ALTER TABLE inbound_messages
    ADD COLUMN suspect boolean NOT NULL DEFAULT false,
    ADD COLUMN crashes integer NOT NULL DEFAULT 0,
    ADD COLUMN solo boolean NOT NULL DEFAULT false,
    ADD COLUMN requeued_at timestamptz;
ALTER TABLE huey_task ADD COLUMN inbound_id uuid;
CREATE INDEX huey_task_inbound_id ON huey_task (inbound_id) WHERE inbound_id IS NOT NULL;
"""

FUNCTIONS = """
DROP FUNCTION konstruct_requeue_stuck(text[], interval, interval);

-- Messages to ring the doorbell for again:
-- * 'processing' on a dead or silent worker: back to 'received'. The first time, it is simply retried (most deaths
--   are not a message's doing); a message whose second claim died too becomes suspect and is retried alone. A crash
--   is charged only when the message was running alone on that worker;
-- * 'received' for longer than the grace with no queue entry (the doorbell went with a worker that dequeued it
--   and died): when the queue is huey's Postgres storage (tracked), looked up in huey_task; otherwise at most
--   once per grace period (requeued_at).
CREATE FUNCTION konstruct_requeue_stuck(dead_workers text[], stale_after interval, received_grace interval, tracked boolean)
RETURNS TABLE (id uuid, tenant_id uuid, suspect boolean)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH orphaned AS (
        UPDATE inbound_messages m
        SET status = 'received', worker_id = NULL, claimed_at = NULL, suspect = m.suspect OR m.attempts >= 2,
            crashes = m.crashes + CASE WHEN m.solo THEN 1 ELSE 0 END, solo = false, requeued_at = now()
        WHERE m.status = 'processing'
          AND (m.worker_id = ANY(dead_workers)
               OR NOT EXISTS (SELECT 1 FROM worker_heartbeats h
                              WHERE h.worker_id = m.worker_id AND h.seen_at > now() - stale_after))
        RETURNING m.id, m.tenant_id, m.suspect
    ), lost AS (
        UPDATE inbound_messages m SET requeued_at = now()
        WHERE m.status = 'received' AND m.received_at < now() - received_grace
          AND (tracked OR m.requeued_at IS NULL OR m.requeued_at < now() - received_grace)
          AND NOT (tracked AND EXISTS (SELECT 1 FROM huey_task t WHERE t.inbound_id = m.id))
        RETURNING m.id, m.tenant_id, m.suspect
    )
    SELECT * FROM orphaned UNION ALL SELECT * FROM lost
$$;

-- One worker gives a message back: it failed there without finishing (the database went away, or an error).
-- charge: the message itself raised, so the failure counts towards worker.max_attempts.
CREATE FUNCTION konstruct_release_claim(p_id uuid, p_worker text, charge boolean)
RETURNS TABLE (id uuid, tenant_id uuid, suspect boolean)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    UPDATE inbound_messages m
    SET status = 'received', worker_id = NULL, claimed_at = NULL, solo = false,
        crashes = m.crashes + CASE WHEN charge THEN 1 ELSE 0 END
    WHERE m.id = p_id AND m.status = 'processing' AND m.worker_id = p_worker
    RETURNING m.id, m.tenant_id, m.suspect
$$;

-- The inbox across tenants for `doctor` and the status page: counts only, no message text.
CREATE FUNCTION konstruct_inbox_health(p_since interval)
RETURNS TABLE (received bigint, processing bigint, suspect bigint, given_up bigint, last_given_up timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT count(*) FILTER (WHERE status = 'received'),
           count(*) FILTER (WHERE status = 'processing'),
           count(*) FILTER (WHERE status IN ('received', 'processing') AND suspect),
           count(*) FILTER (WHERE status = 'failed' AND error LIKE 'gave up%' AND finished_at > now() - p_since),
           max(finished_at) FILTER (WHERE status = 'failed' AND error LIKE 'gave up%')
    FROM inbound_messages
    WHERE status IN ('received', 'processing') OR (status = 'failed' AND finished_at > now() - p_since)
$$;
"""

FUNCTION_NAMES = (
    "konstruct_requeue_stuck(text[], interval, interval, boolean)",
    "konstruct_release_claim(uuid, text, boolean)",
    "konstruct_inbox_health(interval)",
)

OLD_REQUEUE = """
CREATE FUNCTION konstruct_requeue_stuck(dead_workers text[], stale_after interval, received_grace interval)
RETURNS TABLE (id uuid, tenant_id uuid)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH reset AS (
        UPDATE inbound_messages m SET status = 'received', worker_id = NULL, claimed_at = NULL
        WHERE m.status = 'processing'
          AND (m.worker_id = ANY(dead_workers)
               OR NOT EXISTS (SELECT 1 FROM worker_heartbeats h
                              WHERE h.worker_id = m.worker_id AND h.seen_at > now() - stale_after))
        RETURNING m.id, m.tenant_id
    )
    SELECT reset.id, reset.tenant_id FROM reset
    UNION
    SELECT m.id, m.tenant_id FROM inbound_messages m
    WHERE m.status = 'received' AND m.received_at < now() - received_grace
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    op.execute(FUNCTIONS)
    for function in FUNCTION_NAMES:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS " + ", ".join(FUNCTION_NAMES))
    op.execute(OLD_REQUEUE)
    op.execute("REVOKE ALL ON FUNCTION konstruct_requeue_stuck(text[], interval, interval) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION konstruct_requeue_stuck(text[], interval, interval) TO {APP_ROLE}")
    op.execute("ALTER TABLE huey_task DROP COLUMN IF EXISTS inbound_id")
    op.execute("ALTER TABLE inbound_messages DROP COLUMN suspect, DROP COLUMN crashes, DROP COLUMN solo, DROP COLUMN requeued_at")
