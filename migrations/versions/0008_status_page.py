"""The status page: web sessions (by token hash), failed sign-ins for throttling, and two narrow
SECURITY DEFINER read-outs for the platform's health (recent errors, Prometheus metrics).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
-- Signed-in browsers. Only the SHA-256 of the cookie's token is stored. No tenant data.
CREATE TABLE web_sessions (
    token_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    email text NOT NULL,
    csrf text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    impersonating uuid REFERENCES tenants(id) ON DELETE SET NULL,
    impersonation_reason text,
    impersonation_until timestamptz
);
CREATE INDEX web_sessions_user ON web_sessions (user_id);

-- Failed sign-ins, by email and by address, to throttle guessing.
CREATE TABLE login_failures (
    key text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_key ON login_failures (key, failed_at);
"""

FUNCTIONS = """
-- The latest failures across tenants, for the platform's health panel: never message text.
CREATE FUNCTION konstruct_recent_errors(p_limit integer)
RETURNS TABLE (tenant_slug text, at timestamptz, channel text, error text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT t.slug, coalesce(i.finished_at, i.received_at), i.channel, left(i.error, 300)
    FROM inbound_messages i JOIN tenants t ON t.id = i.tenant_id
    WHERE i.status = 'failed' ORDER BY coalesce(i.finished_at, i.received_at) DESC LIMIT p_limit
$$;

-- Installation-wide counters for /metrics: totals only, no tenant's data.
CREATE FUNCTION konstruct_metrics()
RETURNS TABLE (name text, label text, value double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT 'messages_in', channel, count(*)::double precision FROM inbound_messages GROUP BY channel
    UNION ALL
    SELECT 'messages_out', status, count(*)::double precision FROM messages WHERE direction = 'out' GROUP BY status
    UNION ALL
    SELECT 'reply_latency_bucket', b::text, count(*) FILTER (WHERE latency_ms <= b)::double precision
    FROM messages CROSS JOIN unnest(ARRAY[250, 500, 1000, 2000, 5000, 10000, 30000, 60000]) AS b
    WHERE direction = 'out' AND latency_ms IS NOT NULL GROUP BY b
    UNION ALL
    SELECT 'reply_latency_count', '', count(*)::double precision FROM messages WHERE direction = 'out' AND latency_ms IS NOT NULL
    UNION ALL
    SELECT 'reply_latency_sum', '', coalesce(sum(latency_ms), 0) / 1000.0 FROM messages WHERE direction = 'out' AND latency_ms IS NOT NULL
    UNION ALL
    SELECT 'llm_calls', CASE WHEN error IS NULL THEN 'ok' ELSE 'error' END, count(*)::double precision
    FROM llm_usage GROUP BY error IS NULL
    UNION ALL
    SELECT 'llm_cost_usd', '', coalesce(sum(cost_usd), 0)::double precision FROM llm_usage
    UNION ALL
    SELECT 'tenants', status, count(*)::double precision FROM tenants GROUP BY status
    UNION ALL
    SELECT 'workers_alive', '', count(*)::double precision FROM worker_heartbeats WHERE seen_at > now() - interval '1 minute'
$$;
"""

FUNCTION_NAMES = ("konstruct_recent_errors(integer)", "konstruct_metrics()")


def upgrade() -> None:
    op.execute(DDL)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON web_sessions, login_failures TO {APP_ROLE}")
    op.execute(FUNCTIONS)
    for function in FUNCTION_NAMES:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS " + ", ".join(FUNCTION_NAMES))
    op.execute("DROP TABLE IF EXISTS login_failures, web_sessions")
