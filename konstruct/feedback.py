"""Feedback on replies: a person's thumbs up or down on one stored reply, kept per tenant (row-level security),
one vote per person per reply and changeable, each new or changed vote audited; listed with the exchange it rates
and counted for `konstruct usage` and the status page.

A channel decides who voted and on which reply; this module checks that the reply is the tenant's, that it
answered a message that came in where the vote came from (`origin`), and keeps the vote."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage, Message, ReplyFeedback
from konstruct.errors import NotFoundError, ValidationError
from konstruct.tenancy.tenants import TenantInfo

UP, DOWN = 1, -1
MAX_VOTER = 64
EXCERPT = 500  # characters of each side of the exchange a listing carries


@dataclass(frozen=True)
class VoteResult:
    message_id: uuid.UUID
    voter: str
    value: int
    previous: int | None  # the person's vote before this one, None when it is their first

    @property
    def changed(self) -> bool:
        return self.previous != self.value


async def reply_for(db: Database, tenant_id: uuid.UUID, *, channel: str, inbound_external_id: str) -> uuid.UUID | None:
    """The stored reply to the inbound message with this channel id (one per inbound message), or None."""
    async with db.tenant(tenant_id=tenant_id) as session:
        return await session.scalar(
            select(Message.id)
            .join(InboundMessage, InboundMessage.id == Message.inbound_id)
            .where(InboundMessage.channel == channel, InboundMessage.external_id == inbound_external_id, Message.direction == "out")
        )


async def vote(
    db: Database,
    *,
    tenant_id: uuid.UUID,
    message_id: uuid.UUID,
    channel: str,
    voter: str,
    value: int,
    origin: dict[str, str],
) -> VoteResult:
    """Keep `voter`'s vote (UP or DOWN) on the reply `message_id`, replacing an earlier one. The reply must be this
    tenant's and answer a message of `channel` whose payload holds `origin` (e.g. the Slack workspace and channel
    the vote came from): otherwise NotFoundError, and nothing is stored."""
    if value not in (UP, DOWN):
        raise ValidationError("a vote is +1 or -1")
    if not 0 < len(voter) <= MAX_VOTER:
        raise ValidationError("a voter id is 1 to 64 characters")
    async with db.tenant(tenant_id=tenant_id) as session:
        reply = await session.scalar(
            select(Message.id)
            .join(InboundMessage, InboundMessage.id == Message.inbound_id)
            .where(
                Message.id == message_id,
                Message.direction == "out",
                InboundMessage.channel == channel,
                InboundMessage.payload.contains(origin),
            )
        )
        if reply is None:
            raise NotFoundError("no such reply here: a vote counts only on a reply in the conversation it was given in")
        previous = await _upsert(session, tenant_id, message_id, channel, voter, value)
        result = VoteResult(message_id, voter, value, previous)
        if result.changed:
            await audit.record(
                session, tenant_id=tenant_id, actor=f"{channel}:{voter}", action="feedback.vote", target=str(message_id),
                detail={"value": value, "previous": previous},
            )  # fmt: skip
    return result


async def _upsert(session: AsyncSession, tenant_id: uuid.UUID, message_id: uuid.UUID, channel: str, voter: str, value: int) -> int | None:
    """Insert or change the vote; the previous value (None for a first vote). Two clicks at once: one inserts, the
    other finds its row (locked) and changes it, so each sees the right previous value."""
    key = (
        ReplyFeedback.message_id == message_id,
        ReplyFeedback.channel == channel,
        ReplyFeedback.voter == voter,
    )
    previous = await session.scalar(select(ReplyFeedback.value).where(*key).with_for_update())
    if previous is None:
        inserted = await session.scalar(
            pg_insert(ReplyFeedback)
            .values(tenant_id=tenant_id, message_id=message_id, channel=channel, voter=voter, value=value)
            .on_conflict_do_nothing()
            .returning(ReplyFeedback.id)
        )
        if inserted is not None:
            return None
        previous = await session.scalar(select(ReplyFeedback.value).where(*key).with_for_update())
    if previous != value:
        await session.execute(update(ReplyFeedback).where(*key).values(value=value, updated_at=func.now()))
    return previous


@dataclass(frozen=True)
class FeedbackEntry:
    """One vote with the exchange it rates."""

    at: datetime
    channel: str
    voter: str
    value: int
    message_id: uuid.UUID
    agent: str
    question: str
    answer: str

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "channel": self.channel,
            "voter": self.voter,
            "vote": "up" if self.value == UP else "down",
            "value": self.value,
            "message_id": str(self.message_id),
            "agent": self.agent,
            "question": self.question,
            "answer": self.answer,
        }


def excerpt(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters (an ellipsis marks the cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)].rstrip() + "…"


async def entries(db: Database, tenant: TenantInfo, *, since: datetime, limit: int = 100) -> list[FeedbackEntry]:
    """The tenant's votes cast or changed since `since`, newest first, each with the person's message and the reply."""
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(
            select(
                ReplyFeedback.updated_at,
                ReplyFeedback.channel,
                ReplyFeedback.voter,
                ReplyFeedback.value,
                Message.id,
                Message.author,
                Message.text,
                InboundMessage.text,
            )
            .join(Message, Message.id == ReplyFeedback.message_id)
            .outerjoin(InboundMessage, InboundMessage.id == Message.inbound_id)
            .where(ReplyFeedback.updated_at >= since)
            .order_by(ReplyFeedback.updated_at.desc(), ReplyFeedback.id)
            .limit(limit)
        )
        return [
            FeedbackEntry(at, channel, voter, value, message_id, agent, excerpt(question or "", EXCERPT), excerpt(answer, EXCERPT))
            for at, channel, voter, value, message_id, agent, answer, question in rows.all()
        ]


@dataclass(frozen=True)
class FeedbackCounts:
    up: int = 0
    down: int = 0

    @property
    def total(self) -> int:
        return self.up + self.down

    @property
    def positive_percent(self) -> float | None:
        return 100.0 * self.up / self.total if self.total else None

    def __add__(self, other: FeedbackCounts) -> FeedbackCounts:
        return FeedbackCounts(self.up + other.up, self.down + other.down)

    def as_json(self) -> dict[str, Any]:
        return {"up": self.up, "down": self.down}


async def counts(db: Database, tenants: list[TenantInfo], *, since: datetime) -> FeedbackCounts:
    """Thumbs up and down cast (or changed) since `since`, over these tenants, each read in its own transaction."""
    total = FeedbackCounts()
    for tenant in tenants:
        async with db.tenant(tenant_id=tenant.id) as session:
            row = (
                await session.execute(
                    select(func.count().filter(ReplyFeedback.value == UP), func.count().filter(ReplyFeedback.value == DOWN)).where(
                        ReplyFeedback.updated_at >= since
                    )
                )
            ).one()
        total += FeedbackCounts(int(row[0]), int(row[1]))
    return total
