"""Audit chain sealed after the fact, not by an insert trigger.

0004 chained every event as it was inserted, under a per-tenant lock held until commit. That put every
webhook of one tenant in single file behind the previous one's commit (p99 near a second at 200/s). Now
events are inserted plainly and a sealer links them into the chain in the order it finds them: the worker
seals every minute, and `audit verify|tail|export` seal first. Sealing only fills seq, prev_hash and hash
of unsealed rows; the append-only trigger still refuses every other change.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

SEALING = """
DROP TRIGGER audit_events_chain ON audit_events;
DROP FUNCTION konstruct_audit_chain();
ALTER TABLE audit_events ALTER COLUMN seq DROP NOT NULL, ALTER COLUMN hash DROP NOT NULL;
CREATE INDEX audit_events_unsealed ON audit_events (tenant_id, id) WHERE seq IS NULL;

-- Append-only, except that an unsealed event may be sealed once (its chain fields set, nothing else).
CREATE OR REPLACE FUNCTION konstruct_reject_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.seq IS NULL AND NEW.seq IS NOT NULL AND NEW.hash IS NOT NULL
       AND NEW.id = OLD.id AND NEW.tenant_id = OLD.tenant_id AND NEW.actor = OLD.actor AND NEW.action = OLD.action
       AND NEW.target IS NOT DISTINCT FROM OLD.target AND NEW.detail = OLD.detail AND NEW.created_at = OLD.created_at THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Link a tenant's unsealed events into its chain, oldest first; returns how many. One sealer per tenant at
-- a time (the lock), and only it ever writes the chain fields.
CREATE FUNCTION konstruct_audit_seal(p_tenant uuid) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    e record;
    last_seq bigint;
    last_hash bytea;
    sealed integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('audit:' || p_tenant::text));
    SELECT a.seq, a.hash INTO last_seq, last_hash FROM audit_events a
        WHERE a.tenant_id = p_tenant AND a.seq IS NOT NULL ORDER BY a.seq DESC LIMIT 1;
    last_seq := coalesce(last_seq, 0);
    FOR e IN SELECT * FROM audit_events a WHERE a.tenant_id = p_tenant AND a.seq IS NULL ORDER BY a.id LOOP
        last_seq := last_seq + 1;
        UPDATE audit_events SET seq = last_seq, prev_hash = last_hash,
            hash = konstruct_audit_hash(last_hash, e.tenant_id, last_seq, e.actor, e.action, e.target, e.detail, e.created_at)
        WHERE id = e.id RETURNING hash INTO last_hash;
        sealed := sealed + 1;
    END LOOP;
    RETURN sealed;
END
$$;

CREATE FUNCTION konstruct_audit_seal_all() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    t uuid;
    sealed integer := 0;
BEGIN
    FOR t IN SELECT DISTINCT a.tenant_id FROM audit_events a WHERE a.seq IS NULL LOOP
        sealed := sealed + konstruct_audit_seal(t);
    END LOOP;
    RETURN sealed;
END
$$;
"""


def upgrade() -> None:
    op.execute(SEALING)
    for function in ("konstruct_audit_seal(uuid)", "konstruct_audit_seal_all()"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


ORIGINAL_REJECT = """
CREATE OR REPLACE FUNCTION konstruct_reject_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
"""


def downgrade() -> None:
    # Seal what is pending, then go back to chaining on insert (0004's trigger function).
    op.execute("SELECT konstruct_audit_seal_all()")
    op.execute("DROP FUNCTION konstruct_audit_seal_all(), konstruct_audit_seal(uuid)")
    op.execute("DROP INDEX IF EXISTS audit_events_unsealed")
    op.execute(ORIGINAL_REJECT)
    op.execute("ALTER TABLE audit_events ALTER COLUMN seq SET NOT NULL, ALTER COLUMN hash SET NOT NULL")
    spec = importlib.util.spec_from_file_location("brain_0004", Path(__file__).with_name("0004_brain.py"))
    assert spec is not None and spec.loader is not None
    brain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(brain)
    marker = "CREATE FUNCTION konstruct_audit_chain()"
    op.execute(marker + brain.CHAIN.split(marker, 1)[1])  # the trigger function only (the hash function is still there)
    op.execute("CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION konstruct_audit_chain()")
