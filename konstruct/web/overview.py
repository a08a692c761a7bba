"""What the status page shows, read through the services and inside tenant transactions (row-level security)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit, feedback, supervision, transcript
from konstruct.billing import standing as billing
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Agent, ChannelConnection, Conversation, Handoff, InboundMessage, Message
from konstruct.llm import budget
from konstruct.llm import usage as usage_report
from konstruct.money import usd
from konstruct.tenancy.tenants import TenantInfo


@dataclass
class Health:
    database: str
    queue_depth: int | None
    queue: str
    workers: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    supervisor: list[str] = field(default_factory=list)  # what `up` says about its parts (restarts, crash loops, the database)
    supervisor_ok: bool = True
    inbox: supervision.InboxHealth | None = None


async def health(db: Database, queue: Any, data_dir: Path) -> Health:
    try:
        await asyncio.wait_for(db.ping(), timeout=5)
        database = "ok"
    except Exception as exc:
        database = f"unreachable: {type(exc).__name__}"
    try:
        depth: int | None = await asyncio.wait_for(asyncio.to_thread(queue.pending), timeout=5)
        queue_state = "ok"
    except Exception as exc:
        depth, queue_state = None, f"unreachable: {type(exc).__name__}"
    result = Health(database, depth, queue_state)
    status, result.supervisor = supervision.summarise(supervision.read_state(data_dir))
    result.supervisor_ok = status == "ok"
    if database != "ok":
        return result
    result.inbox = await supervision.inbox_health(db)
    async with db.system() as session:
        workers = await session.execute(
            text(
                "select worker_id, hostname, in_flight, seen_at, started_at, seen_at > now() - interval '30 seconds' as alive "
                "from worker_heartbeats order by seen_at desc limit 20"
            )
        )
        result.workers = [dict(row._mapping) for row in workers]
        errors = await session.execute(text("select tenant_slug, at, channel, error from konstruct_recent_errors(10)"))
        result.errors = [dict(row._mapping) for row in errors]
    return result


@dataclass
class TenantView:
    tenant: TenantInfo
    agents: list[dict[str, Any]]
    connections: list[dict[str, Any]]
    conversations_today: int
    messages_in_today: int
    messages_out_today: int
    escalations: list[dict[str, Any]]
    budget: budget.BudgetInfo
    daily_cost: list[tuple[str, float]]
    billing: billing.BillingStatus
    events: list[audit.AuditEvent]
    feedback: feedback.FeedbackCounts  # thumbs up and down on replies, last 30 days


async def tenant_view(db: Database, settings: Settings, tenant: TenantInfo) -> TenantView:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    async with db.tenant(tenant_id=tenant.id) as session:
        agents = [dict(row._mapping) for row in await session.execute(select(Agent.name, Agent.role, Agent.model).order_by(Agent.name))]
        last_in = (
            select(InboundMessage.channel, func.max(InboundMessage.received_at).label("last")).group_by(InboundMessage.channel).subquery()
        )
        connections = [
            dict(row._mapping)
            for row in await session.execute(
                select(
                    ChannelConnection.kind, ChannelConnection.name, ChannelConnection.external_id, ChannelConnection.status, last_in.c.last
                )
                .outerjoin(last_in, last_in.c.channel == ChannelConnection.kind)
                .order_by(ChannelConnection.kind, ChannelConnection.name)
            )
        ]
        conversations = await session.scalar(select(func.count()).select_from(Conversation).where(Conversation.last_message_at >= today))
        messages_in = await session.scalar(select(func.count()).select_from(InboundMessage).where(InboundMessage.received_at >= today))
        messages_out = await session.scalar(
            select(func.count()).select_from(Message).where(Message.direction == "out", Message.created_at >= today)
        )
        escalations = await open_escalations(session)
    info = await budget.get_budget(db, tenant, settings)
    report = await usage_report.report(db, [tenant], since=today - timedelta(days=29), by="day")
    daily = [(day.strftime("%m-%d"), float(cost)) for day, cost in report.daily.items()]
    status = await billing.status(db, settings, tenant)
    events = await audit.events(db, tenant.id, limit=15)
    votes = await feedback.counts(db, [tenant], since=today - timedelta(days=29))
    return TenantView(
        tenant, agents, connections, int(conversations or 0), int(messages_in or 0), int(messages_out or 0), escalations, info, daily,
        status, list(reversed(events)), votes,
    )  # fmt: skip


async def open_escalations(session: AsyncSession, limit: int = 50) -> list[dict[str, Any]]:
    """The tenant's conversations waiting for a human, oldest first: since when (and how long), who of the team took
    it (its open handoff's owner), why (category and explanation)."""
    columns = [Conversation.id, Conversation.channel, Conversation.external_id, Conversation.person, Conversation.escalated_at,
               Conversation.escalation_reason, Conversation.escalation_category, Handoff.owner]  # fmt: skip
    query = (
        select(*columns)
        .outerjoin(Handoff, (Handoff.conversation_id == Conversation.id) & Handoff.ended_at.is_(None))
        .where(Conversation.status == "escalated")
        .order_by(Conversation.escalated_at.asc().nulls_last())
        .limit(limit)
    )
    now = datetime.now(UTC)
    rows = [dict(row._mapping) for row in await session.execute(query)]
    return [{**row, "age": transcript.ago(row["escalated_at"], now)} for row in rows]


def bar_chart(days: list[tuple[str, float]], width: int = 600, height: int = 140) -> str:
    """An SVG bar chart of cost per day (each bar's title gives its amount), labelled with the first and last
    day and the highest cost. No JavaScript. The share of the monthly limit is the page's meter, not drawn here."""
    if not days:
        return ""
    top = max([cost for _, cost in days] + [0.000001])
    step = width / len(days)
    bars = []
    for n, (label, cost) in enumerate(days):
        h = cost / top * (height - 20)
        bars.append(
            f'<rect x="{n * step + 1:.1f}" y="{height - 15 - h:.1f}" width="{max(step - 2, 1):.1f}" height="{h:.1f}" class="bar">'
            f"<title>{label}: {usd(cost)}</title></rect>"
        )
    first, last = days[0][0], days[-1][0]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="LLM cost per day, last {len(days)} days">'
        + "".join(bars)
        + f'<text x="0" y="{height - 2}" class="axis">{first}</text>'
        + f'<text x="{width}" y="{height - 2}" text-anchor="end" class="axis">{last}</text>'
        + f'<text x="0" y="10" class="axis">max {usd(top)}/day</text>'
        + "</svg>"
    )
