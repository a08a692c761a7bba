"""Stripe Checkout and Billing Portal for a tenant (stripe-python's StripeClient; its api base is configurable)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from konstruct import audit
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Tenant
from konstruct.errors import ConfigError, KonstructError, NotFoundError
from konstruct.tenancy.tenants import TenantInfo


class BillingError(KonstructError):
    """Stripe refused or could not be reached; the message says why, without keys."""


def client(settings: Settings) -> Any:
    if not settings.billing.enabled:
        raise ConfigError("billing is off: set [billing] stripe_api_key (and webhook_secret) in konstruct.toml")
    import stripe

    stripe.enable_telemetry = False  # nothing about our requests goes anywhere but the request itself
    key = settings.billing.stripe_api_key.get_secret_value()  # type: ignore[union-attr]
    options: dict[str, Any] = {"max_network_retries": 2}
    if settings.billing.api_base:
        options["base_addresses"] = {"api": settings.billing.api_base.rstrip("/")}
    return stripe.StripeClient(key, **options)


async def _call(settings: Settings, what: str, fn: Any, params: dict[str, Any]) -> Any:
    import stripe

    try:
        return await asyncio.to_thread(fn, params=params)
    except stripe.StripeError as exc:
        key = settings.billing.stripe_api_key.get_secret_value() if settings.billing.stripe_api_key else ""
        message = (getattr(exc, "user_message", None) or str(exc) or type(exc).__name__).replace(key, "****") if key else str(exc)
        raise BillingError(f"Stripe refused to {what}: {' '.join(message.split())[:300]}") from None


@dataclass(frozen=True)
class CheckoutLink:
    url: str
    session_id: str
    customer_id: str


async def customer_for(db: Database, settings: Settings, tenant: TenantInfo, *, actor: str) -> str:
    """The tenant's Stripe customer, created (with the tenant's id in its metadata) on first use."""
    async with db.tenant(tenant_id=tenant.id) as session:
        row = (await session.execute(select(Tenant.stripe_customer_id, Tenant.contact_email).where(Tenant.id == tenant.id))).one()
    if row.stripe_customer_id:
        return str(row.stripe_customer_id)
    api = client(settings)
    params: dict[str, Any] = {"name": tenant.name, "metadata": {"tenant_id": str(tenant.id), "tenant_slug": tenant.slug}}
    if row.contact_email:
        params["email"] = row.contact_email
    customer = await _call(settings, "create a customer", api.v1.customers.create, params)
    async with db.tenant(tenant_id=tenant.id) as session:
        # Another command may have made one meanwhile: keep the first.
        kept = await session.scalar(
            update(Tenant)
            .where(Tenant.id == tenant.id, Tenant.stripe_customer_id.is_(None))
            .values(stripe_customer_id=customer.id)
            .returning(Tenant.stripe_customer_id)
        )
        if kept is None:
            return str(await session.scalar(select(Tenant.stripe_customer_id).where(Tenant.id == tenant.id)))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="billing.customer_created", target=customer.id)
    return str(customer.id)


async def checkout(db: Database, settings: Settings, tenant: TenantInfo, plan_name: str, *, actor: str) -> CheckoutLink:
    api = client(settings)  # billing off is the first thing to say
    plan = settings.billing.plan(plan_name)
    if plan is None:
        names = ", ".join(p.name for p in settings.billing.plans) or "none configured"
        raise NotFoundError(f"no plan {plan_name!r} in [billing] plans (plans: {names})")
    customer = await customer_for(db, settings, tenant, actor=actor)
    base = settings.gateway.public_url.rstrip("/")
    params = {
        "mode": "subscription",
        "customer": customer,
        "line_items": [{"price": plan.price_id, "quantity": 1}],
        "client_reference_id": str(tenant.id),
        "metadata": {"tenant_id": str(tenant.id), "plan": plan.name},
        "subscription_data": {"metadata": {"tenant_id": str(tenant.id), "plan": plan.name}},
        "success_url": f"{base}/?billing=success",
        "cancel_url": f"{base}/?billing=cancelled",
    }
    session = await _call(settings, "start a checkout", api.v1.checkout.sessions.create, params)
    async with db.tenant(tenant_id=tenant.id) as db_session:
        await audit.record(
            db_session, tenant_id=tenant.id, actor=actor, action="billing.checkout_started", target=plan.name,
            detail={"session": session.id, "price": plan.price_id},
        )  # fmt: skip
    return CheckoutLink(str(session.url), str(session.id), customer)


async def portal(db: Database, settings: Settings, tenant: TenantInfo, *, actor: str) -> str:
    async with db.tenant(tenant_id=tenant.id) as session:
        customer = await session.scalar(select(Tenant.stripe_customer_id).where(Tenant.id == tenant.id))
    if not customer:
        raise NotFoundError(
            f"tenant {tenant.slug} has no Stripe customer yet: start with `konstruct billing checkout --tenant {tenant.slug}`"
        )
    params = {"customer": customer, "return_url": settings.gateway.public_url.rstrip("/") + "/"}
    result = await _call(settings, "open the billing portal", client(settings).v1.billing_portal.sessions.create, params)
    async with db.tenant(tenant_id=tenant.id) as session:
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="billing.portal_opened", target=str(customer))
    return str(result.url)
