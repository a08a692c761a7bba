"""Hardening with column grants, so the database itself refuses what the app never needs to do:

- audit_events: the app role inserts only an event's content (tenant, actor, action, target, detail); its time
  is the database's (`created_at = now()`, forced by a trigger) and its place in the chain (seq, prev_hash,
  hash) only the sealer's. No pre-sealed or back-dated event.
- users: the app role inserts id, email, name, password_hash and updates only name and updated_at; never
  platform_admin (only the owner role sets it: `konstruct user admin`, `user create --platform-admin`) nor an
  existing password_hash.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"

TRIGGER = """
CREATE FUNCTION konstruct_audit_insert_defaults() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
    NEW.created_at := now();
    NEW.seq := NULL;
    NEW.prev_hash := NULL;
    NEW.hash := NULL;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_events_insert_defaults BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION konstruct_audit_insert_defaults();
"""


def upgrade() -> None:
    op.execute(f"REVOKE INSERT, UPDATE ON users FROM {APP_ROLE}")
    op.execute(f"GRANT INSERT (id, email, name, password_hash) ON users TO {APP_ROLE}")
    op.execute(f"GRANT UPDATE (name, updated_at) ON users TO {APP_ROLE}")
    op.execute(f"REVOKE INSERT ON audit_events FROM {APP_ROLE}")
    op.execute(f"GRANT INSERT (tenant_id, actor, action, target, detail) ON audit_events TO {APP_ROLE}")
    op.execute(TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_events_insert_defaults ON audit_events")
    op.execute("DROP FUNCTION IF EXISTS konstruct_audit_insert_defaults()")
    op.execute(f"REVOKE INSERT (tenant_id, actor, action, target, detail) ON audit_events FROM {APP_ROLE}")
    op.execute(f"GRANT INSERT ON audit_events TO {APP_ROLE}")
    op.execute(f"REVOKE INSERT (id, email, name, password_hash), UPDATE (name, updated_at) ON users FROM {APP_ROLE}")
    op.execute(f"GRANT INSERT, UPDATE ON users TO {APP_ROLE}")
