"""Bring-your-own LLM keys, usage metering, monthly budgets with reservations, Stripe billing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from alembic import op
from konstruct.migrations.rls import enable_rls

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

DDL = """
-- A tenant's own provider key: only its Fernet token and its last four characters are kept.
CREATE TABLE llm_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    provider text NOT NULL,
    secret bytea NOT NULL,
    hint text NOT NULL,
    api_base text,
    added_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, provider)
);

-- One row per LLM call, failed ones included (cost 0, error set).
CREATE TABLE llm_usage (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id uuid REFERENCES agents(id) ON DELETE SET NULL,
    conversation_id uuid REFERENCES conversations(id) ON DELETE SET NULL,
    purpose text NOT NULL DEFAULT 'reply',
    model text NOT NULL,
    prompt_tokens integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    cost_usd numeric(18, 8) NOT NULL DEFAULT 0,
    latency_ms integer NOT NULL DEFAULT 0,
    key_source text NOT NULL DEFAULT 'platform' CHECK (key_source IN ('tenant', 'platform')),
    error text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_usage_by_time ON llm_usage (tenant_id, created_at);

-- A tenant's monthly spending limit and what happens when it is reached.
CREATE TABLE budgets (
    tenant_id uuid PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    monthly_usd numeric(14, 4) NOT NULL CHECK (monthly_usd >= 0),
    alerts integer[] NOT NULL DEFAULT '{80}',
    action text NOT NULL DEFAULT 'block' CHECK (action IN ('block', 'downgrade')),
    downgrade_model text,
    updated_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- What a tenant spent in one calendar month (UTC), and which alerts went out for it. The row is the
-- lock that makes admission of concurrent calls safe.
CREATE TABLE budget_months (
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    month date NOT NULL,
    spent_usd numeric(18, 8) NOT NULL DEFAULT 0,
    alerts_sent integer[] NOT NULL DEFAULT '{}',
    limit_notified boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, month)
);

-- Estimated cost of calls in flight, held against the budget until the call is accounted. A worker
-- killed mid-call leaves one behind; it stops counting when it expires.
CREATE TABLE budget_reservations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    estimate_usd numeric(18, 8) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX budget_reservations_tenant ON budget_reservations (tenant_id, expires_at);

-- Stripe subscriptions as last decided from their events. `state_at` and `state_rank` order the
-- evidence, so a late or repeated event never moves the state backwards.
CREATE TABLE subscriptions (
    id text PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    customer_id text NOT NULL,
    status text NOT NULL,
    price_id text,
    plan text,
    current_period_end timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    past_due_since timestamptz,
    state_at bigint NOT NULL DEFAULT 0,
    state_rank integer NOT NULL DEFAULT 0,
    last_invoice text,
    details_at bigint NOT NULL DEFAULT 0,   -- details (price, period) and invoices keep their own evidence clocks
    details_rank integer NOT NULL DEFAULT 0,
    invoice_at bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_tenant ON subscriptions (tenant_id);

ALTER TABLE tenants ADD COLUMN contact_email text;
ALTER TABLE tenants ADD COLUMN stripe_customer_id text UNIQUE;
ALTER TABLE tenants ADD COLUMN billing_exempt boolean NOT NULL DEFAULT false;

-- Stripe event ids seen, stored before acting on them: each is processed once. No tenant data.
CREATE TABLE stripe_events (
    id text PRIMARY KEY,
    type text NOT NULL,
    created bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    outcome text
);
"""

FUNCTIONS = """
-- Which tenant a Stripe customer belongs to, before any tenant is known.
CREATE FUNCTION konstruct_tenant_for_customer(p_customer text) RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT t.id FROM tenants t WHERE t.stripe_customer_id = p_customer
$$;
"""

TABLES = ("llm_keys", "llm_usage", "budgets", "budget_months", "budget_reservations", "subscriptions")


def upgrade() -> None:
    op.execute(DDL)
    for table in TABLES:
        enable_rls(op, table)
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")
    # Usage is a record: the app adds rows, never edits them (forgetting a tenant deletes it whole).
    op.execute(f"REVOKE UPDATE ON llm_usage FROM {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON stripe_events TO {APP_ROLE}")
    op.execute(FUNCTIONS)
    op.execute("REVOKE ALL ON FUNCTION konstruct_tenant_for_customer(text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION konstruct_tenant_for_customer(text) TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS konstruct_tenant_for_customer(text)")
    op.execute("DROP TABLE IF EXISTS stripe_events, subscriptions, budget_reservations, budget_months, budgets, llm_usage, llm_keys")
    for column in ("contact_email", "stripe_customer_id", "billing_exempt"):
        op.execute(f"ALTER TABLE tenants DROP COLUMN IF EXISTS {column}")
