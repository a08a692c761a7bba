"""Knowledge jobs survive their worker: a job records which worker runs it and when it last showed progress, and the
sweeper puts a job whose worker died (or whose doorbell was lost) back on the queue.

- knowledge_jobs.worker_id / heartbeat_at: the claim, refreshed every worker.heartbeat_interval while the job runs.
- knowledge_jobs.attempts: how many times a worker claimed it; a job whose worker died with worker.max_attempts
  claims spent is failed ("gave up ...") rather than run again (a document that kills its worker).
- knowledge_jobs.requeued_at: when the sweeper last rang for it (a queued job is rung at most once per grace).
- konstruct_requeue_knowledge(): the sweep across tenants (SECURITY DEFINER, as konstruct_requeue_stuck).

Revision ID: 0023
Revises: 0022
"""

from __future__ import annotations

from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"
FUNCTION = "konstruct_requeue_knowledge(text[], interval, interval, integer)"

DDL = """
ALTER TABLE knowledge_jobs
    ADD COLUMN worker_id text,
    ADD COLUMN heartbeat_at timestamptz,
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN requeued_at timestamptz;
CREATE INDEX knowledge_jobs_unfinished ON knowledge_jobs (status) WHERE status IN ('queued', 'running');

-- Knowledge jobs to ring for again (the rule of konstruct_requeue_stuck for inbox rows):
-- * 'running' on a dead worker (its process gone, or its heartbeat older than stale_after) or whose own heartbeat
--   went stale: back to 'queued'; when it already had max_attempts claims it is failed instead;
-- * 'queued' for longer than the grace (its doorbell lost: the queue was down, or the task went with a dead
--   worker): rung again, at most once per grace. A second doorbell is harmless: the claim is exactly-once.
CREATE FUNCTION konstruct_requeue_knowledge(dead_workers text[], stale_after interval, grace interval, max_attempts integer)
RETURNS TABLE (id uuid, tenant_id uuid, status text)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH orphaned AS (
        UPDATE knowledge_jobs j
        SET status = CASE WHEN j.attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
            error = CASE WHEN j.attempts >= max_attempts
                         THEN 'gave up after ' || j.attempts || ' attempts whose worker died before the job finished' END,
            finished_at = CASE WHEN j.attempts >= max_attempts THEN now() END,
            worker_id = NULL, heartbeat_at = NULL, requeued_at = now()
        WHERE j.status = 'running'
          AND (j.worker_id = ANY(dead_workers)
               OR j.heartbeat_at IS NULL OR j.heartbeat_at < now() - stale_after
               OR NOT EXISTS (SELECT 1 FROM worker_heartbeats h
                              WHERE h.worker_id = j.worker_id AND h.seen_at > now() - stale_after))
        RETURNING j.id, j.tenant_id, j.status
    ), lost AS (
        UPDATE knowledge_jobs j SET requeued_at = now()
        WHERE j.status = 'queued' AND j.created_at < now() - grace
          AND (j.requeued_at IS NULL OR j.requeued_at < now() - grace)
        RETURNING j.id, j.tenant_id, j.status
    )
    SELECT * FROM orphaned UNION ALL SELECT * FROM lost
$$;
"""


def upgrade() -> None:
    op.execute(DDL)
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
    op.execute("DROP INDEX IF EXISTS knowledge_jobs_unfinished")
    op.execute("ALTER TABLE knowledge_jobs DROP COLUMN worker_id, DROP COLUMN heartbeat_at, DROP COLUMN attempts, DROP COLUMN requeued_at")
