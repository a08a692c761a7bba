"""The LLM service's bookkeeping on the driver's connection, in as few round trips as it takes.

Before a call: the tenant's keys and its effective budget in one statement (`terms`). After it: its usage row, its
cost added to the month, its reservation released, the alerts it crossed and, for a failure, its audit event (`Ledger`).
Calls of one tenant that finish together are accounted together (konstruct.db.batches): the month row is the lock that
keeps admission safe, and held once per batch for one commit instead of once per call, it no longer serialises a
tenant's calls at one WAL flush each. Each caller still returns only once its row is committed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from konstruct.config import Settings
from konstruct.db.batches import Batches, per_database
from konstruct.db.engine import Database
from konstruct.llm import budget
from konstruct.llm.keys import TenantKey, keys_of

# One row per key (one row when there is none), each with the tenant's own budget and its live plans' prices.
_TERMS = """
SELECT k.provider, k.secret, k.api_base, b.monthly_usd, b.alerts, b.action, b.downgrade_model,
       CASE WHEN $1::boolean THEN ARRAY(SELECT price_id FROM subscriptions WHERE status = ANY($2::text[])) END AS prices
FROM (SELECT 1) AS one LEFT JOIN budgets b ON true LEFT JOIN llm_keys k ON true
"""


async def terms(db: Database, settings: Settings, tenant_id: uuid.UUID) -> tuple[dict[str, TenantKey], budget.Limit | None]:
    """The tenant's keys (decrypted) and its effective monthly limit (own budget capped by its plan's), or None."""
    async with db.tenant_driver(tenant_id=tenant_id) as conn:
        rows = await conn.fetch(_TERMS, settings.billing.enabled, list(budget.LIVE_SUBSCRIPTIONS))
    first = rows[0]
    keys = keys_of(settings, [(r["provider"], r["secret"], r["api_base"]) for r in rows if r["provider"] is not None])
    own = (
        (first["monthly_usd"], list(first["alerts"]), first["action"], first["downgrade_model"])
        if first["monthly_usd"] is not None
        else None
    )
    plan = budget.plan_budget_of(settings, [p for p in first["prices"] if p]) if first["prices"] is not None else None
    return keys, budget.limit_of(own, plan)


@dataclass(frozen=True)
class Entry:
    """One finished (or failed) call, as it is accounted."""

    tenant_id: uuid.UUID
    agent_id: uuid.UUID | None
    conversation_id: uuid.UUID | None
    purpose: str
    actor: str
    model: str
    key_source: str
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    latency_ms: int
    reservation: uuid.UUID | None
    limit: budget.Limit | None
    error: str | None = None


# The usage rows, the reservations released, the failures' audit events and the month's spending, in one statement.
# $1 tenant; usage columns $2..$11; $12 reservations; $13 month; $14 the batch's cost; failures $15 actor, $16 model, $17 detail.
_ACCOUNT = """
WITH usage AS (
    INSERT INTO llm_usage (tenant_id, agent_id, conversation_id, purpose, model, prompt_tokens, completion_tokens, cost_usd,
                           latency_ms, key_source, error)
    SELECT $1::uuid, u.* FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int[], $7::int[], $8::numeric[], $9::int[],
                                     $10::text[], $11::text[]) AS u
), released AS (
    DELETE FROM budget_reservations WHERE id = ANY($12::uuid[])
), failed AS (
    INSERT INTO audit_events (tenant_id, actor, action, target, detail)
    SELECT $1::uuid, f.actor, 'llm.failed', f.model, f.detail::jsonb FROM unnest($15::text[], $16::text[], $17::text[]) AS f(actor, model, detail)
)
INSERT INTO budget_months (tenant_id, month, spent_usd) VALUES ($1::uuid, $13::date, $14::numeric)
ON CONFLICT (tenant_id, month) DO UPDATE SET spent_usd = budget_months.spent_usd + EXCLUDED.spent_usd
RETURNING spent_usd, alerts_sent
"""
_ALERTS_SENT = "UPDATE budget_months SET alerts_sent = array_cat(alerts_sent, $1::int[]) WHERE month = $2::date"
_ALERT = (
    "INSERT INTO audit_events (tenant_id, actor, action, target, detail) "
    "VALUES ($1::uuid, 'konstruct', 'budget.alert', $2::text, $3::text::jsonb)"
)


def crossed_alerts(entries: list[Entry], spent_after: Decimal, alerts_sent: list[int]) -> list[list[int]]:
    """The alert thresholds each call crossed for the first time this month, the calls taken in order (each threshold
    handed to exactly one of them)."""
    running = spent_after - sum((e.cost for e in entries), Decimal(0))
    sent = set(alerts_sent)
    out: list[list[int]] = []
    for entry in entries:
        running += entry.cost
        limit = entry.limit
        if limit is None or not limit.monthly_usd:
            out.append([])
            continue
        used = running / limit.monthly_usd * 100
        crossed = sorted(p for p in {*limit.alerts, 100} if used >= p and p not in sent)
        sent.update(crossed)
        out.append(crossed)
    return out


@dataclass(frozen=True)
class Request:
    """A call asking to be admitted: its estimate held against the limit for `hold` seconds at most."""

    tenant_id: uuid.UUID
    limit: budget.Limit
    estimate: Decimal
    hold: float


# Admission, in three statements because the second must see what committed while the first waited for the lock: the
# month row locked (created if need be), then the reservations of the calls in flight (expired ones dropped), then the
# new reservations. One statement would read the reservations from a snapshot taken before the lock wait.
_LOCK_MONTH = """
INSERT INTO budget_months (tenant_id, month) VALUES ($1::uuid, $2::date)
ON CONFLICT (tenant_id, month) DO UPDATE SET limit_notified = budget_months.limit_notified
RETURNING spent_usd, limit_notified
"""
_RESERVED = """
WITH expired AS (DELETE FROM budget_reservations WHERE expires_at < $1::timestamptz)
SELECT coalesce(sum(estimate_usd), 0) FROM budget_reservations WHERE expires_at >= $1::timestamptz
"""
_RESERVE = """
INSERT INTO budget_reservations (id, tenant_id, estimate_usd, expires_at)
SELECT r.id, $1::uuid, r.estimate, r.expires FROM unnest($2::uuid[], $3::numeric[], $4::timestamptz[]) AS r(id, estimate, expires)
"""
_NOTIFIED = "UPDATE budget_months SET limit_notified = true WHERE month = $1::date"
_REFUSED = "UPDATE budget_months SET limit_notified = true WHERE month = $1::date AND NOT limit_notified RETURNING tenant_id"
_EXHAUSTED = (
    "INSERT INTO audit_events (tenant_id, actor, action, target, detail) "
    "VALUES ($1::uuid, 'konstruct', 'budget.exhausted', $2::text, $3::text::jsonb)"
)


class Ledger:
    """The admission and accounting writers of one database's connections in this process."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._accounts: Batches[Entry, list[int]] = Batches(self.write, key=lambda e: e.tenant_id, what="LLM calls")
        self._admissions: Batches[Request, budget.Admission] = Batches(self.admit_all, key=lambda r: r.tenant_id, what="admissions")

    async def admit(self, request: Request) -> budget.Admission:
        """Reserve the estimate if the tenant is still under its limit (spent + held by calls in flight < limit).
        Committed before this returns, with the admissions of the tenant's other calls asking at the same time."""
        return await self._admissions.submit(request)

    async def admit_all(self, requests: list[Request]) -> list[budget.Admission]:
        """One tenant's requests, in order, under one hold of its month row: every admitted call but the last fits under
        the limit, as when they are admitted one by one."""
        tenant_id, month, now = requests[0].tenant_id, budget.this_month(), datetime.now(UTC)
        out: list[budget.Admission] = []
        async with self.db.tenant_driver(tenant_id=tenant_id) as conn:
            row = await conn.fetchrow(_LOCK_MONTH, tenant_id, month)
            assert row is not None
            spent, notified = row["spent_usd"], row["limit_notified"]
            reserved = await conn.fetchval(_RESERVED, now)
            held: list[tuple[uuid.UUID, Decimal, datetime]] = []
            first: budget.Limit | None = None
            for request in requests:
                if spent + reserved < request.limit.monthly_usd:
                    reservation = uuid.uuid4()
                    held.append((reservation, request.estimate, now + timedelta(seconds=request.hold)))
                    reserved += request.estimate
                    out.append(budget.Admission(True, reservation))
                    continue
                over = spent >= request.limit.monthly_usd
                first_time = over and not notified and first is None
                if first_time:
                    first = request.limit
                out.append(budget.Admission(False, over_limit=over, first_time=first_time))
            if held:
                await conn.execute(_RESERVE, tenant_id, *(list(column) for column in zip(*held, strict=True)))
            if first is not None:
                await conn.execute(_NOTIFIED, month)
                await _audit_exhausted(conn, tenant_id, first)
        return out

    async def refused(self, tenant_id: uuid.UUID, limit: budget.Limit) -> bool:
        """A call refused after all (its wait for the calls in flight to leave room ran out): True the first time this
        month, like an admission's first_time, so the operator hears once that the agents stopped (audited here)."""
        async with self.db.tenant_driver(tenant_id=tenant_id) as conn:
            first = await conn.fetchval(_REFUSED, budget.this_month()) is not None
            if first:
                await _audit_exhausted(conn, tenant_id, limit)
        return first

    async def account(self, entry: Entry) -> list[int]:
        """Record one call, committed before this returns; the alert thresholds it crossed for the first time this month."""
        return await self._accounts.submit(entry)

    async def write(self, entries: list[Entry]) -> list[list[int]]:
        tenant_id, month = entries[0].tenant_id, budget.this_month()
        failures = [e for e in entries if e.error is not None]
        async with self.db.tenant_driver(tenant_id=tenant_id) as conn:
            row = await conn.fetchrow(
                _ACCOUNT, tenant_id,
                [e.agent_id for e in entries], [e.conversation_id for e in entries], [e.purpose for e in entries],
                [e.model for e in entries], [e.prompt_tokens for e in entries], [e.completion_tokens for e in entries],
                [e.cost for e in entries], [e.latency_ms for e in entries], [e.key_source for e in entries],
                [e.error for e in entries], [e.reservation for e in entries if e.reservation is not None], month,
                sum((e.cost for e in entries), Decimal(0)),
                [e.actor for e in failures], [e.model for e in failures], [json.dumps(_failure_detail(e)) for e in failures],
            )  # fmt: skip
            assert row is not None
            crossed = crossed_alerts(entries, row["spent_usd"], list(row["alerts_sent"]))
            new = sorted({p for each in crossed for p in each})
            if new:  # the month row is locked by the upsert until commit: no other batch sees these as unsent
                await conn.execute(_ALERTS_SENT, new, month)
                for entry, percents in zip(entries, crossed, strict=True):
                    monthly = float(entry.limit.monthly_usd) if entry.limit else None
                    for percent in percents:
                        await conn.execute(_ALERT, tenant_id, f"{percent}%", json.dumps({"percent": percent, "monthly_usd": monthly}))
        return crossed


async def _audit_exhausted(conn: asyncpg.Connection, tenant_id: uuid.UUID, limit: budget.Limit) -> None:
    await conn.execute(_EXHAUSTED, tenant_id, limit.action, json.dumps({"monthly_usd": float(limit.monthly_usd), "action": limit.action}))


def _failure_detail(entry: Entry) -> dict[str, str | None]:
    return {
        "error": entry.error,
        "key": entry.key_source,
        "purpose": entry.purpose,
        "conversation_id": str(entry.conversation_id) if entry.conversation_id else None,
    }


ledger = per_database(Ledger)  # ledger(db): the accounting writer of this database's connections
