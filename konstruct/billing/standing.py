"""A tenant's billing standing, read from its stored subscriptions: may its agents answer?

The Stripe webhook (billing/events.py) writes the subscriptions; this module only reads them (the
pipeline's billing gate, `konstruct billing status`) and sets a tenant's exemption.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit
from konstruct.billing.state import GOOD, Standing, SubState, standing
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Subscription, Tenant
from konstruct.tenancy.tenants import TenantInfo


def row_state(row: Subscription) -> SubState:
    def ts(value: datetime | None) -> int | None:
        return int(value.timestamp()) if value else None

    return SubState(
        row.status, row.state_at, row.state_rank, row.price_id, ts(row.current_period_end), row.cancel_at_period_end,
        ts(row.past_due_since), row.last_invoice, row.details_at, row.details_rank, row.invoice_at,
    )  # fmt: skip


async def subscriptions(session: AsyncSession) -> list[Subscription]:
    return list((await session.scalars(select(Subscription).order_by(Subscription.state_at.desc()))).all())


async def tenant_standing(session: AsyncSession, settings: Settings, tenant_id: uuid.UUID) -> Standing:
    exempt = bool(await session.scalar(select(Tenant.billing_exempt).where(Tenant.id == tenant_id)))
    rows = await subscriptions(session)
    return standing([row_state(r) for r in rows], exempt=exempt, grace_days=settings.billing.grace_days)


@dataclass(frozen=True)
class BillingStatus:
    tenant: str
    customer: str | None
    exempt: bool
    standing: Standing
    subscriptions: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "customer": self.customer,
            "exempt": self.exempt,
            "agents_running": self.standing.ok,
            "reason": self.standing.reason,
            "subscriptions": self.subscriptions,
        }


async def status(db: Database, settings: Settings, tenant: TenantInfo) -> BillingStatus:
    async with db.tenant(tenant_id=tenant.id) as session:
        row = (await session.execute(select(Tenant.stripe_customer_id, Tenant.billing_exempt).where(Tenant.id == tenant.id))).one()
        rows = await subscriptions(session)
        result = standing([row_state(r) for r in rows], exempt=row.billing_exempt, grace_days=settings.billing.grace_days)
    subs = [
        {
            "id": r.id,
            "status": r.status,
            "plan": r.plan,
            "price_id": r.price_id,
            "current_period_end": r.current_period_end.isoformat() if r.current_period_end else None,
            "cancel_at_period_end": r.cancel_at_period_end,
            "past_due_since": r.past_due_since.isoformat() if r.past_due_since else None,
            "good": r.status in GOOD,
        }
        for r in rows
    ]
    return BillingStatus(tenant.slug, row.stripe_customer_id, row.billing_exempt, result, subs)


async def set_exempt(db: Database, tenant: TenantInfo, exempt: bool, *, actor: str) -> None:
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(update(Tenant).where(Tenant.id == tenant.id).values(billing_exempt=exempt))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="billing.exempt" if exempt else "billing.unexempt",
                           target=tenant.slug)  # fmt: skip
