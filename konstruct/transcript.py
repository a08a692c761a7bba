"""A conversation's transcript, for people (`konstruct conversation show`, the status page's transcript page): what
the person said, what the agent answered, the notices sent in its place and what humans wrote, each with who and when.

Read inside the tenant's transaction (row-level security), after the caller checked the reader's role; every reading
is audited (`conversation.viewed`), since a transcript is a person's own words.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from konstruct import audit
from konstruct.db.engine import Database
from konstruct.db.models import Agent, Conversation, Handoff, Message
from konstruct.errors import NotFoundError
from konstruct.tenancy.tenants import TenantInfo

MAX_ENTRIES = 5000


@dataclass(frozen=True)
class Entry:
    at: datetime
    role: str  # person | agent | notice (a fixed text sent in the agent's place) | human (a teammate's turn)
    who: str  # the person's id in the channel, the agent's name, the human's name
    text: str
    status: str  # received | sending | sent | delivered | read | failed
    model: str | None  # the model that wrote an agent's answer, or what a notice came from (budget, template:NAME…)

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "role": self.role, "who": self.who, "text": self.text, "status": self.status,
                "model": self.model}  # fmt: skip


@dataclass(frozen=True)
class Transcript:
    id: uuid.UUID
    channel: str
    external_id: str
    person: str
    agent: str
    status: str  # open | escalated | …
    created_at: datetime
    escalated_at: datetime | None
    reason: str | None
    category: str | None
    owner: str | None  # who of the team took it (the open handoff's owner)
    entries: list[Entry]
    earlier: bool  # older entries were left out (see `limit`)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "channel": self.channel, "conversation": self.external_id, "person": self.person,
            "agent": self.agent, "status": self.status, "created_at": self.created_at.isoformat(),
            "escalated_at": self.escalated_at.isoformat() if self.escalated_at else None, "reason": self.reason,
            "category": self.category, "owner": self.owner, "earlier": self.earlier,
            "messages": [e.as_json() for e in self.entries],
        }  # fmt: skip


def role_of(direction: str, kind: str, author: str, agent: str) -> str:
    """Who a history row speaks for: the person (inbound), a notice, the agent, or a human of the team (any other author)."""
    if direction == "in":
        return "person"
    if kind == "notice":
        return "notice"
    return "agent" if kind == "message" and author == agent else "human"


def ago(since: datetime | None, now: datetime | None = None) -> str:
    """How long ago, for people: '45 s', '12 min', '3 h 05 min', '2 d 4 h'."""
    if since is None:
        return ""
    seconds = max(int(((now or datetime.now(UTC)) - since).total_seconds()), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours < 1:
        return f"{minutes} min"
    if days < 1:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{days} d {hours % 24} h"


async def read(db: Database, tenant: TenantInfo, conversation_id: uuid.UUID, *, actor: str, via: str, limit: int = 500) -> Transcript:
    """The conversation's last `limit` entries, oldest first, and the reading audited. NotFoundError when the tenant
    has no such conversation (another tenant's is invisible here, as row-level security keeps it)."""
    limit = max(1, min(limit, MAX_ENTRIES))
    async with db.tenant(tenant_id=tenant.id) as session:
        found = (
            await session.execute(
                select(Conversation, Agent.name).join(Agent, Agent.id == Conversation.agent_id).where(Conversation.id == conversation_id)
            )
        ).first()
        if found is None:
            raise NotFoundError(f"tenant {tenant.slug!r} has no conversation {conversation_id}: see `konstruct conversation list`")
        conversation, agent = found
        rows = list(
            await session.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.created_at.desc(), Message.direction.desc())
                .limit(limit + 1)
            )
        )
        owner = await session.scalar(select(Handoff.owner).where(Handoff.conversation_id == conversation_id, Handoff.ended_at.is_(None)))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="conversation.viewed", target=str(conversation_id),
                           detail={"via": via, "messages": min(len(rows), limit)})  # fmt: skip
    entries = [
        Entry(m.created_at, role_of(m.direction, m.kind, m.author, agent), m.author, m.text, m.status, m.model) for m in rows[:limit]
    ]
    return Transcript(
        conversation.id, conversation.channel, conversation.external_id, conversation.person, agent, conversation.status,
        conversation.created_at, conversation.escalated_at, conversation.escalation_reason, conversation.escalation_category,
        owner, entries[::-1], len(rows) > limit,
    )  # fmt: skip
