"""Who may do what: the permission check every CLI command and status page makes before it acts.

Three roles (DESIGN.md): platform_admin (everything, every tenant), customer_admin (its own tenant:
agents, channels, keys, budgets, billing, invitations, users) and customer_operator (its own tenant:
read agents and usage, test an agent, handle escalated conversations, decide tool approvals). The local operator who owns the
installation is a platform admin; `--as EMAIL` acts with exactly that user's permissions. Row-level
security backs this up: a tenant's rows are only ever read inside that tenant's transaction.
"""

from __future__ import annotations

import getpass
import uuid
from dataclasses import dataclass, field

from sqlalchemy import text

from konstruct.db.engine import Database
from konstruct.errors import NotFoundError, PermissionDenied
from konstruct.tenancy.tenants import TenantInfo, directory, get_tenant, suggestion

ADMIN, OPERATOR = "customer_admin", "customer_operator"
ROLES = (ADMIN, OPERATOR)

# Operation -> the customer roles allowed it on their own tenant. Platform admins may do everything;
# an operation missing here is platform-only.
TENANT_OPERATIONS: dict[str, frozenset[str]] = {
    "tenant.read": frozenset({ADMIN, OPERATOR}),
    "tenant.configure": frozenset({ADMIN}),
    "agent.read": frozenset({ADMIN, OPERATOR}),
    "agent.write": frozenset({ADMIN}),
    "agent.test": frozenset({ADMIN, OPERATOR}),
    "channel.read": frozenset({ADMIN}),
    "channel.write": frozenset({ADMIN}),
    "key.read": frozenset({ADMIN}),
    "key.write": frozenset({ADMIN}),
    "usage.read": frozenset({ADMIN, OPERATOR}),
    "budget.read": frozenset({ADMIN, OPERATOR}),
    "budget.write": frozenset({ADMIN}),
    "billing.read": frozenset({ADMIN}),
    "billing.write": frozenset({ADMIN}),
    "user.read": frozenset({ADMIN}),
    "user.write": frozenset({ADMIN}),
    "invite.read": frozenset({ADMIN}),
    "invite.write": frozenset({ADMIN}),
    "conversation.read": frozenset({ADMIN, OPERATOR}),
    "conversation.handle": frozenset({ADMIN, OPERATOR}),
    "approval.read": frozenset({ADMIN, OPERATOR}),
    "approval.decide": frozenset({ADMIN, OPERATOR}),  # a tool call waiting for a human's approval
    "escalation.test": frozenset({ADMIN, OPERATOR}),
    "knowledge.read": frozenset({ADMIN, OPERATOR}),
    "knowledge.write": frozenset({ADMIN}),
    "memory.read": frozenset({ADMIN}),
    "memory.forget": frozenset({ADMIN}),
    "audit.read": frozenset({ADMIN}),
    "status.view": frozenset({ADMIN, OPERATOR}),
    "mcp.read": frozenset({ADMIN}),
    "mcp.write": frozenset({ADMIN}),
}
PLATFORM_OPERATIONS = frozenset(
    {
        "tenant.create",  # a new customer
        "tenant.suspend",  # suspend / resume
        "tenant.delete",
        "billing.exempt",
        "secrets.rotate",
        "user.admin",  # create users, grant or revoke platform admin
        "impersonate",
        "apply",  # declarative apply across tenants
        "installation",  # run, configure and migrate the installation itself
        "mcp.stdio",  # an MCP server the worker runs as a command
    }
)
OPERATIONS = frozenset(TENANT_OPERATIONS) | PLATFORM_OPERATIONS


@dataclass(frozen=True)
class Principal:
    """Who is acting: the local operator, or a user (with their memberships)."""

    name: str  # for the audit log: operator:unix-user or user:email
    platform_admin: bool
    user_id: uuid.UUID | None = None
    email: str | None = None
    roles: dict[uuid.UUID, str] = field(default_factory=dict)  # tenant id -> role

    def can(self, operation: str, tenant_id: uuid.UUID | None = None) -> bool:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")  # a bug: every operation is declared above
        if self.platform_admin:
            return True
        if operation in PLATFORM_OPERATIONS or tenant_id is None:
            return False
        role = self.roles.get(tenant_id)
        return role is not None and role in TENANT_OPERATIONS[operation]

    def require(self, operation: str, tenant: TenantInfo | None = None) -> None:
        if self.can(operation, tenant.id if tenant else None):
            return
        who = self.email or self.name
        if tenant is None:
            raise PermissionDenied(f"{who} may not do {operation}: only a platform admin may")
        role = self.roles.get(tenant.id)
        if role is None:
            raise PermissionDenied(f"{who} has no role in tenant {tenant.slug}")
        raise PermissionDenied(f"{who} is {role} of {tenant.slug} and may not do {operation}")


def local_operator() -> Principal:
    """The person at the installation's own CLI: a platform admin."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return Principal(name=f"operator:{user}", platform_admin=True)


async def principal_for(db: Database, email: str) -> Principal:
    """The user with this email, with their memberships; NotFoundError for an unknown one."""
    async with db.system() as session:
        row = (
            await session.execute(text("select id, email, platform_admin from konstruct_user_by_email(:e)"), {"e": email.strip()})
        ).first()
        if row is None:
            raise NotFoundError(f"no user {email.strip().lower()!r}: see `konstruct user list`, or invite them first")
        memberships = await session.execute(text("select tenant_id, role from konstruct_user_memberships(:u)"), {"u": row.id})
        roles = {tenant_id: role for tenant_id, role in memberships}
    return Principal(name=f"user:{row.email}", platform_admin=row.platform_admin, user_id=row.id, email=row.email, roles=roles)


async def tenant(db: Database, principal: Principal, slug: str, operation: str) -> TenantInfo:
    """The tenant named by slug, if the principal may do this operation on it. A tenant the principal
    has no role in is reported like a missing one, so customers cannot probe for other tenants."""
    try:
        found = await get_tenant(db, slug)
    except NotFoundError:
        if principal.platform_admin:
            raise
        found = None
    if found is None or (not principal.platform_admin and found.id not in principal.roles):
        # Missing or not theirs: the same words either way; a suggestion only among the caller's own tenants.
        theirs = [t.slug for t in await directory(db) if t.id in principal.roles]
        raise PermissionDenied(f"{principal.email or principal.name} has no role in tenant {slug}{suggestion(slug, theirs)}")
    principal.require(operation, found)
    return found


async def tenants(db: Database, principal: Principal, operation: str) -> list[TenantInfo]:
    """Every tenant the principal may do this operation on (all of them, for a platform admin)."""
    return [t for t in await directory(db) if principal.can(operation, t.id)]
