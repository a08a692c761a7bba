"""Stripe webhook events: verified, each id processed once (stored in the same transaction that acts on
it), and turned into subscription state by the events' own timestamps."""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit
from konstruct.billing.standing import row_state
from konstruct.billing.state import Evidence, decide
from konstruct.bodies import parse_json
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import StripeEvent, Subscription, Tenant

log = logging.getLogger("konstruct.billing")

SUBSCRIPTION_STATUSES = frozenset({"incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"})
HANDLED = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
    }
)


class BadSignature(Exception):
    """A webhook whose Stripe-Signature does not verify (answered 400, nothing stored)."""


class NotAnEvent(Exception):
    """A correctly signed body that is not a usable Stripe event (answered 400, nothing stored)."""


# Stripe's ids are short words (evt_…, sub_…, cus_…); anything else is not Stripe's.
_STRIPE_ID = re.compile(r"[A-Za-z0-9_]{1,255}")
_TYPE = re.compile(r"[a-z0-9_.]{1,200}")
_MAX_TS = 2**40  # seconds: far beyond any real timestamp, still a valid datetime and bigint


def _int(value: Any) -> int | None:
    """A timestamp-like integer (Stripe sends seconds), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value) if 0 <= value < _MAX_TS else None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def verify(settings: Settings, payload: bytes, header: str | None) -> dict[str, Any]:
    """The event, if the Stripe-Signature header is valid for this body; BadSignature otherwise."""
    import stripe

    secret = settings.billing.webhook_secret.get_secret_value() if settings.billing.webhook_secret else ""
    if not secret or not header:
        raise BadSignature("missing signature" if secret else "no webhook secret configured")
    if not header.isascii() or len(header) > 2000:
        raise BadSignature("malformed signature header")
    try:
        stripe.WebhookSignature.verify_header(payload.decode("utf-8"), header, secret, settings.billing.tolerance)
    except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise BadSignature(type(exc).__name__) from None
    event = parse_json(payload)
    if not isinstance(event, dict):
        raise NotAnEvent("the body is not a JSON object")
    if _id(event.get("id")) is None or not isinstance(event.get("data"), dict) or not isinstance(event.get("type"), str):
        raise NotAnEvent("not a Stripe event (id, type and data needed)")
    if not _TYPE.fullmatch(event["type"]):
        raise NotAnEvent("not a Stripe event type")
    if not isinstance(event["data"].get("object"), dict):
        raise NotAnEvent("the event has no data.object")
    if event.get("created") is not None and _int(event["created"]) is None:
        raise NotAnEvent("created is not a timestamp")
    return event


def _id(value: Any) -> str | None:
    """An id, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and _STRIPE_ID.fullmatch(value) else None


def _subscription_of_invoice(invoice: dict[str, Any]) -> str | None:
    found = _id(invoice.get("subscription"))
    if found:
        return found
    parent = _obj(invoice.get("parent"))
    return _id(_obj(parent.get("subscription_details")).get("subscription"))


def _price_and_period(sub: dict[str, Any]) -> tuple[str | None, int | None]:
    items = _obj(sub.get("items")).get("data")
    first = _obj(items[0]) if isinstance(items, list) and items else {}
    price = _id(first.get("price")) if first else None
    period = sub.get("current_period_end") or first.get("current_period_end")
    return price, _int(period)


def evidence(event: dict[str, Any]) -> tuple[str | None, str | None, Evidence] | None:
    """(subscription id, customer id, evidence) from one event, or None if it says nothing about a subscription."""
    kind, obj, at = event.get("type"), _obj(event["data"].get("object")), _int(event.get("created")) or 0
    if kind == "checkout.session.completed":
        if obj.get("mode") != "subscription" or not _id(obj.get("subscription")):
            return None
        paid = obj.get("payment_status") in ("paid", "no_payment_required")
        return _id(obj.get("subscription")), _id(obj.get("customer")), Evidence(at, "active" if paid else "incomplete", authoritative=False)
    if kind in ("customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted"):
        price, period = _price_and_period(obj)
        status = "canceled" if kind.endswith("deleted") else obj.get("status") or "incomplete"
        if status not in SUBSCRIPTION_STATUSES:
            return None
        return (
            _id(obj),
            _id(obj.get("customer")),
            Evidence(at, status, price_id=price, current_period_end=period, cancel_at_period_end=bool(obj.get("cancel_at_period_end"))),
        )
    if kind in ("invoice.paid", "invoice.payment_failed"):
        sub = _subscription_of_invoice(obj)
        if not sub:
            return None
        if kind == "invoice.paid":
            ev = Evidence(at, "active", authoritative=False, invoice=_id(obj), applies_to=frozenset({"past_due", "unpaid", "incomplete"}))
        else:
            ev = Evidence(at, "past_due", authoritative=False, invoice=_id(obj), applies_to=frozenset({"active", "trialing"}))
        return sub, _id(obj.get("customer")), ev
    return None


def _tenant_hint(event: dict[str, Any]) -> str | None:
    obj = _obj(event["data"].get("object"))
    hint = _obj(obj.get("metadata")).get("tenant_id") or obj.get("client_reference_id")
    return hint if isinstance(hint, str) else None


async def _resolve_tenant(db: Database, customer: str | None, hint: str | None) -> uuid.UUID | None:
    """The customer we created for a tenant decides; the tenant id in the metadata only if the customer is new to us."""
    async with db.system() as session:
        if customer:
            found = await session.scalar(text("select konstruct_tenant_for_customer(:c)"), {"c": customer})
            if found is not None:
                return uuid.UUID(str(found))
        if hint:
            try:
                candidate = uuid.UUID(hint)
            except ValueError:
                return None
            exists = await session.scalar(text("select count(*) from konstruct_tenant_directory() where id = :id"), {"id": candidate})
            return candidate if exists else None
    return None


@dataclass(frozen=True)
class Outcome:
    status: str  # processed | duplicate | ignored
    detail: str


def _dt(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value and 0 < value < _MAX_TS else None


async def _remember(session: AsyncSession, event: dict[str, Any], outcome: str) -> bool:
    """Store the event id; False if it was stored before (then nothing is done again)."""
    stored = await session.scalar(
        pg_insert(StripeEvent)
        .values(
            id=event["id"],
            type=str(event.get("type"))[:200],
            created=_int(event.get("created")) or 0,
            processed_at=datetime.now(UTC),
            outcome=outcome,
        )
        .on_conflict_do_nothing()
        .returning(StripeEvent.id)
    )
    return stored is not None


async def handle(db: Database, settings: Settings, event: dict[str, Any]) -> Outcome:
    kind = str(event.get("type"))
    found = evidence(event) if kind in HANDLED else None
    if found is None:
        async with db.system() as session:
            new = await _remember(session, event, "ignored")
        return Outcome("ignored" if new else "duplicate", f"{kind}: nothing to do")
    sub_id, customer, ev = found
    tenant_id = await _resolve_tenant(db, customer, _tenant_hint(event))
    if tenant_id is None or sub_id is None:
        async with db.system() as session:
            new = await _remember(session, event, "ignored: unknown customer")
        log.warning("stripe event %s (%s): no tenant for customer %s", event["id"], kind, customer)
        return Outcome("ignored" if new else "duplicate", "no tenant for this customer")
    async with db.tenant(tenant_id=tenant_id) as session:
        if not await _remember(session, event, "processed"):
            return Outcome("duplicate", "seen before")
        if customer:
            await session.execute(
                update(Tenant).where(Tenant.id == tenant_id, Tenant.stripe_customer_id.is_(None)).values(stripe_customer_id=customer)
            )
        await session.execute(
            pg_insert(Subscription)
            .values(id=sub_id, tenant_id=tenant_id, customer_id=customer or "", status="incomplete", state_at=0, state_rank=0)
            .on_conflict_do_nothing()
        )
        row = await session.scalar(select(Subscription).where(Subscription.id == sub_id).with_for_update())
        if row is None:
            # The id belongs to another tenant's subscription: never touch it, and say so once (an error
            # here would only make Stripe retry the same event for days).
            await session.execute(
                update(StripeEvent).where(StripeEvent.id == event["id"]).values(outcome="ignored: subscription of another tenant")
            )
            log.warning("stripe event %s: subscription %s is tied to another tenant; ignored", event["id"], sub_id)
            return Outcome("ignored", "the subscription belongs to another tenant")
        before = row_state(row) if row.state_at else None
        after = decide(before, ev)
        plan = settings.billing.plan_for_price(after.price_id)
        await session.execute(
            update(Subscription)
            .where(Subscription.id == sub_id)
            .values(
                status=after.status, state_at=after.state_at, state_rank=after.state_rank, price_id=after.price_id,
                plan=plan.name if plan else row.plan, current_period_end=_dt(after.current_period_end),
                cancel_at_period_end=after.cancel_at_period_end, past_due_since=_dt(after.past_due_since),
                last_invoice=after.last_invoice, details_at=after.details_at, details_rank=after.details_rank,
                invoice_at=after.invoice_at, updated_at=datetime.now(UTC),
            )
        )  # fmt: skip
        changed = before is None or before.status != after.status
        await audit.record(
            session, tenant_id=tenant_id, actor="stripe", action=f"billing.{kind}", target=sub_id,
            detail={"event": event["id"], "status": after.status, "was": before.status if before else None, "changed": changed},
        )  # fmt: skip
    return Outcome("processed", f"{sub_id}: {after.status}")
