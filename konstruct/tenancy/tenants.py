"""Tenants: the customer organisations sharing one installation."""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from konstruct import audit
from konstruct.config import did_you_mean
from konstruct.db.engine import Database
from konstruct.db.models import Agent, Conversation, InboundMessage, Tenant
from konstruct.errors import ConflictError, NotFoundError, ValidationError

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class TenantInfo:
    id: uuid.UUID
    slug: str
    name: str
    status: str
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["id"] = str(self.id)
        data["created_at"] = self.created_at.isoformat()
        return data


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63]
    return slug or "tenant"


async def directory(db: Database) -> list[TenantInfo]:
    """Every tenant's routing facts, through the narrow SECURITY DEFINER look-up."""
    async with db.system() as session:
        rows = await session.execute(text("select id, slug, name, status, created_at from konstruct_tenant_directory()"))
        return [TenantInfo(*row) for row in rows]


async def get_tenant(db: Database, slug: str) -> TenantInfo:
    """The tenant with this slug, or NotFoundError saying how to list them."""
    async with db.system() as session:
        row = (
            await session.execute(
                text("select id, slug, name, status, created_at from konstruct_tenant_directory() where slug = :slug"), {"slug": slug}
            )
        ).first()
    if row is None:
        hint = suggestion(slug, [t.slug for t in await directory(db)])
        raise NotFoundError(f"no tenant {slug!r}" + (f"{hint} see" if hint else ": see") + " `konstruct tenant list`")
    return TenantInfo(*row)


def suggestion(slug: str, visible: list[str]) -> str:
    """ " — did you mean 'acme-inc'?" when one of the tenants the caller may see (and only those) is close to
    the slug typed, else ""."""
    match = did_you_mean(slug, [s for s in visible if s != slug])
    return f" — did you mean {match!r}?" if match else ""


def agent_not_found(tenant: TenantInfo, name: str, names: list[str]) -> NotFoundError:
    """ "tenant 'acme-inc' has no agent 'ava' — did you mean 'Ava'? see …", among the tenant's own agents."""
    match = did_you_mean(name, [n for n in names if n != name])
    hint = f" — did you mean {match!r}? see" if match else ": see"
    return NotFoundError(f"tenant {tenant.slug!r} has no agent {name!r}{hint} `konstruct agent list --tenant {tenant.slug}`")


async def create_tenant(db: Database, *, name: str, slug: str | None, actor: str) -> TenantInfo:
    name = name.strip()
    if not name or len(name) > 200:
        raise ValidationError("a tenant name must be 1 to 200 characters")
    slug = slug or slugify(name)
    if not SLUG_RE.match(slug):
        raise ValidationError(f"slug {slug!r} is not valid: use lowercase letters, digits and '-', starting with a letter or digit")
    tenant_id = uuid.uuid4()
    try:
        async with db.tenant(tenant_id=tenant_id) as session:
            await session.execute(insert(Tenant).values(id=tenant_id, slug=slug, name=name))
            await audit.record(session, tenant_id=tenant_id, actor=actor, action="tenant.created", target=slug, detail={"name": name})
    except IntegrityError:
        raise ConflictError(f"a tenant with slug {slug!r} exists already: pick another with --slug") from None
    return await get_tenant(db, slug)


async def set_status(db: Database, slug: str, status: str, *, actor: str) -> TenantInfo:
    tenant = await get_tenant(db, slug)
    if tenant.status != status:
        async with db.tenant(tenant_id=tenant.id) as session:
            await session.execute(update(Tenant).where(Tenant.id == tenant.id).values(status=status, updated_at=func.now()))
            action = "tenant.suspended" if status == "suspended" else "tenant.resumed"
            await audit.record(session, tenant_id=tenant.id, actor=actor, action=action, target=slug)
    return await get_tenant(db, slug)


async def delete_tenant(db: Database, slug: str, *, actor: str) -> TenantInfo:
    """Delete a tenant and all its data; its audit events stay."""
    tenant = await get_tenant(db, slug)
    async with db.tenant(tenant_id=tenant.id) as session:
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="tenant.deleted", target=slug)
        await session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    return tenant


async def tenant_stats(db: Database, tenant: TenantInfo) -> dict[str, int]:
    async with db.tenant(tenant_id=tenant.id) as session:
        agents = await session.scalar(select(func.count()).select_from(Agent))
        conversations = await session.scalar(select(func.count()).select_from(Conversation))
        messages = await session.scalar(select(func.count()).select_from(InboundMessage))
    return {"agents": agents or 0, "conversations": conversations or 0, "inbound_messages": messages or 0}


async def update_settings(
    db: Database,
    tenant: TenantInfo,
    *,
    escalation_target: str | None,
    allowed_hosts: list[str] | None,
    actor: str,
    contact_email: str | None = None,
    name: str | None = None,
) -> dict[str, object]:
    """Where escalations are announced, and which hosts web_fetch may reach. Returns the new values."""
    values: dict[str, object] = {}
    if escalation_target is not None:
        values["escalation_target"] = escalation_target or None
    if allowed_hosts is not None:
        values["allowed_hosts"] = allowed_hosts
    if contact_email is not None:
        contact_email = contact_email.strip()
        if contact_email and not EMAIL_RE.match(contact_email):
            raise ValidationError(f"--contact-email {contact_email!r} is not an email address")
        values["contact_email"] = contact_email or None
    if name is not None and name.strip() and name.strip() != tenant.name:
        if len(name.strip()) > 200:
            raise ValidationError("a tenant name must be 1 to 200 characters")
        values["name"] = name.strip()
    if not values:
        raise ValidationError("nothing to change: pass --escalation-target, --allowed-hosts and/or --contact-email")
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(update(Tenant).where(Tenant.id == tenant.id).values(**values, updated_at=func.now()))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="tenant.updated", target=tenant.slug, detail=values)
    return values


async def tenant_settings(db: Database, tenant: TenantInfo) -> dict[str, Any]:
    """The tenant's own settings: contact email, escalation target, web_fetch hosts."""
    async with db.tenant(tenant_id=tenant.id) as session:
        row = (
            await session.execute(
                select(Tenant.contact_email, Tenant.escalation_target, Tenant.allowed_hosts).where(Tenant.id == tenant.id)
            )
        ).one()
    return {"contact_email": row.contact_email, "escalation_target": row.escalation_target, "allowed_hosts": list(row.allowed_hosts or [])}
