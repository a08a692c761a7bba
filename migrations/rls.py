"""Row-level security for a table that belongs to a tenant, written once for every migration.

Migrations that already ran on installations import this: never change the DDL it produces (write
a new migration instead), or a fresh database would no longer match an upgraded one.
"""

from __future__ import annotations

from typing import Any

# The tenant of the current transaction (set_config('app.current_tenant', …, true)); NULL when unset,
# so a connection that forgot to set it sees no tenant's rows rather than failing open.
CURRENT_TENANT = "NULLIF(current_setting('app.current_tenant', true), '')::uuid"


def tenant_policy_sql(table: str, column: str = "tenant_id") -> list[str]:
    """The statements that confine `table` to the current tenant's rows (by `column`), for the app role."""
    return [
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {table} USING ({column} = {CURRENT_TENANT}) WITH CHECK ({column} = {CURRENT_TENANT})",
        # The owner role (migrations, the SECURITY DEFINER look-ups) may see every row, as it could by
        # dropping the policy anyway; the app role is not a member of it.
        f"CREATE POLICY owner_access ON {table} TO CURRENT_USER USING (true) WITH CHECK (true)",
    ]


def enable_rls(op: Any, table: str, column: str = "tenant_id") -> None:
    """Run tenant_policy_sql(table, column) through alembic's `op`."""
    for statement in tenant_policy_sql(table, column):
        op.execute(statement)
