"""People: users (scrypt password hashes), memberships with a role per tenant, platform admins, and
single-use invitations stored by the SHA-256 of their token.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from alembic import op
from konstruct.migrations.rls import CURRENT_TENANT, enable_rls

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

APP_ROLE = "konstruct_app"
CURRENT_USER = "NULLIF(current_setting('app.current_user', true), '')::uuid"

DDL = f"""
CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL UNIQUE CHECK (email = lower(email)),
    name text NOT NULL DEFAULT '',
    password_hash text,
    platform_admin boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('customer_admin', 'customer_operator')),
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE invitations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    email text NOT NULL CHECK (email = lower(email)),
    role text NOT NULL CHECK (role IN ('customer_admin', 'customer_operator')),
    token_hash bytea NOT NULL UNIQUE,       -- SHA-256 of the token: the token itself is never stored
    expires_at timestamptz NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    accepted_at timestamptz,
    accepted_by uuid REFERENCES users(id) ON DELETE SET NULL,
    revoked_at timestamptz
);
CREATE INDEX invitations_tenant ON invitations (tenant_id, email);

-- A user is visible to themselves (app.current_user) and inside a tenant they belong to.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY self_or_member ON users
    USING (id = {CURRENT_USER}
           OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = users.id AND m.tenant_id = {CURRENT_TENANT}))
    WITH CHECK (id = {CURRENT_USER}
           OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = users.id AND m.tenant_id = {CURRENT_TENANT}));
CREATE POLICY owner_access ON users TO CURRENT_USER USING (true) WITH CHECK (true);
"""

FUNCTIONS = """
-- Who an email is, before any tenant is known (sign-in, --as). Only what authentication needs.
CREATE FUNCTION konstruct_user_by_email(p_email text)
RETURNS TABLE (id uuid, email text, name text, password_hash text, platform_admin boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT u.id, u.email, u.name, u.password_hash, u.platform_admin FROM users u WHERE u.email = lower(p_email)
$$;

-- The tenants a user belongs to, with the role in each.
CREATE FUNCTION konstruct_user_memberships(p_user uuid)
RETURNS TABLE (tenant_id uuid, role text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT m.tenant_id, m.role FROM memberships m WHERE m.user_id = p_user
$$;

-- Which tenant an invitation token belongs to (by its hash), before any tenant is known.
CREATE FUNCTION konstruct_invitation_tenant(p_token_hash bytea) RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT i.tenant_id FROM invitations i WHERE i.token_hash = p_token_hash
$$;

-- Every user, for platform admins (the CLI checks the caller's role before it asks).
CREATE FUNCTION konstruct_user_directory()
RETURNS TABLE (id uuid, email text, name text, platform_admin boolean, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT u.id, u.email, u.name, u.platform_admin, u.created_at FROM users u ORDER BY u.email
$$;
"""

FUNCTION_NAMES = (
    "konstruct_user_by_email(text)",
    "konstruct_user_memberships(uuid)",
    "konstruct_invitation_tenant(bytea)",
    "konstruct_user_directory()",
)


def upgrade() -> None:
    op.execute(DDL)
    for table in ("memberships", "invitations"):
        enable_rls(op, table)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON users, memberships, invitations TO {APP_ROLE}")
    op.execute(FUNCTIONS)
    for function in FUNCTION_NAMES:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS " + ", ".join(FUNCTION_NAMES))
    op.execute("DROP TABLE IF EXISTS invitations, memberships, users")
