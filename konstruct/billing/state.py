"""A subscription's state, decided from evidence (Stripe events) by their own timestamps: an event that
arrives late or twice never moves the state backwards, whatever order Stripe delivers in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

# Ties (two events in the same second) go to the later stage of a subscription's life.
RANK = {"incomplete": 1, "trialing": 2, "active": 3, "past_due": 4, "unpaid": 5, "paused": 5, "canceled": 9, "incomplete_expired": 9}
TERMINAL = frozenset({"canceled", "incomplete_expired"})
GOOD = frozenset({"active", "trialing"})


@dataclass(frozen=True)
class SubState:
    status: str
    state_at: int  # the Stripe event time (unix seconds) the status was decided from
    state_rank: int
    price_id: str | None = None
    current_period_end: int | None = None
    cancel_at_period_end: bool = False
    past_due_since: int | None = None
    last_invoice: str | None = None
    # Details and invoices keep their own clocks: an invoice event of the same second as a subscription
    # update must not make the update's details (its new period) look old.
    details_at: int = 0
    details_rank: int = 0
    invoice_at: int = 0


@dataclass(frozen=True)
class Evidence:
    """What one event says about one subscription."""

    at: int
    status: str | None  # None: the event says nothing about the status (only details)
    authoritative: bool = True  # a subscription object (True) or an inference from an invoice or checkout (False)
    price_id: str | None = None
    current_period_end: int | None = None
    cancel_at_period_end: bool | None = None
    invoice: str | None = None
    applies_to: frozenset[str] | None = None  # an inference only moves a status from one of these


def decide(current: SubState | None, ev: Evidence) -> SubState:
    """The state after this evidence. Newer evidence wins; at the same second the later life stage wins;
    a canceled subscription stays canceled."""
    if current is None:
        status = ev.status or "incomplete"
        rank = RANK.get(status, 0)
        return SubState(
            status=status,
            state_at=ev.at,
            state_rank=rank,
            price_id=ev.price_id,
            current_period_end=ev.current_period_end,
            cancel_at_period_end=bool(ev.cancel_at_period_end),
            past_due_since=ev.at if status == "past_due" else None,
            last_invoice=ev.invoice,
            details_at=ev.at if ev.authoritative else 0,
            details_rank=rank if ev.authoritative else 0,
            invoice_at=ev.at if ev.invoice else 0,
        )
    new = current
    rank = RANK.get(ev.status or "", 0)
    newer = (ev.at, rank) > (current.state_at, current.state_rank)
    # Details (price, period) come from subscription objects; the newest of those wins.
    if ev.authoritative and (ev.at, rank) >= (current.details_at, current.details_rank):
        new = replace(
            new,
            price_id=ev.price_id or new.price_id,
            current_period_end=ev.current_period_end or new.current_period_end,
            cancel_at_period_end=new.cancel_at_period_end if ev.cancel_at_period_end is None else ev.cancel_at_period_end,
            details_at=ev.at,
            details_rank=rank,
        )
    if ev.invoice and (ev.at, ev.invoice) >= (current.invoice_at, current.last_invoice or ""):
        new = replace(new, last_invoice=ev.invoice, invoice_at=ev.at)
    if ev.status is None or current.status in TERMINAL or not newer:
        return new
    if ev.applies_to is not None and current.status not in ev.applies_to:
        return new
    past_due_since = current.past_due_since if current.status == "past_due" else ev.at
    return replace(
        new,
        status=ev.status,
        state_at=ev.at,
        state_rank=RANK.get(ev.status, 0),
        past_due_since=past_due_since if ev.status == "past_due" else None,
    )


@dataclass(frozen=True)
class Standing:
    ok: bool
    reason: str
    status: str | None  # the best subscription's status, if any


def standing(subscriptions: list[SubState], *, exempt: bool, grace_days: float, now: datetime | None = None) -> Standing:
    """Whether a tenant's agents may answer: an active or trialing subscription, or past_due within the grace period."""
    if exempt:
        return Standing(True, "exempt from billing", None)
    if not subscriptions:
        return Standing(False, "no subscription", None)
    best = max(subscriptions, key=lambda s: (s.status in GOOD, s.status == "past_due", s.state_at))
    if best.status in GOOD:
        return Standing(True, best.status, best.status)
    if best.status == "past_due":
        now = now or datetime.now(UTC)
        since = datetime.fromtimestamp(best.past_due_since or best.state_at, UTC)
        if now - since < timedelta(days=grace_days):
            return Standing(True, f"past_due since {since:%Y-%m-%d}, within the {grace_days:g}-day grace period", best.status)
        return Standing(False, f"past_due since {since:%Y-%m-%d}, beyond the {grace_days:g}-day grace period", best.status)
    return Standing(False, f"subscription {best.status}", best.status)
