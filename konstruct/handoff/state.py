"""Who has an escalated conversation, and how its handoff ended: one `handoffs` row per escalation.

Outcomes, recorded when a handoff ends: `resolved_by_human` (closed after a human answered the person), `closed`
(closed with no human answer), `handed_back` (back to the agent: the button, the CLI, `/release`), `abandoned`
(ended with nobody having taken or answered it after the person was told to wait). Both ending kinds give the
conversation back to the agent (status open): the next message from the person is the agent's to answer.
"""

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
from konstruct.db.models import Conversation, Handoff, Message
from konstruct.errors import ConflictError, NotFoundError

DESK = "desk"  # the inbox channel of humans' replies (the conversation keeps its own channel)
HUMAN = "human"  # messages.kind of what a human sent the person (direction out, author who)
NOTE = "note"  # messages.kind of a human's note for the agent (never sent to the person)
CLOSE, HAND_BACK = "close", "hand_back"


async def begin(session: AsyncSession, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, reason: str, target: str | None) -> uuid.UUID:
    """The open handoff of the conversation, started now if it has none (in the caller's escalating transaction)."""
    kind, _, where = (target or "").partition(":")
    started = await session.scalar(
        pg_insert(Handoff)
        .values(tenant_id=tenant_id, conversation_id=conversation_id, reason=reason[:500], desk_kind=kind or None, desk_where=where or None)
        .on_conflict_do_nothing(index_elements=["conversation_id"], index_where=Handoff.ended_at.is_(None))
        .returning(Handoff.id)
    )
    if started is not None:
        return started
    found = await session.scalar(select(Handoff.id).where(Handoff.conversation_id == conversation_id, Handoff.ended_at.is_(None)))
    assert found is not None
    return found


async def open_handoff(session: AsyncSession, conversation_id: uuid.UUID, *, lock: bool = False) -> Handoff | None:
    query = select(Handoff).where(Handoff.conversation_id == conversation_id, Handoff.ended_at.is_(None))
    return await session.scalar(query.with_for_update() if lock else query)


def outcome_of(handoff: Handoff, how: str) -> str:
    """How a handoff ending this way counts (see the module docstring)."""
    if handoff.taken_at is None and handoff.first_human_reply_at is None and handoff.reminded_at is not None:
        return "abandoned"
    if how == HAND_BACK:
        return "handed_back"
    return "resolved_by_human" if handoff.first_human_reply_at is not None else "closed"


async def end_in(
    session: AsyncSession, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, how: str, actor: str, note: str | None = None
) -> Handoff | None:
    """End the conversation's open handoff (in the caller's transaction) and give the conversation back to the agent.
    None when it had none. A note is kept for the agent (messages.kind note), never sent to the person."""
    handoff = await open_handoff(session, conversation_id, lock=True)
    await session.execute(
        update(Conversation).where(Conversation.id == conversation_id, Conversation.status == "escalated").values(status="open")
    )
    if handoff is None:
        return None
    handoff.outcome, handoff.ended_by, handoff.card_dirty = outcome_of(handoff, how), actor, True
    handoff.ended_at = datetime.now().astimezone()
    if note and note.strip():
        session.add(Message(tenant_id=tenant_id, conversation_id=conversation_id, direction="out", author=actor, text=note.strip()[:4000],
                            status="sent", kind=NOTE))  # fmt: skip
    await audit.record(session, tenant_id=tenant_id, actor=actor, action="conversation.handoff_ended", target=str(conversation_id),
                       detail={"outcome": handoff.outcome, "handoff_id": str(handoff.id), "note": bool(note and note.strip())})  # fmt: skip
    await session.flush()
    return handoff


async def end(db: Database, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, how: str, actor: str, note: str | None = None) -> str:
    """End the open handoff of an escalated conversation; its outcome. ConflictError when it is not escalated."""
    async with db.tenant(tenant_id=tenant_id) as session:
        status = await session.scalar(select(Conversation.status).where(Conversation.id == conversation_id))
        if status != "escalated":
            raise ConflictError(
                f"conversation {str(conversation_id)[:8]} is not escalated: nothing to {'close' if how == CLOSE else 'hand back'}"
            )
        handoff = await end_in(session, tenant_id=tenant_id, conversation_id=conversation_id, how=how, actor=actor, note=note)
        if how == HAND_BACK:
            await audit.record(session, tenant_id=tenant_id, actor=actor, action="conversation.released", target=str(conversation_id))
        return handoff.outcome if handoff is not None and handoff.outcome else "handed_back"


async def conversation_of(db: Database, tenant_id: uuid.UUID, handoff_id: uuid.UUID) -> uuid.UUID:
    async with db.tenant(tenant_id=tenant_id) as session:
        found = await session.scalar(select(Handoff.conversation_id).where(Handoff.id == handoff_id))
    if found is None:
        raise NotFoundError("no such escalation for this workspace's tenant")
    return found


async def take(db: Database, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, who: str) -> str:
    """Make `who` the owner of the open handoff, if nobody owns it yet; the owner it has now (who, or someone else)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        taken = await session.scalar(
            update(Handoff)
            .where(Handoff.conversation_id == conversation_id, Handoff.ended_at.is_(None), Handoff.owner.is_(None))
            .values(owner=who, taken_at=func.coalesce(Handoff.taken_at, func.now()), card_dirty=True)
            .returning(Handoff.owner)
        )
        if taken is not None:
            await audit.record(session, tenant_id=tenant_id, actor=who, action="conversation.taken", target=str(conversation_id))
            return taken
        owner = await session.scalar(select(Handoff.owner).where(Handoff.conversation_id == conversation_id, Handoff.ended_at.is_(None)))
    if owner is None:
        raise ConflictError(f"conversation {str(conversation_id)[:8]} is not escalated: nothing to take")
    return owner


@dataclass(frozen=True)
class HandoffInfo:
    """One escalation as `konstruct conversation list --escalated` shows it."""

    conversation_id: uuid.UUID
    channel: str
    external_id: str
    person: str
    escalated_at: datetime
    category: str | None
    reason: str | None
    owner: str | None
    seconds_to_take: float | None
    seconds_to_answer: float | None
    reminded: bool
    outcome: str | None
    ended_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.conversation_id), "channel": self.channel, "conversation": self.external_id, "person": self.person,
            "status": "ended" if self.ended_at else "escalated",
            "escalated_at": self.escalated_at.isoformat(), "category": self.category, "reason": self.reason, "owner": self.owner,
            "seconds_to_take": self.seconds_to_take, "seconds_to_answer": self.seconds_to_answer, "reminded": self.reminded,
            "outcome": self.outcome, "ended_at": self.ended_at.isoformat() if self.ended_at else None,
        }  # fmt: skip


def _seconds(later: datetime | None, start: datetime) -> float | None:
    return round((later - start).total_seconds(), 1) if later is not None else None


async def list_handoffs(db: Database, tenant_id: uuid.UUID, *, ended: bool) -> list[HandoffInfo]:
    """The open escalations (and, with ended, the last 500 that ended, with their outcomes), newest first."""
    async with db.tenant(tenant_id=tenant_id) as session:
        query = (
            select(Handoff, Conversation.channel, Conversation.external_id, Conversation.person, Conversation.escalation_category)
            .join(Conversation, Conversation.id == Handoff.conversation_id)
            .order_by(Handoff.created_at.desc())
            .limit(500)
        )
        rows = (await session.execute(query if ended else query.where(Handoff.ended_at.is_(None)))).all()
    return [
        HandoffInfo(
            h.conversation_id,
            channel,
            external_id,
            person,
            h.created_at,
            category,
            h.reason,
            h.owner,
            _seconds(h.taken_at, h.created_at),
            _seconds(h.first_human_reply_at, h.created_at),
            h.reminded_at is not None,
            h.outcome,
            h.ended_at,
        )
        for h, channel, external_id, person, category in rows
    ]
