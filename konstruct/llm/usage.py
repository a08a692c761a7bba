"""Usage reports over the metered LLM calls: grouped by model, agent, day or tenant, with daily totals."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Date, cast, func, literal, select

from konstruct.db.engine import Database
from konstruct.db.models import Agent, LLMUsage
from konstruct.errors import ValidationError
from konstruct.tenancy.tenants import TenantInfo

GROUPS = ("model", "agent", "day", "tenant")
_SINCE_RE = re.compile(r"^(\d{1,4})([hdw])$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """'30d', '12h', '2w' back from now, or a date 'YYYY-MM-DD' (UTC)."""
    now = now or datetime.now(UTC)
    value = value.strip().lower()
    match = _SINCE_RE.match(value)
    if match:
        amount, unit = int(match[1]), match[2]
        return now - {"h": timedelta(hours=amount), "d": timedelta(days=amount), "w": timedelta(weeks=amount)}[unit]
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ValidationError(f"--since {value!r}: use a span like 30d, 12h, 2w or a date like 2026-11-01") from None


@dataclass
class UsageRow:
    key: str
    calls: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    latency_ms_total: int = 0

    def add(self, calls: int, failed: int, prompt: int, completion: int, cost: Decimal, latency: int) -> None:
        self.calls += calls
        self.failed += failed
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += cost
        self.latency_ms_total += latency

    @property
    def avg_latency_ms(self) -> int:
        return self.latency_ms_total // self.calls if self.calls else 0

    def as_json(self, by: str) -> dict[str, Any]:
        return {
            by: self.key,
            "calls": self.calls,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": float(self.cost_usd),
            "avg_latency_ms": self.avg_latency_ms,
        }


@dataclass
class UsageReport:
    since: datetime
    by: str
    rows: list[UsageRow] = field(default_factory=list)
    daily: dict[date, Decimal] = field(default_factory=dict)  # cost per day, every day since `since`

    @property
    def total(self) -> UsageRow:
        total = UsageRow("total")
        for row in self.rows:
            total.add(row.calls, row.failed, row.prompt_tokens, row.completion_tokens, row.cost_usd, row.latency_ms_total)
        return total

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "by": self.by,
            "rows": [row.as_json(self.by) for row in self.rows],
            "total": self.total.as_json(self.by),
            "daily_cost_usd": {day.isoformat(): float(cost) for day, cost in self.daily.items()},
        }


async def report(db: Database, tenants: list[TenantInfo], *, since: datetime, by: str) -> UsageReport:
    """Usage of these tenants since a time, each read in its own tenant transaction (row-level security)."""
    if by not in GROUPS:
        raise ValidationError(f"--by must be one of {', '.join(GROUPS)}")
    day = cast(func.timezone("UTC", LLMUsage.created_at), Date)
    key_column: Any = {"model": LLMUsage.model, "agent": func.coalesce(Agent.name, "(deleted agent)"), "day": day}.get(by)
    rows: dict[str, UsageRow] = {}
    daily: dict[date, Decimal] = defaultdict(Decimal)
    for tenant in tenants:
        async with db.tenant(tenant_id=tenant.id) as session:
            measures = (
                func.count(),
                func.count().filter(LLMUsage.error.is_not(None)),
                func.coalesce(func.sum(LLMUsage.prompt_tokens), 0),
                func.coalesce(func.sum(LLMUsage.completion_tokens), 0),
                func.coalesce(func.sum(LLMUsage.cost_usd), 0),
                func.coalesce(func.sum(LLMUsage.latency_ms), 0),
            )
            if key_column is None:  # by tenant: one row for this tenant
                query = select(literal(tenant.slug), *measures).where(LLMUsage.created_at >= since)
            else:
                query = select(key_column, *measures).where(LLMUsage.created_at >= since).group_by(key_column)
            if by == "agent":
                query = query.outerjoin(Agent, Agent.id == LLMUsage.agent_id)
            for key, calls, failed, prompt, completion, cost, latency in (await session.execute(query)).all():
                if not calls:
                    continue
                name = key.isoformat() if isinstance(key, date) else str(key)
                rows.setdefault(name, UsageRow(name)).add(calls, failed, prompt, completion, cost, latency)
            for when, cost in (
                await session.execute(select(day, func.sum(LLMUsage.cost_usd)).where(LLMUsage.created_at >= since).group_by(day))
            ).all():
                daily[when] += cost
    start, end = since.astimezone(UTC).date(), datetime.now(UTC).date()
    days = {start + timedelta(days=n): daily.get(start + timedelta(days=n), Decimal(0)) for n in range((end - start).days + 1)}
    ordered = sorted(rows.values(), key=lambda r: r.key) if by == "day" else sorted(rows.values(), key=lambda r: (-r.cost_usd, r.key))
    return UsageReport(since, by, ordered, days)
