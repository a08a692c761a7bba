"""Monthly budgets: admission before each LLM call (with an estimate held as a reservation) and
accounting after it, safe under any number of concurrent workers.

Why a tenant cannot overshoot by more than one call: a call is admitted only while
``spent + reserved < limit``, where ``reserved`` holds an upper-bound estimate of every call in
flight, and admission takes the tenant's month row lock. Every admitted call but the last one
therefore fits under the limit; only the last can cross it. The admission and the accounting themselves are
konstruct.llm.ledger's (the calls of a tenant asking or finishing together are handled together).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Budget, BudgetMonth, BudgetReservation, Subscription
from konstruct.errors import NotFoundError, ValidationError
from konstruct.tenancy.tenants import TenantInfo

ACTIONS = ("block", "downgrade")


def this_month(now: datetime | None = None) -> date:
    now = now or datetime.now(UTC)
    return date(now.year, now.month, 1)


@dataclass(frozen=True)
class BudgetInfo:
    monthly_usd: Decimal | None  # the effective limit (own budget, capped by the plan's); None: unlimited
    own_usd: Decimal | None
    plan_usd: Decimal | None
    alerts: list[int]
    action: str
    downgrade_model: str | None
    month: date
    spent_usd: Decimal
    reserved_usd: Decimal
    alerts_sent: list[int]

    @property
    def used_percent(self) -> float | None:
        if not self.monthly_usd:
            return None
        return float(self.spent_usd / self.monthly_usd * 100)

    def as_json(self) -> dict[str, Any]:
        def money(value: Decimal | None) -> float | None:
            return None if value is None else float(value)

        return {
            "monthly_usd": money(self.monthly_usd),
            "own_usd": money(self.own_usd),
            "plan_usd": money(self.plan_usd),
            "alerts": self.alerts,
            "action": self.action,
            "downgrade_model": self.downgrade_model,
            "month": self.month.isoformat(),
            "spent_usd": money(self.spent_usd),
            "reserved_usd": money(self.reserved_usd),
            "used_percent": None if self.used_percent is None else round(self.used_percent, 2),
            "alerts_sent": self.alerts_sent,
        }


@dataclass(frozen=True)
class Limit:
    """What admission needs: the effective monthly limit and what to do at it."""

    monthly_usd: Decimal
    alerts: list[int]
    action: str
    downgrade_model: str | None


async def plan_budget(session: AsyncSession, settings: Settings) -> Decimal | None:
    """The monthly budget included in the current tenant's active plan, if billing is on and it has one."""
    if not settings.billing.enabled:
        return None
    prices = (await session.scalars(select(Subscription.price_id).where(Subscription.status.in_(LIVE_SUBSCRIPTIONS)))).all()
    return plan_budget_of(settings, [price for price in prices if price])


LIVE_SUBSCRIPTIONS = ("active", "trialing", "past_due")


def plan_budget_of(settings: Settings, prices: list[str]) -> Decimal | None:
    """The largest monthly budget the plans of these subscription prices include."""
    budgets = [Decimal(str(plan.budget_usd)) for price in prices if (plan := settings.billing.plan_for_price(price)) and plan.budget_usd]
    return max(budgets) if budgets else None


def limit_of(own: tuple[Decimal, list[int], str, str | None] | None, plan: Decimal | None) -> Limit | None:
    """The effective limit: the tenant's own budget (monthly_usd, alerts, action, downgrade_model), capped by its plan's."""
    if own is None and plan is None:
        return None
    limits = [value for value in (own[0] if own else None, plan) if value is not None]
    return Limit(
        monthly_usd=min(limits),
        alerts=list(own[1]) if own else [80],
        action=own[2] if own else "block",
        downgrade_model=own[3] if own else None,
    )


@dataclass(frozen=True)
class Admission:
    allowed: bool
    reservation: uuid.UUID | None = None
    over_limit: bool = False  # the limit is reached: the caller applies the action
    first_time: bool = False  # the first refusal this month (notify the operator once)


def check_alerts(alerts: list[int]) -> list[int]:
    cleaned = sorted(set(alerts))
    if any(not 1 <= p <= 100 for p in cleaned):
        raise ValidationError("alert thresholds are percentages from 1 to 100, e.g. --alert 50 --alert 80")
    return cleaned


async def set_budget(
    db: Database,
    tenant: TenantInfo,
    *,
    usd: float,
    alerts: list[int],
    action: str,
    downgrade_model: str | None,
    settings: Settings,
    actor: str,
) -> BudgetInfo:
    if usd < 0 or usd > 10_000_000:
        raise ValidationError("--usd must be between 0 and 10,000,000")
    if action not in ACTIONS:
        raise ValidationError(f"--action must be one of {', '.join(ACTIONS)}")
    if action == "downgrade" and not (downgrade_model or settings.budget.downgrade_model):
        raise ValidationError("--action downgrade needs a cheaper model: pass --downgrade-model or set [budget] downgrade_model")
    alerts = check_alerts(alerts)
    values = {"monthly_usd": Decimal(str(usd)), "alerts": alerts, "action": action, "downgrade_model": downgrade_model, "updated_by": actor}
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(
            pg_insert(Budget)
            .values(tenant_id=tenant.id, **values)
            .on_conflict_do_update(index_elements=[Budget.tenant_id], set_={**values, "updated_at": func.now()})
        )
        await audit.record(
            session, tenant_id=tenant.id, actor=actor, action="budget.set", target=tenant.slug,
            detail={"monthly_usd": usd, "alerts": alerts, "action": action, "downgrade_model": downgrade_model},
        )  # fmt: skip
    return await get_budget(db, tenant, settings)


async def clear_budget(db: Database, tenant: TenantInfo, *, actor: str) -> None:
    async with db.tenant(tenant_id=tenant.id) as session:
        removed = await session.scalar(delete(Budget).returning(Budget.tenant_id))
        if removed is None:
            raise NotFoundError(f"tenant {tenant.slug} has no budget")
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="budget.cleared", target=tenant.slug)


async def get_budget(db: Database, tenant: TenantInfo, settings: Settings) -> BudgetInfo:
    month = this_month()
    async with db.tenant(tenant_id=tenant.id) as session:
        own = await session.scalar(select(Budget))
        plan = await plan_budget(session, settings)
        row = (await session.execute(select(BudgetMonth.spent_usd, BudgetMonth.alerts_sent).where(BudgetMonth.month == month))).first()
        reserved = await session.scalar(
            select(func.coalesce(func.sum(BudgetReservation.estimate_usd), 0)).where(BudgetReservation.expires_at > func.now())
        )
    limits = [value for value in (own.monthly_usd if own else None, plan) if value is not None]
    return BudgetInfo(
        monthly_usd=min(limits) if limits else None,
        own_usd=own.monthly_usd if own else None,
        plan_usd=plan,
        alerts=list(own.alerts) if own else ([80] if plan else []),
        action=own.action if own else "block",
        downgrade_model=own.downgrade_model if own else None,
        month=month,
        spent_usd=row.spent_usd if row else Decimal(0),
        reserved_usd=Decimal(reserved or 0),
        alerts_sent=list(row.alerts_sent) if row else [],
    )
